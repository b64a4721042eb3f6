//! Training-mode BatchNorm and PReLU as fused CPU ops with hand-written backward passes.
//!
//! candle builds both from broadcast ops whose backward reduces over the broadcast
//! dimensions with slow strided reductions: for an IResNet on CPU that costs as much as the
//! convolutions. Here each is one forward op and one backward op over `[B, C, S]` data
//! (`S` = H·W, or 1 for `[B, C]` input), parallel over samples and channels:
//! - BatchNorm (batch statistics, biased variance in the normalisation):
//!   `x̂ = (x − μ_c)/√(σ²_c + ε)`, `y = γ_c x̂ + β_c`;
//!   `dx = γ_c/(N√(σ²_c+ε)) · (N·dy − Σdy − x̂·Σ(dy·x̂))`, `dγ_c = Σ dy·x̂`, `dβ_c = Σ dy`.
//!   The running statistics are updated like `nn.BatchNorm2d` (momentum 0.1, unbiased
//!   variance `σ²·N/(N−1)`).
//! - PReLU: `y = x` for `x > 0`, `a_c·x` otherwise; `dx = dy` or `a_c·dy`,
//!   `da_c = Σ_{x ≤ 0} dy·x`.
//!
//! Inference, and devices other than the CPU, use candle_nn's modules on the same
//! variables (names `weight`, `bias`, `running_mean`, `running_var`), so checkpoints are
//! unchanged.

use candle_core::{
    CpuStorage, CustomOp3, DType, Error, Layout, Module, ModuleT, Result, Shape, Tensor, Var,
};
use candle_nn::{BatchNorm, BatchNormConfig, PReLU, VarBuilder};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// BatchNorm momentum (PyTorch's default).
const MOMENTUM: f64 = 0.1;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(Error::Msg(format!("fused op: {what} must be F32")));
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(Error::Msg(format!("fused op: {what} must be contiguous"))),
    }
}

/// `(B, C, S)` of a `[B, C]` or `[B, C, H, W]` input.
fn bcs(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match dims {
        [b, c] => Ok((*b, *c, 1)),
        [b, c, h, w] => Ok((*b, *c, h * w)),
        _ => Err(Error::Msg(format!(
            "fused op: input must be [B, C] or [B, C, H, W], got {dims:?}"
        ))),
    }
}

/// Per-channel sums `Σ_n f(c, n·C·S + c·S .. + S)` in f64, parallel over channels; `f`
/// sums one contiguous run of `S` values of channel `c`.
fn channel_sums(
    (b, c, s): (usize, usize, usize),
    f: impl Fn(usize, std::ops::Range<usize>) -> f64 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..b)
                .map(|n| f(ch, (n * c + ch) * s..(n * c + ch + 1) * s))
                .sum()
        })
        .collect()
}

/// Batch mean and biased variance per channel, and `1/√(σ² + ε)`.
fn batch_stats(x: &[f32], dims: (usize, usize, usize), eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let count = (dims.0 * dims.2).max(1) as f64;
    let mean: Vec<f64> = channel_sums(dims, |_, r| x[r].iter().map(|&v| v as f64).sum::<f64>())
        .into_iter()
        .map(|v| v / count)
        .collect();
    let var: Vec<f64> = channel_sums(dims, |ch, r| {
        let m = mean[ch];
        x[r].iter()
            .map(|&v| {
                let d = v as f64 - m;
                d * d
            })
            .sum::<f64>()
    })
    .into_iter()
    .map(|v| v / count)
    .collect();
    let invstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    (mean, var, invstd)
}

/// Forward op `(x, γ, β) → y`; leaves `[mean…, var…]` in `stats`.
struct BnOp {
    eps: f64,
    stats: Arc<Mutex<Vec<f64>>>,
}

