//! Learning-rate schedule: linear warm-up, then cosine decay or step decay.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Decay after the warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Decay {
    /// `lr · ½(1 + cos(π · progress))` over the steps after the warm-up.
    #[default]
    Cosine,
    /// `lr · gamma^k`, `k` = number of `milestones` (epochs) already reached.
    Step {
        /// Epochs at which the rate is multiplied by `gamma`.
        milestones: Vec<usize>,
        /// Multiplier per milestone.
        gamma: f64,
    },
}

/// A schedule over a fixed number of optimiser steps.
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate (after warm-up, before decay).
    pub base_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// Total steps of the run.
    pub total_steps: usize,
    /// Steps per epoch (for step milestones).
    pub steps_per_epoch: usize,
    /// The decay after warm-up.
    pub decay: Decay,
}

impl LrSchedule {
    /// Checks the schedule.
    pub fn validate(&self) -> Result<()> {
        if !(self.base_lr > 0.0 && self.base_lr.is_finite()) {
            bail!("learning rate must be positive, got {}", self.base_lr);
        }
        if self.steps_per_epoch == 0 || self.total_steps == 0 {
            bail!("a schedule needs at least one step");
        }
        if let Decay::Step { gamma, .. } = &self.decay {
            if !(*gamma > 0.0 && *gamma <= 1.0) {
                bail!("step-decay gamma must be in (0, 1], got {gamma}");
            }
        }
        Ok(())
    }

    /// Learning rate of (0-based) optimiser step `step`.
    ///
    /// Warm-up: `base · (step + 1) / warmup_steps` for `step < warmup_steps`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match &self.decay {
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
                self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Decay::Step { milestones, gamma } => {
                let epoch = step / self.steps_per_epoch;
                let reached = milestones.iter().filter(|&&m| epoch >= m).count();
                self.base_lr * gamma.powi(reached as i32)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule {
            base_lr: 0.4,
            warmup_steps: 4,
            total_steps: 14,
            steps_per_epoch: 2,
            decay: Decay::Cosine,
        };
        s.validate().unwrap();
        assert_eq!(s.lr_at(0), 0.1);
        assert_eq!(s.lr_at(3), 0.4);
        assert!((s.lr_at(4) - 0.4).abs() < 1e-12);
        assert!((s.lr_at(9) - 0.2).abs() < 1e-12);
        assert!(s.lr_at(14) < 1e-12);
    }

    #[test]
    fn step_decay_by_epoch() {
        let s = LrSchedule {
            base_lr: 1.0,
            warmup_steps: 0,
            total_steps: 100,
            steps_per_epoch: 10,
            decay: Decay::Step {
                milestones: vec![3, 5],
                gamma: 0.1,
            },
        };
        assert_eq!(s.lr_at(29), 1.0);
        assert!((s.lr_at(30) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(55) - 0.01).abs() < 1e-12);
        let bad = LrSchedule {
            decay: Decay::Step {
                milestones: vec![],
                gamma: 2.0,
            },
            ..s
        };
        assert!(bad.validate().is_err());
    }
}
