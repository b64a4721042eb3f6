//! Training utilities shared by the default-model trainers: a resumable AdamW, an
//! exponential moving average of weights, atomic safetensors writes and Ctrl-C handling.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The trainable variables of a [`VarMap`], sorted by name (a stable order for optimiser
/// state and tests).
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().map(|d| d.clone()).unwrap_or_default();
    let mut vars: Vec<(String, Var)> = data.into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Hyper-parameters of [`AdamW`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Runs `f` on the values of a contiguous F32 CPU tensor; `None` for any other tensor.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let values = crate::kernels::f32_values(cpu, layout, "optimiser tensor").ok()?;
    Some(f(values))
}

/// The per-step constants of an AdamW update, in single precision (a gradient scale or
/// decay of 1 leaves the values exactly as they are).
#[derive(Debug, Clone, Copy)]
struct AdamWStep {
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bias1: f32,
    inv_bias2: f32,
    eps: f32,
    decay: f32,
    lr: f32,
}

impl AdamWStep {
    /// `(θ', m', v')` from `θ`, the gradient `g` and the moments, element by element
    /// (vectorised).
    fn apply(&self, theta: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> [Vec<f32>; 3] {
        let n = theta.len();
        let (g, m, v) = (&g[..n], &m[..n], &v[..n]);
        let mut out = [
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        ];
        let [t1, m1, v1] = &mut out;
        let (t1, m1, v1) = (
            &mut t1.spare_capacity_mut()[..n],
            &mut m1.spare_capacity_mut()[..n],
            &mut v1.spare_capacity_mut()[..n],
        );
        let k = *self;
        crate::kernels::math::dispatch(
            #[inline(always)]
            || {
                for i in 0..n {
                    let g = g[i] * k.grad_scale;
                    let mi = m[i] * k.beta1 + g * k.one_minus_beta1;
                    let vi = v[i] * k.beta2 + (g * g) * k.one_minus_beta2;
                    let update = (mi * k.inv_bias1) / ((vi * k.inv_bias2).sqrt() + k.eps);
                    t1[i].write(theta[i] * k.decay - update * k.lr);
                    m1[i].write(mi);
                    v1[i].write(vi);
                }
            },
        );
        for o in &mut out {
            // SAFETY: the loop above wrote all `n` values of each output.
            unsafe { o.set_len(n) };
        }
        out
    }
}

/// AdamW whose moments can be saved and restored (candle's own optimiser hides them).
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates applied so far.
    pub step: usize,
    /// Hyper-parameters (the learning rate may be changed between steps).
    pub config: AdamWConfig,
}

