//! The settings the user edits in the left panel (plain data, saved in sessions).

use crate::diffusion::sampler::{SamplerKind, SamplingSettings};
use crate::pipeline::WeightPaths;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the pipeline's weights come from. A later `DefaultWeights` entry (the embedded
/// model) slots in here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WeightSource {
    /// Checkpoint files on disk.
    #[default]
    Files,
}

/// The Model panel's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelForm {
    /// Where weights come from.
    pub source: WeightSource,
    /// U-Net checkpoint path.
    pub unet: String,
    /// Optional U-Net config path.
    pub unet_config: String,
    /// VQ decoder checkpoint path.
    pub decoder: String,
    /// Optional VQ decoder config path.
    pub decoder_config: String,
    /// Face-recognition model path (used by later analysis features).
    pub fr_model: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
}

impl Default for ModelForm {
    fn default() -> Self {
        Self {
            source: WeightSource::Files,
            unet: String::new(),
            unet_config: String::new(),
            decoder: String::new(),
            decoder_config: String::new(),
            fr_model: String::new(),
            device: default_device().into(),
            dtype: "f32".into(),
        }
    }
}

/// `cuda:0` in builds with the `cuda` feature, else `cpu`.
pub fn default_device() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda:0"
    } else {
        "cpu"
    }
}

fn optional_path(s: &str) -> Option<PathBuf> {
    let t = s.trim();
    (!t.is_empty()).then(|| PathBuf::from(t))
}

impl ModelForm {
    /// The weight paths these fields describe.
    pub fn weight_paths(&self) -> WeightPaths {
        WeightPaths {
            unet: PathBuf::from(self.unet.trim()),
            unet_config: optional_path(&self.unet_config),
            decoder: PathBuf::from(self.decoder.trim()),
            decoder_config: optional_path(&self.decoder_config),
        }
    }
}

/// Where the identity list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum IdentitySourceKind {
    /// Uniform random identities from a seed.
    #[default]
    Random,
    /// A context file.
    File,
    /// Spherical interpolation between two identities of the current list.
    Interpolate,
    /// The face-recognition embedding of a face detected in a photo.
    Photo,
    /// New ProcFace identities embedded by the built-in FR model (for the built-in U-Net).
    Procface,
}

/// The Identities panel's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityForm {
    /// Selected source.
    pub kind: IdentitySourceKind,
    /// Number of random identities.
    pub count: usize,
    /// Seed of the random identities.
    pub seed: u64,
    /// Global index of the first random identity.
    pub first: usize,
    /// Context file path.
    pub file: String,
    /// First endpoint (row of the current list).
    pub from: usize,
    /// Second endpoint (row of the current list).
    pub to: usize,
    /// Interpolation steps including both ends.
    pub steps: usize,
    /// Give every interpolated identity the first endpoint's noise, so only the identity
    /// changes along the row.
    pub shared_noise: bool,
    /// Photo whose faces become identities.
    pub photo: String,
    /// Folder holding the ONNX detector, landmark and recognition models.
    pub models_dir: String,
    /// A face from a photo replaces the list instead of being appended to it.
    pub photo_replace: bool,
}

impl Default for IdentityForm {
    fn default() -> Self {
        Self {
            kind: IdentitySourceKind::Random,
            count: 8,
            seed: 0,
            first: 0,
            file: String::new(),
            from: 0,
            to: 1,
            steps: 6,
            shared_noise: true,
            photo: String::new(),
            models_dir: crate::onnx::models_dir().display().to_string(),
            photo_replace: false,
        }
    }
}

/// Sampler choice in the Sampling panel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SamplerChoice {
    /// Reference ancestral DDPM over all 1000 steps.
    Ddpm,
    /// DDIM with a chosen number of steps.
    #[default]
    Ddim,
}

/// Whether Run makes an identity grid or a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RunMode {
    /// Identities × samples.
    #[default]
    Grid,
    /// Identities × values of one setting, same noise.
    Sweep,
}

/// The setting a sweep varies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SweepParam {
    /// Guidance scale.
    #[default]
    Guidance,
    /// Context dropout probability.
    ContextDropout,
}

