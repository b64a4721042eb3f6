//! Command-line handlers: `train-fr`, `eval` and `verify`.

use super::augment::AugmentConfig;
use super::bench::bench_training;
use super::config::{BackboneSpec, TrainConfig};
use super::data::{open_source, ImageSource, ProcFaceSource};
use super::eval::{Embedder, ValidationSet, EVAL_BATCH};
use super::margin::LossKind;
use super::run::{train, TrainEvent};
use super::schedule::Decay;
use crate::analysis::verification::{verify, VerificationResult};
use crate::models::iresnet::{IResNet, IResNetConfig};
use crate::pipeline::parse_device;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Margin loss on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LossArg {
    /// CosFace, s = 64, m = 0.35.
    Cosface,
    /// ArcFace, s = 64, m = 0.5.
    Arcface,
}

/// Learning-rate decay on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScheduleArg {
    /// Cosine decay to 0.
    Cosine,
    /// Multiply by --gamma at each of --milestones.
    Step,
}

/// Arguments of `train-fr`.
#[derive(Debug, Args)]
pub struct TrainFrArgs {
    /// ImageFolder (`DIR/<identity>/<image>.png|jpg`) or RecordIO `X.rec` (with `X.idx`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Backbone: iresnet18|34|50|100 or four block counts like 1,1,1,1.
    #[arg(long, default_value = "iresnet50")]
    pub backbone: String,
    /// Embedding size.
    #[arg(long, default_value_t = 512)]
    pub num_features: usize,
    /// Dropout before the FC layer.
    #[arg(long, default_value_t = 0.4)]
    pub dropout: f64,
    /// Stem width (64 = IResNet; other values give checkpoints only this trainer reads).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Input side (112 = IResNet; a multiple of 16).
    #[arg(long, default_value_t = 112)]
    pub input_size: usize,
    /// Margin loss.
    #[arg(long, value_enum, default_value = "cosface")]
    pub loss: LossArg,
    /// Override the margin scale s.
    #[arg(long)]
    pub scale: Option<f64>,
    /// Override the margin m.
    #[arg(long)]
    pub margin: Option<f64>,
    /// Epochs.
    #[arg(long, default_value_t = 40)]
    pub epochs: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Base learning rate (multiplied by batch/512 unless --no-lr-scaling).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Use --lr as given, without the batch/512 scaling.
    #[arg(long)]
    pub no_lr_scaling: bool,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    #[arg(long, default_value_t = 5.0)]
    pub clip_grad_norm: f64,
    /// Epochs of linear warm-up.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f64,
    /// Decay after warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: ScheduleArg,
    /// Step-decay epochs.
    #[arg(long, value_delimiter = ',', default_value = "10,18,22")]
    pub milestones: Vec<usize>,
    /// Step-decay factor.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// RandAugment operations per image (0 = off; the paper's best setting is 4).
    #[arg(long, default_value_t = 0)]
    pub rand_ops: usize,
    /// RandAugment magnitude (0..=30).
    #[arg(long, default_value_t = 16)]
    pub magnitude: u32,
    /// Disable the random horizontal flip.
    #[arg(long)]
    pub no_flip: bool,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Validation `.bin` evaluated after every epoch (model selection).
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Continue the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Seed of data order and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Batches decoded ahead.
    #[arg(long, default_value_t = 2)]
    pub prefetch: usize,
    /// Step checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Measure training throughput over N steps instead of training (uses --data when given,
    /// else ProcFace faces); prints JSON.
    #[arg(long)]
    pub bench_steps: Option<usize>,
}

