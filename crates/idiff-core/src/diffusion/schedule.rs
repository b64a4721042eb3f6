//! The reference's linear β schedule (T = 1000, 1e-4 … 0.02, computed in f32).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Number of diffusion steps of the reference.
pub const T: usize = 1000;

/// Precomputed f32 schedule buffers, named as in the reference checkpoints.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// β_t.
    pub betas: Vec<f32>,
    /// α_t = 1 − β_t.
    pub alphas: Vec<f32>,
    /// ᾱ_t = ∏ α.
    pub alpha_bars: Vec<f32>,
}

impl Schedule {
    /// linspace(β_start, β_end, steps) in f32, then α and the cumulative product ᾱ in f32.
    pub fn linear(steps: usize, beta_start: f64, beta_end: f64) -> Self {
        let betas = linspace_f32(beta_start, beta_end, steps);
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let mut acc = 1.0f32;
        let alpha_bars = alphas
            .iter()
            .map(|a| {
                acc *= a;
                acc
            })
            .collect();
        Self {
            betas,
            alphas,
            alpha_bars,
        }
    }

    /// The released models' schedule: T = 1000, β from 1e-4 to 0.02.
    pub fn reference() -> Self {
        Self::linear(T, 1e-4, 0.02)
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// True when the schedule has no steps.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// σ_t = sqrt(β_t) of the ancestral sampler.
    pub fn sigma(&self, t: usize) -> f32 {
        self.betas[t].sqrt()
    }

    /// 1 / sqrt(α_t).
    pub fn sqrt_alpha_inv(&self, t: usize) -> f32 {
        1.0 / self.alphas[t].sqrt()
    }

    /// (1 − α_t) / sqrt(1 − ᾱ_t), the ε coefficient of the DDPM mean.
    pub fn eps_coefficient(&self, t: usize) -> f32 {
        (1.0 - self.alphas[t]) / (1.0 - self.alpha_bars[t]).sqrt()
    }

    /// The buffer with the given reference name, if this schedule defines it.
    fn buffer(&self, name: &str) -> Option<Vec<f32>> {
        let n = self.len();
        let v = match name {
            "betas" => self.betas.clone(),
            "alphas" => self.alphas.clone(),
            "alpha_bars" => self.alpha_bars.clone(),
            "sigmas" => (0..n).map(|t| self.sigma(t)).collect(),
            "sqrt_alphas_inv" => (0..n).map(|t| self.sqrt_alpha_inv(t)).collect(),
            "sqrt_alpha_bars" => self.alpha_bars.iter().map(|a| a.sqrt()).collect(),
            "sqrt_one_minus_alpha_bars" => {
                self.alpha_bars.iter().map(|a| (1.0 - a).sqrt()).collect()
            }
            "one_minus_alphas_over_sqrt_one_minus_alpha_bars" => {
                (0..n).map(|t| self.eps_coefficient(t)).collect()
            }
            _ => return None,
        };
        Some(v)
    }

    /// Names of the schedule buffers stored in the reference's EMA checkpoints.
    pub const BUFFER_NAMES: [&'static str; 8] = [
        "betas",
        "alphas",
        "sigmas",
        "sqrt_alphas_inv",
        "alpha_bars",
        "sqrt_alpha_bars",
        "sqrt_one_minus_alpha_bars",
        "one_minus_alphas_over_sqrt_one_minus_alpha_bars",
    ];

    /// Checks a buffer found in a checkpoint against this schedule (relative 1e-4), and
    /// refuses a mismatch naming the buffer, index and both values.
    pub fn check_buffer(&self, name: &str, stored: &Tensor, file: &str) -> Result<()> {
        let Some(expected) = self.buffer(name) else {
            return Ok(());
        };
        let stored: Vec<f32> = stored.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if stored.len() != expected.len() {
            bail!(
                "{file}: schedule buffer `{name}` has {} steps but the configured schedule has {}",
                stored.len(),
                expected.len()
            );
        }
        for (i, (s, e)) in stored.iter().zip(&expected).enumerate() {
            if (s - e).abs() > 1e-4 * e.abs().max(1e-6) {
                bail!(
                    "{file}: schedule buffer `{name}`[{i}] = {s} does not match the configured linear schedule ({e})"
                );
            }
        }
        Ok(())
    }
}

/// torch.linspace in f32: the first half counts up from `start`, the second down from `end`.
fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    #[test]
    fn endpoints_and_monotone() {
        let s = Schedule::reference();
        assert_eq!(s.len(), 1000);
        assert!((s.betas[0] - 1e-4).abs() < 1e-9);
        assert!((s.betas[999] - 0.02).abs() < 1e-9);
        assert!(s.alpha_bars.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn matches_buffers_stored_in_reference_checkpoint() {
        let Some(p) = fixture("unet_tiny_ema_averaged_model.ckpt") else {
            return;
        };
        let sd = crate::checkpoint::load_state_dict(&p).unwrap();
        let s = Schedule::reference();
        for name in Schedule::BUFFER_NAMES {
            let t = sd
                .tensors
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            s.check_buffer(name, t, "fixture").unwrap();
        }
        // A different schedule is refused.
        let other = Schedule::linear(1000, 1e-4, 0.03);
        assert!(other
            .check_buffer("betas", &sd.tensors["betas"], "f")
            .is_err());
    }
}