impl SweepParam {
    /// Short label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Guidance => "guidance",
            Self::ContextDropout => "context dropout",
        }
    }

    /// Allowed range of the parameter.
    pub fn range(self) -> std::ops::RangeInclusive<f64> {
        match self {
            Self::Guidance => 0.0..=5.0,
            Self::ContextDropout => 0.0..=0.9,
        }
    }
}

/// The Sampling panel's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingForm {
    /// Sampler.
    pub sampler: SamplerChoice,
    /// DDIM steps.
    pub steps: usize,
    /// DDIM eta.
    pub eta: f64,
    /// Guidance scale.
    pub guidance: f64,
    /// Inference-time context dropout.
    pub context_dropout: f64,
    /// Seed of the seed contract.
    pub seed: u64,
    /// Samples per identity (grid columns).
    pub per_identity: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Show the predicted x0 while sampling.
    pub live_preview: bool,
    /// Preview every this many steps.
    pub preview_every: usize,
    /// Grid or sweep.
    pub mode: RunMode,
    /// Swept setting.
    pub sweep_param: SweepParam,
    /// First sweep value.
    pub sweep_from: f64,
    /// Last sweep value.
    pub sweep_to: f64,
    /// Sweep columns.
    pub sweep_columns: usize,
    /// Identities (rows) in a sweep: the first N of the list.
    pub sweep_rows: usize,
    /// Sample index whose noise every sweep cell shares.
    pub sweep_sample: u64,
}

impl Default for SamplingForm {
    fn default() -> Self {
        Self {
            sampler: SamplerChoice::Ddim,
            steps: 25,
            eta: 0.0,
            guidance: 1.0,
            context_dropout: 0.0,
            seed: 0,
            per_identity: 4,
            batch_size: 16,
            live_preview: false,
            preview_every: 5,
            mode: RunMode::Grid,
            sweep_param: SweepParam::Guidance,
            sweep_from: 0.0,
            sweep_to: 3.0,
            sweep_columns: 6,
            sweep_rows: 4,
            sweep_sample: 0,
        }
    }
}

impl SamplingForm {
    /// The sampler settings of a plain run.
    pub fn settings(&self) -> SamplingSettings {
        SamplingSettings {
            sampler: match self.sampler {
                SamplerChoice::Ddpm => SamplerKind::Ddpm,
                SamplerChoice::Ddim => SamplerKind::Ddim {
                    steps: self.steps,
                    eta: self.eta,
                },
            },
            guidance: self.guidance,
            context_dropout: self.context_dropout,
            seed: self.seed,
        }
    }

    /// The K values of the sweep, evenly spaced from `sweep_from` to `sweep_to`.
    pub fn sweep_values(&self) -> Vec<f64> {
        let k = self.sweep_columns.max(1);
        if k == 1 {
            return vec![self.sweep_from];
        }
        (0..k)
            .map(|i| {
                self.sweep_from + (self.sweep_to - self.sweep_from) * i as f64 / (k - 1) as f64
            })
            .collect()
    }

    /// The settings of each sweep column.
    pub fn sweep_settings(&self) -> Vec<SamplingSettings> {
        self.sweep_values()
            .into_iter()
            .map(|v| {
                let mut s = self.settings();
                match self.sweep_param {
                    SweepParam::Guidance => s.guidance = v,
                    SweepParam::ContextDropout => s.context_dropout = v,
                }
                s
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_values_are_even_and_inclusive() {
        let f = SamplingForm {
            sweep_from: 0.0,
            sweep_to: 2.0,
            sweep_columns: 5,
            ..Default::default()
        };
        assert_eq!(f.sweep_values(), vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        let s = f.sweep_settings();
        assert_eq!(s[4].guidance, 2.0);
        assert_eq!(s[4].seed, f.seed);
    }

    #[test]
    fn empty_optional_paths_are_none() {
        let m = ModelForm {
            unet: " a.ckpt ".into(),
            ..Default::default()
        };
        let w = m.weight_paths();
        assert_eq!(w.unet, PathBuf::from("a.ckpt"));
        assert!(w.unet_config.is_none());
    }
}