impl TrainFrArgs {
    /// The run configuration these arguments describe.
    pub fn to_config(&self) -> Result<TrainConfig> {
        let loss = match self.loss {
            LossArg::Cosface => LossKind::CosFace,
            LossArg::Arcface => LossKind::ArcFace,
        };
        let mut backbone = BackboneSpec::parse(&self.backbone, self.num_features, self.dropout)?;
        backbone.width = self.width;
        backbone.input_size = self.input_size;
        let data = self.data.clone().unwrap_or_default();
        let out = self.out.clone().unwrap_or_default();
        let mut cfg = TrainConfig::new(data, out).with_loss(loss);
        cfg.backbone = backbone;
        cfg.scale = self.scale.unwrap_or(cfg.scale);
        cfg.margin = self.margin.unwrap_or(cfg.margin);
        cfg.epochs = self.epochs;
        cfg.batch_size = self.batch_size;
        cfg.lr = self.lr;
        cfg.scale_lr = !self.no_lr_scaling;
        cfg.momentum = self.momentum;
        cfg.weight_decay = self.weight_decay;
        cfg.clip_grad_norm = (self.clip_grad_norm > 0.0).then_some(self.clip_grad_norm);
        cfg.warmup_epochs = self.warmup_epochs;
        cfg.decay = match self.schedule {
            ScheduleArg::Cosine => Decay::Cosine,
            ScheduleArg::Step => Decay::Step {
                milestones: self.milestones.clone(),
                gamma: self.gamma,
            },
        };
        cfg.augment = AugmentConfig {
            hflip: !self.no_flip,
            num_ops: self.rand_ops,
            magnitude: self.magnitude,
        };
        cfg.val = self.val.clone();
        cfg.resume = self.resume;
        cfg.seed = self.seed;
        cfg.device = self.device.clone();
        cfg.prefetch = self.prefetch;
        cfg.keep_checkpoints = self.keep_checkpoints;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `train-fr`: trains (exit code 0, or 130 when interrupted with a checkpoint to resume),
/// or with `--bench-steps` prints a throughput measurement.
pub fn cli_train_fr(args: &TrainFrArgs) -> Result<i32> {
    let cfg = args.to_config()?;
    if let Some(steps) = args.bench_steps {
        let source: Box<dyn ImageSource> = match &args.data {
            Some(d) => open_source(d)?,
            None => Box::new(ProcFaceSource {
                first_identity: 0,
                identities: cfg.batch_size.max(2),
                per_identity: 2,
                size: cfg.backbone.input_size as u32,
            }),
        };
        let result = bench_training(&cfg, source.as_ref(), steps)?;
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(0);
    }
    if args.data.is_none() || args.out.is_none() {
        bail!("train-fr needs --data and --out (or --bench-steps)");
    }
    // Ctrl-C sets the flag; a second Ctrl-C exits at once.
    let cancel = crate::default_model::optim::cancel_flag();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps (ETA {eta}) {msg}",
        )
        .context("progress template")?,
    );
    let summary = train(
        &cfg,
        &|e| match e {
            TrainEvent::Started(info) => {
                bar.set_length(info.total_steps as u64);
                bar.set_position(info.start_step as u64);
                bar.println(format!(
                    "{}; {} steps/epoch, peak lr {:.4}{}",
                    info.source,
                    info.steps_per_epoch,
                    info.peak_lr,
                    info.resumed_from
                        .map(|d| format!(", resumed from {}", d.display()))
                        .unwrap_or_default()
                ));
            }
            TrainEvent::Step(s) => {
                bar.set_position(s.step as u64);
                bar.set_message(format!(
                    "epoch {} loss {:.3} acc {:.3} lr {:.4} {:.1} img/s",
                    s.epoch, s.loss, s.train_accuracy, s.lr, s.images_per_sec
                ));
            }
            TrainEvent::Evaluating { epoch } => {
                bar.set_message(format!("epoch {epoch}: evaluating"));
            }
            TrainEvent::EpochEnd(r) => {
                let val = r
                    .val
                    .as_ref()
                    .map(|v| {
                        format!(
                            ", {} {:.4} ± {:.4}{}",
                            v.name,
                            v.accuracy_mean,
                            v.accuracy_std,
                            if r.best { " (best)" } else { "" }
                        )
                    })
                    .unwrap_or_default();
                bar.println(format!(
                    "epoch {}: loss {:.4}, train acc {:.4}, {:.1} img/s{val}",
                    r.epoch, r.mean_loss, r.train_accuracy, r.images_per_sec
                ));
            }
            TrainEvent::CheckpointSaved { .. } => {}
        },
        &cancel,
    )?;
    bar.finish_and_clear();
    if summary.completed {
        println!(
            "done: {} epochs, {} steps; backbone {}",
            summary.epochs_done,
            summary.steps,
            summary.out.join("backbone.safetensors").display()
        );
        Ok(0)
    } else {
        eprintln!(
            "interrupted at step {}; run the same command with --resume to continue",
            summary.steps
        );
        Ok(130)
    }
}

/// Arguments of `eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Backbone weights (safetensors or torch `.pth`, arcface_torch names) or an ONNX
    /// recognizer (`.onnx`, descriptor `<model>.json` beside it); default: the built-in
    /// default model's FR backbone.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// IResNet config JSON; default: inferred from the weights.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Folder whose `*.bin` verification sets are evaluated.
    #[arg(long)]
    pub bins: PathBuf,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per forward batch.
    #[arg(long, default_value_t = EVAL_BATCH)]
    pub batch_size: usize,
    /// Also write the JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Loads a backbone for evaluation: an ONNX recognizer (by extension, with its descriptor's