impl CustomOp3 for BnOp {
    fn name(&self) -> &'static str {
        "fused-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = bcs(l1.dims())?;
        let (_, c, s) = dims;
        let (x, g, bta) = (
            slice(s1, l1, "input")?,
            slice(s2, l2, "weight")?,
            slice(s3, l3, "bias")?,
        );
        if g.len() != c || bta.len() != c {
            return Err(Error::Msg(format!(
                "batch norm: {c} channels but weight/bias of {}/{}",
                g.len(),
                bta.len()
            )));
        }
        let (mean, var, invstd) = batch_stats(x, dims, self.eps);
        let scale: Vec<f32> = (0..c)
            .map(|ch| (g[ch] as f64 * invstd[ch]) as f32)
            .collect();
        let shift: Vec<f32> = (0..c)
            .map(|ch| (bta[ch] as f64 - mean[ch] * g[ch] as f64 * invstd[ch]) as f32)
            .collect();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut((c * s).max(1))
            .zip(x.par_chunks((c * s).max(1)))
            .for_each(|(y_n, x_n)| {
                for ch in 0..c {
                    let (a, b) = (scale[ch], shift[ch]);
                    for (yv, xv) in y_n[ch * s..(ch + 1) * s]
                        .iter_mut()
                        .zip(&x_n[ch * s..(ch + 1) * s])
                    {
                        *yv = a * xv + b;
                    }
                }
            });
        if let Ok(mut st) = self.stats.lock() {
            *st = mean.into_iter().chain(var).collect();
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let c = weight.elem_count();
        let flat = x.apply_op3_no_bwd(
            &weight.contiguous()?,
            &grad.contiguous()?,
            &BnBwdOp { eps: self.eps },
        )?;
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let dg = flat.narrow(0, n, c)?;
        let db = flat.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// Backward op `(x, γ, dy) → [dx (flat), dγ, dβ]`.
struct BnBwdOp {
    eps: f64,
}

impl CustomOp3 for BnBwdOp {
    fn name(&self) -> &'static str {
        "fused-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = bcs(l1.dims())?;
        let (_, c, s) = dims;
        let (x, g, dy) = (
            slice(s1, l1, "input")?,
            slice(s2, l2, "weight")?,
            slice(s3, l3, "gradient")?,
        );
        if dy.len() != x.len() || g.len() != c {
            return Err(Error::Msg("batch norm backward: shape mismatch".into()));
        }
        let (mean, _, invstd) = batch_stats(x, dims, self.eps);
        let sum_dy = channel_sums(dims, |_, r| dy[r].iter().map(|&v| v as f64).sum::<f64>());
        let sum_dy_xhat = channel_sums(dims, |ch, r| {
            let (m, is) = (mean[ch], invstd[ch]);
            dy[r.clone()]
                .iter()
                .zip(&x[r])
                .map(|(&g, &v)| g as f64 * (v as f64 - m) * is)
                .sum::<f64>()
        });
        let count = (dims.0 * s).max(1) as f64;
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, rest) = out.split_at_mut(x.len());
        dx.par_chunks_mut((c * s).max(1))
            .zip(x.par_chunks((c * s).max(1)))
            .zip(dy.par_chunks((c * s).max(1)))
            .for_each(|((dx_n, x_n), dy_n)| {
                for ch in 0..c {
                    let k = g[ch] as f64 * invstd[ch] / count;
                    let (m, is) = (mean[ch], invstd[ch]);
                    let (sd, sdx) = (sum_dy[ch], sum_dy_xhat[ch]);
                    let r = ch * s..(ch + 1) * s;
                    for ((d, &xv), &gv) in dx_n[r.clone()]
                        .iter_mut()
                        .zip(&x_n[r.clone()])
                        .zip(&dy_n[r])
                    {
                        let xhat = (xv as f64 - m) * is;
                        *d = (k * (count * gv as f64 - sd - xhat * sdx)) as f32;
                    }
                }
            });
        for ch in 0..c {
            rest[ch] = sum_dy_xhat[ch] as f32;
            rest[c + ch] = sum_dy[ch] as f32;
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// BatchNorm over `[B, C, H, W]` or `[B, C]` with the fused CPU training path.
#[derive(Debug, Clone)]
pub struct TrainBatchNorm {
    inner: BatchNorm,
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
}

impl TrainBatchNorm {
    /// Creates (or reuses) `weight`, `bias`, `running_mean`, `running_var` in `vb`, with
    /// candle_nn's init (1, 0, 0, 1).
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::batch_norm(channels, BatchNormConfig::from(eps), vb.clone())?;
        Ok(Self {
            inner,
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            running_mean: Var::from_tensor(&vb.get(channels, "running_mean")?)?,
            running_var: Var::from_tensor(&vb.get(channels, "running_var")?)?,
            eps,
        })
    }

    /// Batch statistics (updating the running ones) when `train`, running ones otherwise.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return self.inner.forward_t(x, train);
        }
        let (b, c, s) = bcs(x.dims())?;
        let stats = Arc::new(Mutex::new(Vec::new()));
        let y = x.contiguous()?.apply_op3(
            &self.weight,
            &self.bias,
            BnOp {
                eps: self.eps,
                stats: stats.clone(),
            },
        )?;
        let st = stats
            .lock()
            .map_err(|_| Error::Msg("batch norm statistics lock poisoned".into()))?
            .clone();
        if st.len() == 2 * c {
            let n = (b * s) as f64;
            let unbias = if n > 1.0 { n / (n - 1.0) } else { 1.0 };
            let dev = x.device();
            let mean = Tensor::from_vec(
                st[..c].iter().map(|&v| v as f32).collect::<Vec<_>>(),
                c,
                dev,
            )?;
            let var = Tensor::from_vec(
                st[c..]
                    .iter()
                    .map(|&v| (v * unbias) as f32)
                    .collect::<Vec<_>>(),
                c,
                dev,
            )?;
            let rm = ((self.running_mean.as_tensor() * (1.0 - MOMENTUM))? + (mean * MOMENTUM)?)?;
            let rv = ((self.running_var.as_tensor() * (1.0 - MOMENTUM))? + (var * MOMENTUM)?)?;
            self.running_mean.set(&rm)?;
            self.running_var.set(&rv)?;
        }
        Ok(y)
    }
}

