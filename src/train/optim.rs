//! SGD with momentum and weight decay (PyTorch semantics) and global gradient-norm clipping.
//!
//! For each parameter with a gradient `g` (after clipping):
//! `d = g + wd·w; buf = μ·buf + d` (`buf = d` on its first step); `w ← w − lr·buf`.
//! Clipping follows `torch.nn.utils.clip_grad_norm_`: with `n = ‖(g_1, …, g_k)‖₂` over all
//! gradients, every gradient is multiplied by `min(1, max_norm / (n + 1e-6))`.
//! Parameters without a gradient are skipped (no decay, no momentum update), like PyTorch.

use anyhow::{anyhow, bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// Hyper-parameters of [`Sgd`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Momentum μ (0.9 in the reference).
    pub momentum: f64,
    /// L2 weight decay added to the gradient (5e-4 in the reference).
    pub weight_decay: f64,
    /// Maximum global L2 norm of the gradients (5 in the reference); `None` disables it.
    pub clip_norm: Option<f64>,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 5e-4,
            clip_norm: Some(5.0),
        }
    }
}

/// What one [`Sgd::step`] saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Factor the gradients were scaled by (1 when not clipped).
    pub clip_scale: f64,
}

/// SGD over named variables, with momentum buffers that can be saved and restored.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<(String, Var)>,
    buffers: BTreeMap<String, Tensor>,
    cfg: SgdConfig,
}

impl Sgd {
    /// An optimiser over `params` (name, variable); names key the momentum buffers.
    pub fn new(params: Vec<(String, Var)>, cfg: SgdConfig) -> Result<Self> {
        if !(0.0..1.0).contains(&cfg.momentum) {
            bail!("momentum must be in [0, 1), got {}", cfg.momentum);
        }
        if cfg.weight_decay < 0.0 || !cfg.weight_decay.is_finite() {
            bail!(
                "weight decay must be non-negative, got {}",
                cfg.weight_decay
            );
        }
        if let Some(c) = cfg.clip_norm {
            if c.is_nan() || c <= 0.0 {
                bail!("gradient clip norm must be positive, got {c}");
            }
        }
        Ok(Self {
            params,
            buffers: BTreeMap::new(),
            cfg,
        })
    }

