//! Training checkpoints: the backbone in arcface_torch names, the head and optimiser state,
//! written atomically so an interrupted run resumes from the last complete checkpoint.
//!
//! # Layout of the output folder
//! ```text
//! out/train_config.json              the TrainConfig of the run
//! out/checkpoints/step_00001234/
//!     backbone.safetensors           backbone state dict (see below)
//!     state.safetensors              `head.weight`, `momentum.<name>` + metadata `train_state`
//! out/latest.json                    {"dir": "checkpoints/step_00001234", ...}: the resume point
//! out/backbone.safetensors           copy of the newest backbone
//! out/best_backbone.safetensors      backbone of the best validation epoch
//! out/metrics.jsonl, metrics.csv     one record per epoch
//! ```
//! A checkpoint folder is written as `checkpoints/.step_….tmp` and renamed when complete;
//! `latest.json` is replaced (temp + rename) only after that, so it never names a partial
//! checkpoint.
//!
//! # Backbone names (PyTorch mapping)
//! `backbone.safetensors` holds the arcface_torch `iresnet` `state_dict()` keys one for one,
//! all F32 except the counters: `conv1.weight`, `bn1.{weight,bias,running_mean,running_var}`,
//! `prelu.weight`, `layer{1..4}.{i}.{bn1,conv1,bn2,prelu,conv2,bn3}.*`,
//! `layer{s}.0.downsample.{0.weight, 1.weight, 1.bias, 1.running_mean, 1.running_var}`,
//! `bn2.*`, `fc.{weight,bias}`, `features.{weight,bias,running_mean,running_var}`.
//! candle's BatchNorm keeps `running_mean`/`running_var` under PyTorch's names (momentum
//! 0.1, unbiased running variance, like `nn.BatchNorm2d`). PyTorch's `num_batches_tracked`
//! buffers are written as I64 scalars (the number of optimiser steps), so
//! `model.load_state_dict(safetensors.torch.load_file(path))` works with `strict=True`;
//! `IResNet::load` ignores them. arcface_torch sets `features.weight` to 1 and freezes it;
//! here it is trained like every other BatchNorm weight.

use super::metrics::EpochRecord;
use super::optim::Sgd;
use crate::files::write_atomic;
use crate::models::iresnet::is_running_stat;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Metadata key of the [`TrainState`] JSON in `state.safetensors`.
pub const STATE_KEY: &str = "train_state";
/// Prefix of momentum buffers in `state.safetensors`.
pub const MOMENTUM_PREFIX: &str = "momentum.";
/// Name of the head weight in `state.safetensors` (and of its momentum buffer).
pub const HEAD_WEIGHT: &str = "head.weight";

/// Where a run stands: enough to continue it exactly at the next batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epoch being trained (0-based); equals the epoch count when the run is complete.
    pub epoch: usize,
    /// First batch of `epoch` not trained yet.
    pub next_batch: usize,
    /// Optimiser steps done (the schedule position).
    pub step: usize,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Number of identities the head was built for.
    pub num_classes: usize,
    /// Best validation accuracy so far and its (1-based) epoch.
    pub best: Option<(f64, usize)>,
    /// Records of the finished epochs.
    pub history: Vec<EpochRecord>,
}

/// Contents of `latest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestPointer {
    /// Checkpoint folder relative to the output folder.
    pub dir: String,
    /// Step of that checkpoint.
    pub step: usize,
    /// Epoch being trained at that checkpoint.
    pub epoch: usize,
}

fn to_cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?)
}

fn serialize(tensors: &BTreeMap<String, Tensor>, meta: HashMap<String, String>) -> Result<Vec<u8>> {
    Ok(safetensors::serialize(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        Some(meta),
    )?)
}

/// The backbone state dict (arcface_torch names, `num_batches_tracked` = `steps`).
pub fn backbone_tensors(vars: &VarMap, steps: usize) -> Result<BTreeMap<String, Tensor>> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| anyhow!("variable map lock poisoned"))?;
    let mut out = BTreeMap::new();
    for (name, var) in data.iter() {
        out.insert(name.clone(), to_cpu_f32(var.as_tensor())?);
        if let Some(prefix) = name.strip_suffix(".running_mean") {
            out.insert(
                format!("{prefix}.num_batches_tracked"),
                Tensor::new(steps as i64, &Device::Cpu)?,
            );
        }
    }
    Ok(out)
}

