//! [`TrainConfig`]: everything a training run needs, serialisable for the GUI and for
//! `train_config.json` in the output folder.

use super::augment::AugmentConfig;
use super::margin::LossKind;
use super::net::NetConfig;
use super::schedule::Decay;
use crate::models::iresnet::IResNetConfig;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// An IResNet backbone: block counts, embedding size and dropout before `fc`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneSpec {
    /// IBasicBlocks per stage (iresnet18 = `[2, 2, 2, 2]`).
    pub layers: Vec<usize>,
    /// Embedding size.
    pub num_features: usize,
    /// Dropout probability before `fc` in training (the paper uses 0.4).
    pub dropout: f64,
    /// Stem/first-stage channels (64 = IResNet; smaller only for quick experiments, not
    /// loadable by `IResNet::load`).
    #[serde(default = "default_width")]
    pub width: usize,
    /// Input side length, a multiple of 16 (112 = IResNet).
    #[serde(default = "default_input_size")]
    pub input_size: usize,
}

fn default_width() -> usize {
    64
}

fn default_input_size() -> usize {
    112
}

impl BackboneSpec {
    /// `iresnet18|34|50|100`, or four comma-separated block counts such as `1,1,1,1`.
    pub fn parse(name: &str, num_features: usize, dropout: f64) -> Result<Self> {
        let layers = match name.to_ascii_lowercase().as_str() {
            "iresnet18" | "r18" => vec![2, 2, 2, 2],
            "iresnet34" | "r34" => vec![3, 4, 6, 3],
            "iresnet50" | "r50" => vec![3, 4, 14, 3],
            "iresnet100" | "r100" => vec![3, 13, 30, 3],
            other => other
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| {
                    anyhow::anyhow!(
                        "unknown backbone {name:?} (iresnet18|34|50|100 or four block counts like 1,1,1,1)"
                    )
                })?,
        };
        if !(0.0..1.0).contains(&dropout) {
            bail!("dropout must be in [0, 1), got {dropout}");
        }
        let spec = Self {
            layers,
            num_features,
            dropout,
            width: default_width(),
            input_size: default_input_size(),
        };
        spec.net().validate()?;
        Ok(spec)
    }

    /// The training network's config.
    pub fn net(&self) -> NetConfig {
        NetConfig {
            layers: self.layers.clone(),
            num_features: self.num_features,
            dropout: self.dropout,
            width: self.width,
            input_size: self.input_size,
        }
    }

    /// The inference model's config (`IResNet` reads every width and input size).
    pub fn iresnet(&self) -> IResNetConfig {
        IResNetConfig {
            layers: self.layers.clone(),
            num_features: self.num_features,
            dropout: self.dropout,
            width: self.width,
            input_size: self.input_size,
            ..IResNetConfig::iresnet18()
        }
    }
}

/// A training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// ImageFolder directory, `*.rec` file, or folder holding `train.rec`.
    pub data: PathBuf,
    /// Output folder (checkpoints, metrics, config).
    pub out: PathBuf,
    /// Backbone architecture.
    pub backbone: BackboneSpec,
    /// Margin loss.
    pub loss: LossKind,
    /// Scale `s` of the margin head.
    pub scale: f64,
    /// Margin `m` of the margin head.
    pub margin: f64,
    /// Epochs to train.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Base learning rate (for batch 512 when `scale_lr`).
    pub lr: f64,
    /// Multiply `lr` by `batch_size / 512` (the reference's rule).
    pub scale_lr: bool,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (`None`: off).
    pub clip_grad_norm: Option<f64>,
    /// Epochs of linear warm-up (may be fractional).
    pub warmup_epochs: f64,
    /// Decay after the warm-up.
    pub decay: Decay,
    /// Augmentation.
    pub augment: AugmentConfig,
    /// Validation `.bin` evaluated after every epoch (model selection).
    pub val: Option<PathBuf>,
    /// Continue from the checkpoint in `out` when there is one.
    pub resume: bool,
    /// Seed of the data order and augmentation.
    pub seed: u64,
    /// Batches decoded ahead.
    pub prefetch: usize,
    /// Device: `cpu` or `cuda:N`.
    pub device: String,
    /// Epoch checkpoints kept (older ones are deleted; the best backbone is kept apart).
    pub keep_checkpoints: usize,
}

impl TrainConfig {
    /// The paper's recipe (CosFace s=64 m=0.35, SGD 0.1·B/512, momentum 0.9, wd 5e-4,
    /// clip 5, dropout 0.4, iresnet50) for `data` → `out`.
    pub fn new(data: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            data: data.into(),
            out: out.into(),
            backbone: BackboneSpec {
                layers: vec![3, 4, 14, 3],
                num_features: 512,
                dropout: 0.4,
                width: 64,
                input_size: 112,
            },
            loss: LossKind::CosFace,
            scale: 64.0,
            margin: 0.35,
            epochs: 40,
            batch_size: 128,
            lr: 0.1,
            scale_lr: true,
            momentum: 0.9,
            weight_decay: 5e-4,
            clip_grad_norm: Some(5.0),
            warmup_epochs: 1.0,
            decay: Decay::Cosine,
            augment: AugmentConfig::default(),
            val: None,
            resume: false,
            seed: 0,
            prefetch: 2,
            device: "cpu".into(),
            keep_checkpoints: 2,
        }
    }

    /// Sets the loss and its reference `s`, `m`.
    pub fn with_loss(mut self, loss: LossKind) -> Self {
        self.loss = loss;
        self.scale = loss.default_scale();
        self.margin = loss.default_margin();
        self
    }

    /// Learning rate the schedule peaks at.
    pub fn peak_lr(&self) -> f64 {
        if self.scale_lr {
            self.lr * self.batch_size as f64 / 512.0
        } else {
            self.lr
        }
    }

    /// Checks the settings that do not need the data.
    pub fn validate(&self) -> Result<()> {
        self.backbone.net().validate()?;
        self.augment.validate()?;
        if self.epochs == 0 {
            bail!("epochs must be at least 1");
        }
        if self.batch_size < 2 {
            bail!(
                "batch size must be at least 2 (BatchNorm), got {}",
                self.batch_size
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("learning rate must be positive, got {}", self.lr);
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs.is_finite()) {
            bail!(
                "warm-up epochs must be non-negative, got {}",
                self.warmup_epochs
            );
        }
        if self.keep_checkpoints == 0 {
            bail!("keep_checkpoints must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backbone_names_and_lists() {
        assert_eq!(
            BackboneSpec::parse("iresnet18", 512, 0.4).unwrap().layers,
            [2, 2, 2, 2]
        );
        let s = BackboneSpec::parse("1, 2,1,1", 64, 0.0).unwrap();
        assert_eq!(s.layers, [1, 2, 1, 1]);
        assert_eq!(s.iresnet().num_features, 64);
        assert!(BackboneSpec::parse("resnet9000", 512, 0.0).is_err());
        assert!(BackboneSpec::parse("1,1,1", 512, 0.0).is_err());
        assert!(BackboneSpec::parse("iresnet18", 512, 1.0).is_err());
    }

    #[test]
    fn config_round_trips_and_scales_lr() {
        let cfg = TrainConfig::new("data", "out").with_loss(LossKind::ArcFace);
        assert_eq!(cfg.margin, 0.5);
        assert!((cfg.peak_lr() - 0.025).abs() < 1e-12);
        let json = serde_json::to_string(&cfg).unwrap();
        let back: TrainConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cfg);
        cfg.validate().unwrap();
        let bad = TrainConfig {
            batch_size: 1,
            ..cfg
        };
        assert!(bad.validate().is_err());
    }
}