    /// The optimised variables.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Global L2 norm of the gradients of the optimised variables.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for (_, var) in &self.params {
            if let Some(g) = grads.get(var.as_tensor()) {
                sum += g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// One update with learning rate `lr`. Fails (leaving the weights unchanged) when the
    /// gradient norm is not finite.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepInfo> {
        let grad_norm = self.grad_norm(grads)?;
        if !grad_norm.is_finite() {
            bail!("gradient norm is {grad_norm}: the loss diverged (lower the learning rate)");
        }
        let clip_scale = match self.cfg.clip_norm {
            Some(max) => (max / (grad_norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let SgdConfig {
            momentum,
            weight_decay,
            ..
        } = self.cfg;
        for (name, var) in &self.params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Leaf gradients keep their backprop graph (and the forward activations it
            // references); the momentum buffer must not, or every step's graph is retained.
            let g = g.detach();
            let w = var.as_tensor().detach();
            let mut d = if clip_scale < 1.0 {
                (&g * clip_scale)?
            } else {
                g
            };
            if weight_decay != 0.0 {
                d = (d + (&w * weight_decay)?)?;
            }
            let buf = match self.buffers.get(name) {
                Some(b) if momentum != 0.0 => ((b * momentum)? + d)?,
                _ => d,
            };
            var.set(&(&w - (&buf * lr)?)?)?;
            if momentum != 0.0 {
                self.buffers.insert(name.clone(), buf);
            }
        }
        Ok(StepInfo {
            grad_norm,
            clip_scale,
        })
    }

    /// The momentum buffers by parameter name (absent until a parameter's first step).
    pub fn buffers(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// Restores momentum buffers; each must name an optimised variable of the same shape.
    pub fn set_buffers(&mut self, buffers: BTreeMap<String, Tensor>) -> Result<()> {
        for (name, buf) in &buffers {
            let (_, var) =
                self.params.iter().find(|(n, _)| n == name).ok_or_else(|| {
                    anyhow!("momentum buffer `{name}` names no trainable variable")
                })?;
            if buf.dims() != var.dims() {
                bail!(
                    "momentum buffer `{name}` has shape {:?}, variable has {:?}",
                    buf.dims(),
                    var.dims()
                );
            }
        }
        let device = self.params.first().map(|(_, v)| v.device().clone());
        self.buffers = buffers
            .into_iter()
            .map(|(k, v)| {
                let v = match &device {
                    Some(d) => v.to_device(d)?.to_dtype(DType::F32)?,
                    None => v,
                };
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f32>().unwrap() as f64
    }

    /// A tiny net `y = relu(w1 · x) · w2`, loss `(y − t)²`; two SGD steps (momentum,
    /// weight decay, clipping) against values worked out by hand in f64.
    #[test]
    fn two_steps_match_hand_computation() {
        let dev = Device::Cpu;
        let w1 = Var::new(&[1.5f32, -0.5], &dev).unwrap();
        let w2 = Var::new(2.0f32, &dev).unwrap();
        let x = Tensor::new(&[2.0f32, 1.0], &dev).unwrap();
        let target = 1.0;
        let cfg = SgdConfig {
            momentum: 0.9,
            weight_decay: 0.1,
            clip_norm: Some(5.0),
        };
        let mut opt = Sgd::new(
            vec![("w1".into(), w1.clone()), ("w2".into(), w2.clone())],
            cfg,
        )
        .unwrap();
        let lr = 0.01;

        // Hand computation in f64.
        let (mut a, mut b, mut c) = (1.5f64, -0.5f64, 2.0f64);
        let (mut ba, mut bb, mut bc) = (0.0, 0.0, 0.0);
        let mut norms = Vec::new();
        for step in 0..2 {
            let h = (a * 2.0 + b * 1.0).max(0.0);
            let y = h * c;
            let dy = 2.0 * (y - target);
            let (ga, gb, gc) = (dy * c * 2.0, dy * c * 1.0, dy * h);
            let n = (ga * ga + gb * gb + gc * gc).sqrt();
            norms.push(n);
            let s = (5.0 / (n + 1e-6)).min(1.0);
            let d = |g: f64, w: f64| g * s + 0.1 * w;
            let (da, db, dc) = (d(ga, a), d(gb, b), d(gc, c));
            if step == 0 {
                (ba, bb, bc) = (da, db, dc);
            } else {
                ba = 0.9 * ba + da;
                bb = 0.9 * bb + db;
                bc = 0.9 * bc + dc;
            }
            a -= lr * ba;
            b -= lr * bb;
            c -= lr * bc;
        }
        assert!(
            norms[0] > 5.0,
            "the first step must exercise clipping: {norms:?}"
        );

        for norm in &norms {
            let h = (w1.as_tensor() * &x)
                .unwrap()
                .sum_all()
                .unwrap()
                .relu()
                .unwrap();
            let y = (h * w2.as_tensor()).unwrap();
            let loss = (y - target).unwrap().sqr().unwrap();
            let grads = loss.backward().unwrap();
            let info = opt.step(&grads, lr).unwrap();
            assert!((info.grad_norm - norm).abs() < 1e-3 * norm);
        }
        let got = w1.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] as f64 - a).abs() < 1e-5, "{} vs {a}", got[0]);
        assert!((got[1] as f64 - b).abs() < 1e-5, "{} vs {b}", got[1]);
        assert!((scalar(w2.as_tensor()) - c).abs() < 1e-5);
        assert_eq!(opt.buffers().len(), 2);
        // Momentum buffers hold values only: a buffer that kept the step's backprop graph
        // would retain every step's activations (memory growing without bound).
        assert!(opt.buffers().values().all(|b| !b.track_op()));
    }

    #[test]
    fn variables_without_gradient_are_untouched() {
        let dev = Device::Cpu;
        let used = Var::new(&[1f32], &dev).unwrap();
        let unused = Var::new(&[3f32], &dev).unwrap();
        let mut opt = Sgd::new(
            vec![("u".into(), used.clone()), ("n".into(), unused.clone())],
            SgdConfig::default(),
        )
        .unwrap();
        let grads = used.as_tensor().sum_all().unwrap().backward().unwrap();
        opt.step(&grads, 0.1).unwrap();
        assert_eq!(unused.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
        assert!(!opt.buffers().contains_key("n"));
        let got = used.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - (1.0 - 0.1 * (1.0 + 5e-4))).abs() < 1e-6);
    }

    #[test]
    fn bad_settings_and_buffers_are_errors() {
        let dev = Device::Cpu;
        let v = Var::new(&[1f32, 2.], &dev).unwrap();
        let bad = SgdConfig {
            momentum: 1.5,
            ..SgdConfig::default()
        };
        assert!(Sgd::new(vec![("v".into(), v.clone())], bad).is_err());
        let mut opt = Sgd::new(vec![("v".into(), v)], SgdConfig::default()).unwrap();
        let wrong =
            BTreeMap::from([("v".to_string(), Tensor::zeros(3, DType::F32, &dev).unwrap())]);
        assert!(opt.set_buffers(wrong).is_err());
        let unknown =
            BTreeMap::from([("x".to_string(), Tensor::zeros(2, DType::F32, &dev).unwrap())]);
        assert!(opt.set_buffers(unknown).is_err());
    }
}