/// preprocessing); with `config` an IResNet; otherwise the IResNet architecture is inferred
/// from the weights (any width and input size).
pub fn load_embedder(
    model: &Path,
    config: Option<&Path>,
    device: &Device,
) -> Result<Box<dyn Embedder>> {
    if crate::onnx::is_onnx_file(model) {
        return Ok(Box::new(crate::analysis::embed::FrModel::load(
            model, config, device,
        )?));
    }
    let cfg = config.map(IResNetConfig::from_json_file).transpose()?;
    Ok(Box::new(IResNet::load_or_infer(
        model,
        cfg.as_ref(),
        device,
    )?))
}

/// One row of the `eval` output.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    /// Verification set (file stem).
    pub name: String,
    /// Number of pairs.
    pub pairs: usize,
    /// The protocol's result.
    #[serde(flatten)]
    pub result: VerificationResult,
}

/// `eval`: every `*.bin` in `--bins` (sorted by name); a table on stderr, JSON on stdout.
pub fn cli_eval(args: &EvalArgs) -> Result<i32> {
    let device = parse_device(&args.device)?;
    let (weights, config) = match &args.model {
        Some(m) => (m.clone(), args.config.clone()),
        None => {
            let (w, c) = crate::default_model::assets::default_fr_paths()
                .context("eval without --model needs the built-in default model")?;
            (w, Some(args.config.clone().unwrap_or(c)))
        }
    };
    let model = load_embedder(&weights, config.as_deref(), &device)?;
    let mut bins: Vec<PathBuf> = std::fs::read_dir(&args.bins)
        .with_context(|| format!("cannot list {}", args.bins.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "bin") && p.is_file())
        .collect();
    bins.sort();
    if bins.is_empty() {
        bail!("{}: no *.bin verification files", args.bins.display());
    }
    let mut rows = Vec::new();
    for bin in &bins {
        let set = ValidationSet::from_bin(bin)?;
        let result = set.evaluate(model.as_ref(), &device, args.batch_size)?;
        rows.push(EvalRow {
            name: set.name.clone(),
            pairs: set.num_pairs(),
            result,
        });
    }
    eprintln!(
        "{:<24} {:>7} {:>10} {:>8}",
        "set", "pairs", "accuracy", "std"
    );
    for r in &rows {
        eprintln!(
            "{:<24} {:>7} {:>9.2}% {:>7.2}%",
            r.name,
            r.pairs,
            100.0 * r.result.accuracy_mean,
            100.0 * r.result.accuracy_std
        );
    }
    let mean = rows.iter().map(|r| r.result.accuracy_mean).sum::<f64>() / rows.len() as f64;
    eprintln!("{:<24} {:>7} {:>9.2}%", "average", "", 100.0 * mean);
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "model": weights,
        "sets": rows,
        "average_accuracy": mean,
    }))?;
    if let Some(p) = &args.json {
        crate::files::write_atomic(p, json.as_bytes())?;
    }
    println!("{json}");
    Ok(0)
}

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// safetensors with `embeddings` (2N × d, pair k = rows 2k, 2k+1) and `issame` (N).
    #[arg(long)]
    pub embeddings: PathBuf,
}

/// Reads `embeddings` and `issame` from a safetensors file.
pub fn read_embeddings(path: &Path) -> Result<(Vec<f64>, usize, Vec<bool>)> {
    let t = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let emb = t
        .get("embeddings")
        .ok_or_else(|| anyhow!("{}: tensor `embeddings` is missing", path.display()))?;
    let same = t
        .get("issame")
        .ok_or_else(|| anyhow!("{}: tensor `issame` is missing", path.display()))?;
    let (rows, dim) = emb.dims2().map_err(|_| {
        anyhow!(
            "{}: `embeddings` must be 2-d (2N × d), got {:?}",
            path.display(),
            emb.dims()
        )
    })?;
    if same.rank() != 1 || 2 * same.dim(0)? != rows {
        bail!(
            "{}: `issame` has shape {:?}, expected [{}] for {rows} embeddings",
            path.display(),
            same.dims(),
            rows / 2
        );
    }
    let values = emb.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let issame = same
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|v| v != 0.0)
        .collect();
    Ok((values, dim, issame))
}

/// `verify`: prints the protocol's JSON (`accuracy_mean`, `accuracy_std`, `best_thresholds`).
pub fn cli_verify(args: &VerifyArgs) -> Result<i32> {
    let (values, dim, issame) = read_embeddings(&args.embeddings)?;
    let result = verify(&values, dim, &issame)
        .map_err(|e| anyhow!("{}: {e:#}", args.embeddings.display()))?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(0)
}