impl AdamW {
    /// An optimiser over `vars` with zero moments.
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            config,
        })
    }

    /// The variables being optimised, with their names.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Global L2 norm of the gradients of the optimised variables.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let squares = |g: &Tensor| -> Result<f64> {
            let fused = with_values(g, |v| v.iter().map(|&x| f64::from(x) * f64::from(x)).sum());
            match fused {
                Some(sum) => Ok(sum),
                None => Ok(g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?),
            }
        };
        let mut total = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                total += squares(g)?;
            }
        }
        Ok(total.sqrt())
    }

    /// One update; gradients are scaled by `grad_scale` (for norm clipping). Variables without
    /// a gradient are left unchanged.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let k = AdamWStep {
            grad_scale: grad_scale as f32,
            beta1: c.beta1 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            inv_bias1: (1.0 / bc1) as f32,
            inv_bias2: (1.0 / bc2) as f32,
            eps: c.eps as f32,
            decay: (1.0 - c.lr * c.weight_decay) as f32,
            lr: c.lr as f32,
        };
        // One pass per variable on the CPU (variables in parallel); other tensors below.
        let fused: Vec<Option<[Vec<f32>; 3]>> = self
            .vars
            .par_iter()
            .zip(self.m.par_iter().zip(&self.v))
            .map(|((_, var), (m, v))| {
                let g = grads.get(var.as_tensor())?;
                with_values(var.as_tensor(), |th| {
                    with_values(g, |g| {
                        with_values(m, |m| with_values(v, |v| k.apply(th, g, m, v)))
                    })
                })
                .flatten()
                .flatten()
                .flatten()
            })
            .collect();
        for (i, ((_, var), new)) in self.vars.iter().zip(fused).enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            if let Some([theta, m, v]) = new {
                let (shape, dev) = (var.shape(), var.device());
                var.set(&Tensor::from_vec(theta, shape, dev)?)?;
                self.m[i] = Tensor::from_vec(m, shape, dev)?;
                self.v[i] = Tensor::from_vec(v, shape, dev)?;
                continue;
            }
            // Leaf gradients keep their backprop graph (and the forward activations it
            // references); the moments must not, or every step's graph is retained.
            let g = g.detach();
            let g = if grad_scale == 1.0 {
                g
            } else {
                (g * grad_scale)?
            };
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor().detach();
            let decayed = if c.weight_decay > 0.0 {
                (theta * (1.0 - c.lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            var.set(&(decayed - (update * c.lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments and step counter as named tensors (`adam.m.<name>`, `adam.v.<name>`,
    /// `adam.step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("adam.m.{name}"), self.m[i].clone());
            out.insert(format!("adam.v.{name}"), self.v[i].clone());
        }
        let dev = self.m.first().map_or(Device::Cpu, |t| t.device().clone());
        out.insert("adam.step".into(), Tensor::new(&[self.step as i64], &dev)?);
        Ok(out)
    }

    /// Restores moments and step counter saved by [`AdamW::state`]; missing moments stay
    /// zero, shape mismatches are refused.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (slot, key) in [(0, format!("adam.m.{name}")), (1, format!("adam.v.{name}"))] {
                if let Some(t) = state.get(&key) {
                    anyhow::ensure!(
                        t.dims() == var.dims(),
                        "optimiser state `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.dims()
                    );
                    let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
                    if slot == 0 {
                        self.m[i] = t;
                    } else {
                        self.v[i] = t;
                    }
                }
            }
        }
        if let Some(s) = state.get("adam.step") {
            self.step = s
                .to_dtype(DType::I64)?
                .to_vec1::<i64>()?
                .first()
                .copied()
                .unwrap_or(0) as usize;
        }
        Ok(())
    }
}

/// Exponential moving average of a set of variables.
pub struct Ema {
    shadow: Vec<(String, Tensor)>,
    /// Decay per update (e.g. 0.999).
    pub decay: f64,
}

impl Ema {
    /// Starts the average at the current values of `vars`.
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { shadow, decay })
    }

    /// `shadow ← decay·shadow + (1 − decay)·var`, with the decay warmed up as
    /// `min(decay, (1 + step) / (10 + step))`.
    pub fn update(&mut self, vars: &[(String, Var)], step: usize) -> Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        let (df, rest) = (d as f32, (1.0 - d) as f32);
        // One pass per tensor on the CPU (tensors in parallel); other tensors below.
        let fused: Vec<Option<Vec<f32>>> = self
            .shadow
            .par_iter()
            .zip(vars)
            .map(|((_, s), (_, v))| {
                with_values(s, |s| {
                    with_values(v.as_tensor(), |v| {
                        s.iter().zip(v).map(|(&s, &v)| s * df + v * rest).collect()
                    })
                })
                .flatten()
            })
            .collect();
        for (((_, s), (_, v)), new) in self.shadow.iter_mut().zip(vars).zip(fused) {
            *s = match new {
                Some(values) => Tensor::from_vec(values, s.shape(), s.device())?,
                None => ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?,
            };
        }
        Ok(())
    }

    /// The averaged weights by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shadow.iter().cloned().collect()
    }

    /// Replaces the averaged weights with saved ones (names that are absent stay as they are).
    pub fn load(&mut self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, s) in &mut self.shadow {
            if let Some(t) = saved.get(name) {
                anyhow::ensure!(
                    t.dims() == s.dims(),
                    "EMA tensor `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    s.dims()
                );
                *s = t.to_dtype(s.dtype())?.to_device(s.device())?;
            }
        }
        Ok(())
    }
}