/// Serialised `backbone.safetensors`.
pub fn backbone_bytes(vars: &VarMap, steps: usize) -> Result<Vec<u8>> {
    let meta = HashMap::from([(
        "format".to_string(),
        "arcface_torch iresnet state_dict".to_string(),
    )]);
    serialize(&backbone_tensors(vars, steps)?, meta)
}

/// Serialised `state.safetensors`: head weight, momentum buffers and the state JSON.
pub fn state_bytes(head: &Tensor, opt: &Sgd, state: &TrainState) -> Result<Vec<u8>> {
    let mut tensors = BTreeMap::from([(HEAD_WEIGHT.to_string(), to_cpu_f32(head)?)]);
    for (name, buf) in opt.buffers() {
        tensors.insert(format!("{MOMENTUM_PREFIX}{name}"), to_cpu_f32(buf)?);
    }
    let meta = HashMap::from([(STATE_KEY.to_string(), serde_json::to_string(state)?)]);
    serialize(&tensors, meta)
}

/// Writes a complete checkpoint folder for `state` and points `latest.json` at it; keeps
/// only the newest `keep` checkpoint folders. Returns the folder.
pub fn save_checkpoint(
    out: &Path,
    backbone: &[u8],
    state_file: &[u8],
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let root = out.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let name = format!("step_{:08}", state.step);
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write_atomic(&tmp.join("backbone.safetensors"), backbone)?;
    write_atomic(&tmp.join("state.safetensors"), state_file)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    let pointer = LatestPointer {
        dir: format!("checkpoints/{name}"),
        step: state.step,
        epoch: state.epoch,
    };
    write_atomic(
        &out.join("latest.json"),
        serde_json::to_string_pretty(&pointer)?.as_bytes(),
    )?;
    prune(&root, &name, keep);
    Ok(dir)
}

/// Deletes all but the newest `keep` `step_*` folders (never `current`); best effort.
fn prune(root: &Path, current: &str, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step_"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep.max(1));
    for n in names.into_iter().take(excess).filter(|n| n != current) {
        let _ = std::fs::remove_dir_all(root.join(n));
    }
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// Folder it came from.
    pub dir: PathBuf,
    /// Backbone tensors by name.
    pub backbone: HashMap<String, Tensor>,
    /// Head weight.
    pub head: Tensor,
    /// Momentum buffers by parameter name.
    pub momentum: BTreeMap<String, Tensor>,
    /// The run position.
    pub state: TrainState,
}

/// Reads the checkpoint `out/latest.json` points at; `Ok(None)` when there is none.
pub fn load_latest(out: &Path) -> Result<Option<LoadedCheckpoint>> {
    let pointer_path = out.join("latest.json");
    if !pointer_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&pointer_path)
        .with_context(|| format!("cannot read {}", pointer_path.display()))?;
    let pointer: LatestPointer = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: invalid checkpoint pointer: {e}",
            pointer_path.display()
        )
    })?;
    let dir = out.join(&pointer.dir);
    let backbone_path = dir.join("backbone.safetensors");
    let backbone = candle_core::safetensors::load(&backbone_path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", backbone_path.display()))?;
    let state_path = dir.join("state.safetensors");
    let bytes = std::fs::read(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file: {e}", state_path.display()))?;
    let state_json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(STATE_KEY))
        .ok_or_else(|| {
            anyhow!(
                "{}: metadata key `{STATE_KEY}` is missing",
                state_path.display()
            )
        })?;
    let state: TrainState = serde_json::from_str(state_json)
        .map_err(|e| anyhow!("{}: invalid `{STATE_KEY}`: {e}", state_path.display()))?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let head = tensors.remove(HEAD_WEIGHT).ok_or_else(|| {
        anyhow!(
            "{}: tensor `{HEAD_WEIGHT}` is missing",
            state_path.display()
        )
    })?;
    let mut momentum = BTreeMap::new();
    for (k, v) in tensors {
        match k.strip_prefix(MOMENTUM_PREFIX) {
            Some(name) => {
                momentum.insert(name.to_string(), v);
            }
            None => bail!("{}: unexpected tensor `{k}`", state_path.display()),
        }
    }
    Ok(Some(LoadedCheckpoint {
        dir,
        backbone,
        head,
        momentum,
        state,
    }))
}

