//! The training loop behind the GUI and `idiff-studio train-fr`: [`train`] reports
//! [`TrainEvent`]s, checkpoints every epoch (and on cancel), evaluates the validation set
//! after every epoch, and resumes from the last checkpoint.

use super::ckpt::{load_latest, save_checkpoint};
use super::config::TrainConfig;
use super::data::{open_source, ImageSource};
use super::eval::ValidationSet;
use super::loader::{batches_per_epoch, EpochLoader, LoaderConfig};
use super::metrics::{write_metrics, EpochRecord, ValRecord};
use super::trainer::Trainer;
use crate::files::write_atomic;
use crate::pipeline::parse_device;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Facts about a run, sent once at its start.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// Description of the training data.
    pub source: String,
    /// Training images.
    pub num_images: usize,
    /// Identities.
    pub num_classes: usize,
    /// Batches per epoch.
    pub steps_per_epoch: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Step the run starts (or resumes) at.
    pub start_step: usize,
    /// Peak learning rate (after batch scaling).
    pub peak_lr: f64,
    /// Checkpoint folder resumed from.
    pub resumed_from: Option<PathBuf>,
}

/// One training step, for live plots.
#[derive(Debug, Clone, Serialize)]
pub struct StepEvent {
    /// Epoch, 1-based.
    pub epoch: usize,
    /// Batch within the epoch, 1-based.
    pub batch: usize,
    /// Batches per epoch.
    pub batches: usize,
    /// Optimiser steps done.
    pub step: usize,
    /// Steps of the whole run.
    pub total_steps: usize,
    /// Batch loss.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Batch training accuracy (nearest class centre).
    pub train_accuracy: f64,
    /// Training throughput over the last steps.
    pub images_per_sec: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// What a running training reports.
#[derive(Debug, Clone, Serialize)]
pub enum TrainEvent {
    /// Data opened, model built (and checkpoint restored).
    Started(RunInfo),
    /// A step finished.
    Step(StepEvent),
    /// The validation set is being evaluated.
    Evaluating {
        /// Epoch, 1-based.
        epoch: usize,
    },
    /// An epoch finished (validation included).
    EpochEnd(EpochRecord),
    /// A checkpoint was written.
    CheckpointSaved {
        /// Optimiser steps done.
        step: usize,
        /// Its folder.
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Output folder.
    pub out: PathBuf,
    /// False when cancelled before the last epoch finished.
    pub completed: bool,
    /// Epochs finished.
    pub epochs_done: usize,
    /// Optimiser steps done.
    pub steps: usize,
    /// Records of all finished epochs (including those before a resume).
    pub history: Vec<EpochRecord>,
    /// Best validation accuracy and its epoch.
    pub best: Option<(f64, usize)>,
    /// The newest backbone file (`out/backbone.safetensors`), once an epoch finished.
    pub backbone: Option<PathBuf>,
}

/// Trains as `cfg` says: opens `cfg.data` and the validation `.bin`, then [`train_on`].
pub fn train(
    cfg: &TrainConfig,
    on_event: &dyn Fn(TrainEvent),
    cancel: &AtomicBool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let source: Arc<dyn ImageSource> = Arc::from(open_source(&cfg.data)?);
    let val = cfg
        .val
        .as_deref()
        .map(ValidationSet::from_bin)
        .transpose()?;
    train_on(cfg, source, val, on_event, cancel)
}

/// Smoothed images/s over the recent steps.
struct Throughput {
    last: Instant,
    rate: Option<f64>,
}

impl Throughput {
    fn tick(&mut self, images: usize) -> f64 {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let r = images as f64 / dt;
        let smoothed = self.rate.map_or(r, |old| 0.8 * old + 0.2 * r);
        self.rate = Some(smoothed);
        smoothed
    }
}

/// Trains on `source`, evaluating `val` (if any) after every epoch. `cfg.data` and
/// `cfg.val` are only recorded.
pub fn train_on(
    cfg: &TrainConfig,
    source: Arc<dyn ImageSource>,
    val: Option<ValidationSet>,
    on_event: &dyn Fn(TrainEvent),
    cancel: &AtomicBool,
) -> Result<TrainSummary> {
    cfg.validate()?;
    crate::pipeline::enable_flush_to_zero();
    let device = parse_device(&cfg.device)?;
    let steps_per_epoch = batches_per_epoch(source.len(), cfg.batch_size);
    if steps_per_epoch == 0 {
        bail!(
            "{} has {} images, fewer than one batch of {}",
            source.describe(),
            source.len(),
            cfg.batch_size
        );
    }
    let out = &cfg.out;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::files::remove_stale_temps(out);
    let mut trainer = Trainer::new(cfg, source.num_classes(), steps_per_epoch, &device)?;
    let checkpoint = load_latest(out)?;
    let resumed_from = match checkpoint {
        Some(_) if !cfg.resume => bail!(
            "{} already holds a checkpoint: pass --resume to continue it or choose another output folder",
            out.display()
        ),
        Some(ck) => {
            let dir = ck.dir.clone();
            trainer.restore(ck)?;
            Some(dir)
        }
        None => None,
    };
    write_atomic(
        &out.join("train_config.json"),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    on_event(TrainEvent::Started(RunInfo {
        source: source.describe(),
        num_images: source.len(),
        num_classes: source.num_classes(),
        steps_per_epoch,
        total_steps: trainer.total_steps(),
        start_step: trainer.state.step,
        peak_lr: cfg.peak_lr(),
        resumed_from,
    }));
    let loader_cfg = LoaderConfig {
        batch_size: cfg.batch_size,
        image_size: cfg.backbone.input_size,
        augment: cfg.augment.clone(),
        seed: cfg.seed,
        prefetch: cfg.prefetch,
    };
    let save = |trainer: &Trainer| -> Result<PathBuf> {
        let dir = save_checkpoint(
            out,
            &trainer.backbone_file()?,
            &trainer.state_file()?,
            &trainer.state,
            cfg.keep_checkpoints,
        )?;
        on_event(TrainEvent::CheckpointSaved {
            step: trainer.state.step,
            path: dir.clone(),
        });
        Ok(dir)
    };
    let mut completed = true;
    'epochs: while trainer.state.epoch < cfg.epochs {
        let epoch = trainer.state.epoch;
        let loader = EpochLoader::start(
            source.clone(),
            loader_cfg.clone(),
            epoch,
            trainer.state.next_batch,
        )?;
        let (mut loss_sum, mut acc_sum, mut n) = (0.0, 0.0, 0usize);
        let epoch_start = Instant::now();
        let mut rate = Throughput {
            last: Instant::now(),
            rate: None,
        };
        let steps_before = trainer.state.step;
        for batch in loader {
            if cancel.load(Ordering::Relaxed) {
                if trainer.state.step > steps_before {
                    save(&trainer)?;
                }
                completed = false;
                break 'epochs;
            }
            let batch = batch?;
            let s = trainer.step(&batch)?;
            loss_sum += s.loss;
            acc_sum += s.accuracy;
            n += 1;
            on_event(TrainEvent::Step(StepEvent {
                epoch: epoch + 1,
                batch: batch.index + 1,
                batches: steps_per_epoch,
                step: trainer.state.step,
                total_steps: trainer.total_steps(),
                loss: s.loss,
                lr: s.lr,
                train_accuracy: s.accuracy,
                images_per_sec: rate.tick(batch.labels.len()),
                grad_norm: s.grad_norm,
            }));
        }
        if cancel.load(Ordering::Relaxed) && trainer.state.next_batch < steps_per_epoch {
            if trainer.state.step > steps_before {
                save(&trainer)?;
            }
            completed = false;
            break;
        }
        let seconds = epoch_start.elapsed().as_secs_f64();
        let val_record = match &val {
            Some(v) => {
                on_event(TrainEvent::Evaluating { epoch: epoch + 1 });
                let r = v.evaluate(trainer.net(), &device, cfg.batch_size.max(16))?;
                Some(ValRecord {
                    name: v.name.clone(),
                    accuracy_mean: r.accuracy_mean,
                    accuracy_std: r.accuracy_std,
                    best_thresholds: r.best_thresholds,
                })
            }
            None => None,
        };
        let best = match &val_record {
            Some(v) => trainer.state.best.is_none_or(|(b, _)| v.accuracy_mean > b),
            None => false,
        };
        trainer.state.epoch += 1;
        trainer.state.next_batch = 0;
        let record = EpochRecord {
            epoch: epoch + 1,
            step: trainer.state.step,
            mean_loss: loss_sum / n.max(1) as f64,
            train_accuracy: acc_sum / n.max(1) as f64,
            lr: trainer.state.lr,
            images_per_sec: (n * cfg.batch_size) as f64 / seconds.max(1e-9),
            val: val_record,
            best,
        };
        let backbone = trainer.backbone_file()?;
        if best {
            let acc = record.val.as_ref().map_or(0.0, |v| v.accuracy_mean);
            trainer.state.best = Some((acc, epoch + 1));
            write_atomic(&out.join("best_backbone.safetensors"), &backbone)?;
        }
        trainer.state.history.push(record.clone());
        save(&trainer)?;
        write_atomic(&out.join("backbone.safetensors"), &backbone)?;
        write_metrics(out, &trainer.state.history)?;
        on_event(TrainEvent::EpochEnd(record));
    }
    let epochs_done = trainer.state.epoch;
    Ok(TrainSummary {
        out: out.clone(),
        completed: completed && epochs_done >= cfg.epochs,
        epochs_done,
        steps: trainer.state.step,
        history: trainer.state.history.clone(),
        best: trainer.state.best,
        backbone: (epochs_done > 0).then(|| out.join("backbone.safetensors")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::verification::verify;
    use crate::train::augment::AugmentConfig;
    use crate::train::config::BackboneSpec;
    use crate::train::data::{InMemorySource, ProcFaceSource};
    use crate::train::margin::LossKind;
    use crate::train::schedule::Decay;
    use image::RgbImage;
    use std::cell::RefCell;

    /// Held-out verification set: `ids` identities × 6 images; per identity 3 genuine pairs
    /// and 3 impostor pairs (against the next identity), interleaved so every fold holds both.
    fn held_out(ids: usize, size: u32) -> (Vec<RgbImage>, Vec<(usize, usize)>, Vec<bool>) {
        let src = ProcFaceSource {
            first_identity: crate::procface::seeds::HELD_OUT_FIRST_IDENTITY,
            identities: ids,
            per_identity: 6,
            size,
        };
        let cached = InMemorySource::cache(&src).unwrap();
        let images: Vec<RgbImage> = (0..cached.len())
            .map(|i| cached.image(i).unwrap())
            .collect();
        let (mut pairs, mut issame) = (Vec::new(), Vec::new());
        for id in 0..ids {
            let other = (id + 1) % ids;
            for k in 0..3 {
                pairs.push((id * 6 + 2 * k, id * 6 + 2 * k + 1));
                issame.push(true);
                pairs.push((id * 6 + k, other * 6 + 3 + k));
                issame.push(false);
            }
        }
        (images, pairs, issame)
    }

    /// Verification accuracy of raw pixels (normalised), the no-learning baseline.
    fn pixel_baseline(images: &[RgbImage], pairs: &[(usize, usize)], issame: &[bool]) -> f64 {
        let dim = images[0].as_raw().len();
        let mut rows = Vec::with_capacity(2 * pairs.len() * dim);
        for &(a, b) in pairs {
            for i in [a, b] {
                rows.extend(images[i].as_raw().iter().map(|&v| v as f64 / 127.5 - 1.0));
            }
        }
        verify(&rows, dim, issame).unwrap().accuracy_mean
    }

    /// The real training run: a small IResNet learns ProcFace identities and verifies
    /// held-out identities (never seen in training) far above chance.
    #[test]
    fn procface_training_verifies_held_out_identities() {
        let start = Instant::now();
        let size = 64;
        let train_src = ProcFaceSource {
            first_identity: 0,
            identities: 200,
            per_identity: 12,
            size: size as u32,
        };
        let source: Arc<dyn ImageSource> = Arc::new(InMemorySource::cache(&train_src).unwrap());
        let (images, pairs, issame) = held_out(100, size as u32);
        let baseline = pixel_baseline(&images, &pairs, &issame);
        let val = ValidationSet::from_images("procface-held-out", images, pairs, issame).unwrap();
        assert_eq!(val.num_pairs(), 600);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = TrainConfig::new("procface", dir.path()).with_loss(LossKind::CosFace);
        cfg.backbone = BackboneSpec {
            layers: vec![1, 1, 1, 1],
            num_features: 64,
            dropout: 0.0,
            width: 16,
            input_size: size,
        };
        cfg.epochs = 4;
        cfg.batch_size = 64;
        cfg.lr = 0.1;
        cfg.scale_lr = false;
        cfg.warmup_epochs = 0.5;
        cfg.decay = Decay::Cosine;
        cfg.augment = AugmentConfig {
            hflip: true,
            num_ops: 0,
            magnitude: 0,
        };
        let log = RefCell::new(Vec::new());
        let summary = train_on(
            &cfg,
            source,
            Some(val),
            &|e| {
                if let TrainEvent::EpochEnd(r) = &e {
                    eprintln!(
                        "epoch {}: loss {:.3} train acc {:.3} {:.1} img/s val {:.4}",
                        r.epoch,
                        r.mean_loss,
                        r.train_accuracy,
                        r.images_per_sec,
                        r.val.as_ref().map_or(0.0, |v| v.accuracy_mean)
                    );
                }
                log.borrow_mut().push(e);
            },
            &AtomicBool::new(false),
        )
        .unwrap();
        let best = summary.best.unwrap();
        let last = summary
            .history
            .last()
            .unwrap()
            .val
            .as_ref()
            .unwrap()
            .accuracy_mean;
        eprintln!(
            "held-out verification: pixels {baseline:.4}, trained best {:.4} (epoch {}), last {last:.4}; wall {:?}",
            best.0,
            best.1,
            start.elapsed()
        );
        assert!(summary.completed);
        assert!(best.0 >= 0.9, "held-out accuracy {} < 0.90", best.0);
        assert!(
            best.0 > baseline + 0.05,
            "no better than pixels ({baseline})"
        );
        // The artefacts of a finished run.
        for f in [
            "backbone.safetensors",
            "best_backbone.safetensors",
            "metrics.json",
            "metrics.csv",
            "latest.json",
            "train_config.json",
        ] {
            assert!(dir.path().join(f).is_file(), "{f} missing");
        }
        let steps = log
            .borrow()
            .iter()
            .filter(|e| matches!(e, TrainEvent::Step(_)))
            .count();
        assert_eq!(steps, summary.steps);
    }

    fn tiny_config(out: &std::path::Path) -> TrainConfig {
        let mut cfg = TrainConfig::new("procface", out).with_loss(LossKind::ArcFace);
        cfg.backbone = BackboneSpec {
            layers: vec![1, 1, 1, 1],
            num_features: 16,
            dropout: 0.2,
            width: 8,
            input_size: 32,
        };
        cfg.epochs = 2;
        cfg.batch_size = 4;
        cfg.augment.num_ops = 2;
        cfg
    }

    /// Cancel mid-epoch → checkpoint; a rerun without `resume` refuses; with `resume` it
    /// continues at the next batch and finishes with the right step count and artefacts.
    #[test]
    fn interrupted_run_resumes_from_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config(dir.path());
        let source: Arc<dyn ImageSource> = Arc::new(ProcFaceSource {
            first_identity: 5,
            identities: 3,
            per_identity: 5,
            size: 32,
        });
        let cancel = AtomicBool::new(false);
        let first = train_on(
            &cfg,
            source.clone(),
            None,
            &|e| {
                if let TrainEvent::Step(s) = e {
                    if s.step == 5 {
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
            },
            &cancel,
        )
        .unwrap();
        // 15 images, batch 4 → 3 steps per epoch; stopped after step 5 (epoch 2, batch 2).
        assert!(!first.completed);
        assert_eq!((first.steps, first.epochs_done), (5, 1));
        assert_eq!(first.history.len(), 1);
        let latest: crate::train::ckpt::LatestPointer =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("latest.json")).unwrap())
                .unwrap();
        assert_eq!((latest.step, latest.epoch), (5, 1));

        let err = train_on(&cfg, source.clone(), None, &|_| {}, &AtomicBool::new(false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--resume"), "{err}");

        let resumed_cfg = TrainConfig {
            resume: true,
            ..cfg
        };
        let steps = RefCell::new(Vec::new());
        let second = train_on(
            &resumed_cfg,
            source,
            None,
            &|e| match e {
                TrainEvent::Started(info) => {
                    assert_eq!(info.start_step, 5);
                    assert!(info.resumed_from.is_some());
                }
                TrainEvent::Step(s) => steps.borrow_mut().push((s.epoch, s.batch, s.step)),
                _ => {}
            },
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(*steps.borrow(), vec![(2, 3, 6)]);
        assert!(second.completed);
        assert_eq!(
            (second.steps, second.epochs_done, second.history.len()),
            (6, 2, 2)
        );
        let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            checkpoints.len() <= 2 && checkpoints.contains(&"step_00000006".to_string()),
            "{checkpoints:?}"
        );
        let metrics: Vec<EpochRecord> = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            metrics.iter().map(|r| r.epoch).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }
}