/// Writes tensors as safetensors through a temporary file and a rename, so that readers never
/// see a half-written file.
pub fn save_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    crate::files::write_atomic_with(path, |tmp| {
        Ok(candle_core::safetensors::save(tensors, tmp)?)
    })
}

/// Copies the current values of `vars` into a name → tensor map (detached).
pub fn var_tensors(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

/// Sets `vars` from saved tensors; every variable must be present with the same shape.
pub fn load_vars(vars: &[(String, Var)], saved: &HashMap<String, Tensor>) -> Result<()> {
    for (name, var) in vars {
        let t = saved
            .get(name)
            .with_context(|| format!("checkpoint lacks `{name}`"))?;
        anyhow::ensure!(
            t.dims() == var.dims(),
            "checkpoint `{name}` has shape {:?}, the model {:?}",
            t.dims(),
            var.dims()
        );
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// A flag set by Ctrl-C (a second Ctrl-C exits at once). Installing the handler twice in one
/// process is harmless: the first handler's flag is not replaced, so callers share it.
pub fn cancel_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let _ = ctrlc::set_handler(move || {
            if f.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
        flag
    })
    .clone()
}

/// Names of the variables in `vars` that got no gradient (or an all-zero one) from `grads`.
pub fn vars_without_gradient(vars: &[(String, Var)], grads: &GradStore) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, var) in vars {
        match grads.get(var.as_tensor()) {
            None => missing.push(name.clone()),
            Some(g) => {
                let s = g
                    .abs()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                if s == 0.0 || !s.is_finite() {
                    missing.push(name.clone());
                }
            }
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Three AdamW steps on `loss = (w − 3)²` match the update written out by hand, and the
    /// moments hold values only (no backprop graph that would retain every step).
    #[test]
    fn adamw_matches_hand_computation_and_keeps_no_graph() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32], &dev).unwrap();
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.01,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], config).unwrap();
        let (mut x, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=3 {
            let loss = (w.as_tensor() - 3.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step_scaled(&grads, 1.0).unwrap();
            let g = 2.0 * (x - 3.0);
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            let update =
                (m / (1.0 - 0.9f64.powi(t))) / ((v / (1.0 - 0.999f64.powi(t))).sqrt() + 1e-8);
            x = x * (1.0 - 0.1 * 0.01) - 0.1 * update;
        }
        let got = w.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - x).abs() < 1e-5, "{got} vs {x}");
        let state = opt.state().unwrap();
        assert!(state.values().all(|t| !t.track_op()));
    }

    /// The EMA follows `s ← d·s + (1 − d)·θ` with the warmed-up decay.
    #[test]
    fn ema_matches_hand_computation() {
        let dev = Device::Cpu;
        let var = Var::new(&[[1.0f32, -2.0], [0.5, 4.0]], &dev).unwrap();
        let vars = vec![("a".to_string(), var.clone())];
        let mut ema = Ema::new(&vars, 0.999).unwrap();
        let mut want = [1.0f64, -2.0, 0.5, 4.0];
        for step in 0..3usize {
            let theta: Vec<f64> = (0..4)
                .map(|i| (i as f64 - 1.5) * (step + 2) as f64)
                .collect();
            let values: Vec<f32> = theta.iter().map(|&x| x as f32).collect();
            var.set(&Tensor::from_vec(values, (2, 2), &dev).unwrap())
                .unwrap();
            ema.update(&vars, step).unwrap();
            let d = 0.999f64.min((1.0 + step as f64) / (10.0 + step as f64));
            for (w, th) in want.iter_mut().zip(&theta) {
                *w = d * *w + (1.0 - d) * th;
            }
        }
        let got = ema.tensors()["a"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }
}