/// Copies `tensors` into the variables of `vars` (every variable must be present with its
/// shape; extra keys such as `num_batches_tracked` are ignored).
pub fn restore_vars(vars: &VarMap, tensors: &HashMap<String, Tensor>, what: &str) -> Result<()> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| anyhow!("variable map lock poisoned"))?;
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| anyhow!("{what}: `{name}` is missing"))?;
        if t.dims() != var.dims() {
            bail!(
                "{what}: `{name}` has shape {:?}, the model needs {:?}",
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Names of the trainable variables of a backbone map, sorted (running statistics excluded).
pub fn trainable_names(vars: &VarMap) -> Result<Vec<String>> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| anyhow!("variable map lock poisoned"))?;
    let mut names: Vec<String> = data
        .keys()
        .filter(|n| !is_running_stat(n))
        .cloned()
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::iresnet::{IResNet, IResNetConfig};
    use crate::testutil::max_abs_diff;
    use crate::train::config::{BackboneSpec, TrainConfig};
    use crate::train::loader::Batch;
    use crate::train::trainer::Trainer;

    /// A standard-width checkpoint written after a training step loads with `IResNet::load`
    /// and gives the trainer's inference embeddings; the state file round-trips.
    #[test]
    fn checkpoint_loads_with_iresnet_and_round_trips_state() {
        let dev = Device::Cpu;
        let mut cfg = TrainConfig::new("unused", "unused");
        cfg.backbone = BackboneSpec::parse("1,1,1,1", 8, 0.0).unwrap();
        cfg.batch_size = 2;
        let mut trainer = Trainer::new(&cfg, 3, 4, &dev).unwrap();
        let pixels = Tensor::randn(0f32, 0.5, 2 * 3 * 112 * 112, &dev).unwrap();
        let batch = Batch {
            index: 0,
            pixels: pixels.to_vec1().unwrap(),
            labels: vec![0, 2],
        };
        trainer.step(&batch).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ck = save_checkpoint(
            dir.path(),
            &trainer.backbone_file().unwrap(),
            &trainer.state_file().unwrap(),
            &trainer.state,
            2,
        )
        .unwrap();
        let path = ck.join("backbone.safetensors");
        let names = candle_core::safetensors::load(&path, &dev).unwrap();
        assert_eq!(names["bn1.num_batches_tracked"].dtype(), DType::I64);
        assert!(names.contains_key("layer1.0.downsample.1.running_var"));
        let icfg = IResNetConfig {
            layers: vec![1, 1, 1, 1],
            num_features: 8,
            ..IResNetConfig::iresnet18()
        };
        let model = IResNet::load(&path, &icfg, &dev).unwrap();
        let x = batch.tensor(112, &dev).unwrap();
        let a = model.forward(&x).unwrap();
        let b = trainer.net().forward_t(&x, false).unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "{diff}");

        let loaded = load_latest(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.state, trainer.state);
        assert_eq!(loaded.momentum.len(), trainer.trainable().len());
        let mut other = Trainer::new(&cfg, 3, 4, &dev).unwrap();
        other.restore(loaded).unwrap();
        let c = other.net().forward_t(&x, false).unwrap();
        let b = trainer.net().forward_t(&x, false).unwrap();
        let diff = max_abs_diff(&c, &b);
        assert_eq!(diff, 0.0);
        // A head for another number of identities is refused with a one-line error.
        let mut wrong = Trainer::new(&cfg, 5, 4, &dev).unwrap();
        let err = wrong
            .restore(load_latest(dir.path()).unwrap().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 identities") && !err.contains('\n'), "{err}");
        assert!(load_latest(&dir.path().join("none")).unwrap().is_none());
    }
}
