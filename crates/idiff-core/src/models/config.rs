//! Finding a network's architecture: an explicit JSON/YAML config using the reference's key
//! names, or the hydra `.hydra/config.yaml` that the reference writes beside its runs.

use super::unet::UNetConfig;
use anyhow::{bail, Context, Result};
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// Where a configuration came from (shown in the UI, written to manifests).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    /// An explicit file given by the user.
    File(PathBuf),
    /// A hydra run config found beside the checkpoint.
    Hydra(PathBuf),
    /// No config found: the released architecture was assumed.
    Released,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{}", p.display()),
            Self::Hydra(p) => write!(f, "hydra {}", p.display()),
            Self::Released => write!(f, "released IDiff-Face architecture (assumed)"),
        }
    }
}

/// Reads a JSON or YAML file holding a config with the reference's key names.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let parsed = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid config: {e}", path.display()))?
    } else {
        serde_yaml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid config: {e}", path.display()))?
    };
    Ok(parsed)
}

/// The `.hydra/config.yaml` of the run a checkpoint belongs to (its folder or up to two
/// folders above, as the reference stores checkpoints under `<run>/checkpoints/`).
pub fn find_hydra_config(checkpoint: &Path) -> Option<PathBuf> {
    let mut dir = checkpoint.parent();
    for _ in 0..3 {
        let d = dir?;
        let candidate = d.join(".hydra").join("config.yaml");
        if candidate.is_file() {
            return Some(candidate);
        }
        dir = d.parent();
    }
    None
}

/// The U-Net architecture for a checkpoint: the explicit config if given, else the hydra
/// run config beside it, else the released configuration.
pub fn unet_config_for(
    checkpoint: &Path,
    explicit: Option<&Path>,
) -> Result<(UNetConfig, ConfigSource)> {
    if let Some(path) = explicit {
        let cfg: UNetConfig = read_config(path)?;
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        return Ok((cfg, ConfigSource::File(path.to_path_buf())));
    }
    if let Some(hydra) = find_hydra_config(checkpoint) {
        let cfg = unet_config_from_hydra(&hydra)?;
        return Ok((cfg, ConfigSource::Hydra(hydra)));
    }
    Ok((UNetConfig::released(), ConfigSource::Released))
}

/// Reads the `model` section of a hydra run config, resolving `${a.b}` interpolations, and
/// checks that the `diffusion` section describes the linear T = 1000 schedule.
pub fn unet_config_from_hydra(path: &Path) -> Result<UNetConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let root: Value = serde_yaml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid YAML: {e}", path.display()))?;
    if let Some(diffusion) = root.get("diffusion") {
        let t = resolve(&root, diffusion.get("T").cloned().unwrap_or(Value::Null));
        if let Some(t) = t.as_u64() {
            if t != 1000 {
                bail!(
                    "{}: diffusion.T = {t}; only T = 1000 is supported",
                    path.display()
                );
            }
        }
        let kind = resolve(
            &root,
            diffusion
                .get("schedule_type")
                .cloned()
                .unwrap_or(Value::Null),
        );
        if let Some(kind) = kind.as_str() {
            if kind != "linear" {
                bail!(
                    "{}: schedule_type {kind:?}; only the linear schedule is supported",
                    path.display()
                );
            }
        }
    }
    let model = root
        .get("model")
        .with_context(|| format!("{}: no `model` section", path.display()))?;
    let mut resolved = resolve(&root, model.clone());
    // `input_channels` defaults to -1 in the reference's constants; latent diffusion uses 3.
    if let Some(map) = resolved.as_mapping_mut() {
        let bad = map
            .get("input_channels")
            .and_then(Value::as_i64)
            .is_none_or(|c| c <= 0);
        if bad {
            map.insert(Value::from("input_channels"), Value::from(3));
        }
    }
    let cfg: UNetConfig = serde_yaml::from_value(resolved)
        .map_err(|e| anyhow::anyhow!("{}: model section: {e}", path.display()))?;
    cfg.validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(cfg)
}

/// Replaces whole-string `${a.b.c}` interpolations with the referenced values.
fn resolve(root: &Value, v: Value) -> Value {
    match v {
        Value::String(s) if s.starts_with("${") && s.ends_with('}') => {
            let path = &s[2..s.len() - 1];
            let mut cur = root;
            for part in path.split('.') {
                match cur.get(part) {
                    Some(next) => cur = next,
                    None => return Value::String(s),
                }
            }
            resolve(root, cur.clone())
        }
        Value::Mapping(m) => {
            Value::Mapping(m.into_iter().map(|(k, v)| (k, resolve(root, v))).collect())
        }
        Value::Sequence(s) => Value::Sequence(s.into_iter().map(|v| resolve(root, v)).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYDRA: &str = r#"
constants:
  seed: 0
  input_channels: 3
latent_diffusion: true
diffusion:
  _target_: diffusion.ddpm.DenoisingDiffusionProbabilisticModel
  eps_model: ${model}
  T: 1000
  schedule_type: linear
model:
  _target_: models.diffusion.unet.ConditionalUNet
  input_channels: ${constants.input_channels}
  initial_channels: 96
  channel_multipliers: [1, 2, 2, 2]
  is_attention: [false, true, true, true]
  attention_heads: -1
  attention_head_channels: 32
  n_blocks_per_resolution: 2
  condition_type: CA
  is_context_conditional: true
  context_input_channels: 512
  context_channels: 256
  learn_empty_context: false
  context_dropout_probability: 0.25
"#;

    #[test]
    fn reads_hydra_config_beside_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".hydra")).unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints")).unwrap();
        std::fs::write(dir.path().join(".hydra/config.yaml"), HYDRA).unwrap();
        let ckpt = dir
            .path()
            .join("checkpoints/ema_averaged_model_100000.ckpt");
        let (cfg, source) = unet_config_for(&ckpt, None).unwrap();
        assert!(matches!(source, ConfigSource::Hydra(_)));
        assert_eq!(cfg, UNetConfig::released());
    }

    #[test]
    fn refuses_other_schedules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.yaml");
        std::fs::write(
            &p,
            HYDRA.replace("schedule_type: linear", "schedule_type: cosine"),
        )
        .unwrap();
        let err = unet_config_from_hydra(&p).unwrap_err().to_string();
        assert!(err.contains("cosine"), "{err}");
    }

    #[test]
    fn falls_back_to_released_architecture() {
        let (cfg, source) = unet_config_for(Path::new("/nonexistent/dir/w.ckpt"), None).unwrap();
        assert_eq!(source, ConfigSource::Released);
        assert_eq!(cfg.initial_channels, 96);
    }
}