/// Forward op `(x, a, unused) → y` of PReLU.
struct PreluOp;

impl CustomOp3 for PreluOp {
    fn name(&self) -> &'static str {
        "fused-prelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, s) = bcs(l1.dims())?;
        let (x, a) = (slice(s1, l1, "input")?, slice(s2, l2, "weight")?);
        if a.len() != c {
            return Err(Error::Msg(format!(
                "prelu: {c} channels but {} weights",
                a.len()
            )));
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut((c * s).max(1))
            .zip(x.par_chunks((c * s).max(1)))
            .for_each(|(y_n, x_n)| {
                for ch in 0..c {
                    let w = a[ch];
                    for (yv, &xv) in y_n[ch * s..(ch + 1) * s]
                        .iter_mut()
                        .zip(&x_n[ch * s..(ch + 1) * s])
                    {
                        *yv = if xv > 0.0 { xv } else { w * xv };
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _unused: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let c = a.elem_count();
        let flat = x.apply_op3_no_bwd(&a.contiguous()?, &grad.contiguous()?, &PreluBwdOp)?;
        let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
        let da = flat.narrow(0, n, c)?;
        Ok((Some(dx), Some(da), None))
    }
}

/// Backward op `(x, a, dy) → [dx (flat), da]`.
struct PreluBwdOp;

impl CustomOp3 for PreluBwdOp {
    fn name(&self) -> &'static str {
        "fused-prelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = bcs(l1.dims())?;
        let (_, c, s) = dims;
        let (x, a, dy) = (
            slice(s1, l1, "input")?,
            slice(s2, l2, "weight")?,
            slice(s3, l3, "gradient")?,
        );
        if dy.len() != x.len() || a.len() != c {
            return Err(Error::Msg("prelu backward: shape mismatch".into()));
        }
        let da = channel_sums(dims, |_, r| {
            x[r.clone()]
                .iter()
                .zip(&dy[r])
                .map(|(&v, &g)| if v > 0.0 { 0.0 } else { g as f64 * v as f64 })
                .sum::<f64>()
        });
        let mut out = vec![0f32; x.len() + c];
        let (dx, rest) = out.split_at_mut(x.len());
        dx.par_chunks_mut((c * s).max(1))
            .zip(x.par_chunks((c * s).max(1)))
            .zip(dy.par_chunks((c * s).max(1)))
            .for_each(|((dx_n, x_n), dy_n)| {
                for (ch, &w) in a.iter().enumerate() {
                    let r = ch * s..(ch + 1) * s;
                    for ((d, &xv), &gv) in dx_n[r.clone()]
                        .iter_mut()
                        .zip(&x_n[r.clone()])
                        .zip(&dy_n[r])
                    {
                        *d = if xv > 0.0 { gv } else { w * gv };
                    }
                }
            });
        for ch in 0..c {
            rest[ch] = da[ch] as f32;
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// PReLU with one weight per channel and the fused CPU path.
#[derive(Debug, Clone)]
pub struct TrainPrelu {
    inner: PReLU,
    weight: Tensor,
}

impl TrainPrelu {
    /// Creates (or reuses) `weight` (`[channels]`, init 0.25) in `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::prelu(Some(channels), vb.clone())?;
        Ok(Self {
            inner,
            weight: vb.get(channels, "weight")?,
        })
    }

    /// Applies PReLU.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 || !matches!(x.rank(), 2 | 4) {
            return self.inner.forward(x);
        }
        x.contiguous()?
            .apply_op3(&self.weight, &self.weight, PreluOp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    use crate::testutil::max_abs_diff as max_diff;

    /// Fused ops against candle_nn on the same variables: outputs, all gradients and the
    /// running-statistics update.
    #[test]
    fn match_candle_nn_forward_backward_and_running_stats() {
        let dev = Device::Cpu;
        for shape in [vec![3usize, 4, 5, 6], vec![5, 4]] {
            let (fused_vm, ref_vm) = (VarMap::new(), VarMap::new());
            let mk = |vm: &VarMap| VarBuilder::from_varmap(vm, DType::F32, &dev);
            let fbn = TrainBatchNorm::new(4, 1e-5, mk(&fused_vm).pp("bn")).unwrap();
            let fpr = TrainPrelu::new(4, mk(&fused_vm).pp("pr")).unwrap();
            let rbn = candle_nn::batch_norm(4, 1e-5, mk(&ref_vm).pp("bn")).unwrap();
            let rpr = candle_nn::prelu(Some(4), mk(&ref_vm).pp("pr")).unwrap();
            // Non-trivial affine parameters, identical in both maps.
            for vm in [&fused_vm, &ref_vm] {
                let d = vm.data().lock().unwrap();
                d["bn.weight"]
                    .set(&Tensor::new(&[1.5f32, 0.5, -1.0, 2.0], &dev).unwrap())
                    .unwrap();
                d["bn.bias"]
                    .set(&Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev).unwrap())
                    .unwrap();
                d["pr.weight"]
                    .set(&Tensor::new(&[0.25f32, -0.5, 0.1, 0.9], &dev).unwrap())
                    .unwrap();
            }
            let x = Var::from_tensor(
                &(Tensor::randn(0f32, 2., shape.as_slice(), &dev).unwrap() + 0.7).unwrap(),
            )
            .unwrap();
            let probe = Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap();
            let yf = fpr
                .forward(&fbn.forward_t(x.as_tensor(), true).unwrap())
                .unwrap();
            let yr = rpr
                .forward(&rbn.forward_t(x.as_tensor(), true).unwrap())
                .unwrap();
            assert!(max_diff(&yf, &yr) < 1e-4, "{shape:?} forward");
            let gf = (yf * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gr = (yr * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(
                max_diff(
                    gf.get(x.as_tensor()).unwrap(),
                    gr.get(x.as_tensor()).unwrap()
                ) < 1e-3
            );
            let (fd, rd) = (
                fused_vm.data().lock().unwrap(),
                ref_vm.data().lock().unwrap(),
            );
            for name in ["bn.weight", "bn.bias", "pr.weight"] {
                let (a, b) = (
                    gf.get(fd[name].as_tensor()).unwrap(),
                    gr.get(rd[name].as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(a, b) < 1e-3,
                    "{shape:?} d{name}: {}",
                    max_diff(a, b)
                );
            }
            for name in ["bn.running_mean", "bn.running_var"] {
                assert!(
                    max_diff(fd[name].as_tensor(), rd[name].as_tensor()) < 1e-5,
                    "{name}"
                );
            }
        }
    }
}
