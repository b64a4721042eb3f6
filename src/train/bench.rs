//! Training-throughput measurement (`idiff-studio train-fr --bench-steps N`): optimiser
//! steps per second on one fixed batch (forward, backward, SGD), and the data loader's
//! decode + augment rate, measured separately.

use super::config::TrainConfig;
use super::data::ImageSource;
use super::loader::{load_batch, Batch, LoaderConfig};
use super::trainer::Trainer;
use crate::pipeline::parse_device;
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

/// Result of [`bench_training`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    /// Block counts of the backbone.
    pub layers: Vec<usize>,
    /// Stem width.
    pub width: usize,
    /// Input side.
    pub input_size: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Timed steps (after one warm-up step).
    pub steps: usize,
    /// Median seconds per step.
    pub median_step_seconds: f64,
    /// Training images per second at the median step time (compute only).
    pub train_images_per_sec: f64,
    /// Decode + augment images per second of the data loader (all cores).
    pub loader_images_per_sec: f64,
    /// rayon threads.
    pub threads: usize,
    /// Device.
    pub device: String,
}

/// Times `steps` training steps of `cfg`'s model on one batch from `source`, and the
/// loader on `steps` further batches.
pub fn bench_training(
    cfg: &TrainConfig,
    source: &dyn ImageSource,
    steps: usize,
) -> Result<TrainBench> {
    cfg.validate()?;
    if steps == 0 {
        bail!("--bench-steps must be at least 1");
    }
    if source.len() < cfg.batch_size {
        bail!(
            "{} has fewer images than one batch of {}",
            source.describe(),
            cfg.batch_size
        );
    }
    crate::pipeline::enable_flush_to_zero();
    let device = parse_device(&cfg.device)?;
    let loader_cfg = LoaderConfig {
        batch_size: cfg.batch_size,
        image_size: cfg.backbone.input_size,
        augment: cfg.augment.clone(),
        seed: cfg.seed,
        prefetch: 1,
    };
    let indices: Vec<usize> = (0..cfg.batch_size).collect();
    let start = Instant::now();
    let mut loaded = 0usize;
    let mut batch: Option<Batch> = None;
    for b in 0..steps {
        let idx: Vec<usize> = indices
            .iter()
            .map(|i| (i + b * cfg.batch_size) % source.len())
            .collect();
        let out = load_batch(source, &idx, &loader_cfg, 0, b)?;
        loaded += out.labels.len();
        batch.get_or_insert(out);
    }
    let loader_images_per_sec = loaded as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let batch = batch.expect("steps >= 1");
    let mut trainer = Trainer::new(cfg, source.num_classes().max(2), steps + 1, &device)?;
    trainer.step(&batch)?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        trainer.step(&batch)?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    Ok(TrainBench {
        layers: cfg.backbone.layers.clone(),
        width: cfg.backbone.width,
        input_size: cfg.backbone.input_size,
        batch_size: cfg.batch_size,
        steps,
        median_step_seconds: median,
        train_images_per_sec: cfg.batch_size as f64 / median,
        loader_images_per_sec,
        threads: rayon::current_num_threads(),
        device: cfg.device.clone(),
    })
}
