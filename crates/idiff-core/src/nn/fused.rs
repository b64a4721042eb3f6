//! Training-mode BatchNorm, PReLU and GroupNorm as fused CPU ops with hand-written backward
//! passes.
//!
//! candle builds them from broadcast ops whose backward reduces over the broadcast
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
//! - GroupNorm (statistics per sample and group of channels, as `nn.GroupNorm`): the same
//!   formulas with the group's `C/G · S` values in place of the channel's `N · S`.
//!
//! Inference, and devices other than the CPU, use candle_nn's modules on the same
//! variables (names `weight`, `bias`, `running_mean`, `running_var`), so checkpoints are
//! unchanged.

use crate::kernels::f32_values;
use crate::kernels::math::{self, map_into, map_parts, zip_map_into};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Error, Layout, Module, ModuleT, Result,
    Shape, Tensor, Var,
};
use candle_nn::{BatchNorm, BatchNormConfig, PReLU, VarBuilder};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// BatchNorm momentum (PyTorch's default).
const MOMENTUM: f64 = 0.1;

/// `(B, C, S)` of a `[B, C]` (S = 1) or `[B, C, …]` input (S = the product of the rest).
fn bcs(dims: &[usize]) -> Result<(usize, usize, usize)> {
    match dims {
        [b, c, rest @ ..] => Ok((*b, *c, rest.iter().product())),
        _ => Err(Error::Msg(format!(
            "fused op: input must be [B, C, …], got {dims:?}"
        ))),
    }
}

/// Gradients of a normalisation's input, weight and bias.
type AffineGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Splits a backward op's flat output `[dx…, dγ (c values), dβ (c values)]` into `dx`
/// (shaped like `x`) and the two parameter gradients.
fn split_affine_grads(flat: &Tensor, x: &Tensor, c: usize) -> Result<AffineGrads> {
    let n = x.elem_count();
    let dx = flat.narrow(0, 0, n)?.reshape(x.shape())?;
    Ok((
        Some(dx),
        Some(flat.narrow(0, n, c)?),
        Some(flat.narrow(0, n + c, c)?),
    ))
}

/// `y = f(c, x)` elementwise over `[B, C, S]` data (`c` the channel of each value),
/// parallel over samples.
fn map_channels(
    x: &[f32],
    (c, s): (usize, usize),
    f: impl Fn(usize, f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    let run = (c * s).max(1);
    y.par_chunks_mut(run)
        .zip(x.par_chunks(run))
        .for_each(|(y_n, x_n)| {
            for ch in 0..c {
                let r = ch * s..(ch + 1) * s;
                for (yv, &xv) in y_n[r.clone()].iter_mut().zip(&x_n[r]) {
                    *yv = f(ch, xv);
                }
            }
        });
    y
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
            f32_values(s1, l1, "fused op: input")?,
            f32_values(s2, l2, "fused op: weight")?,
            f32_values(s3, l3, "fused op: bias")?,
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
        let y = map_channels(x, (c, s), |ch, xv| scale[ch] * xv + shift[ch]);
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
    ) -> Result<AffineGrads> {
        let flat = x.apply_op3_no_bwd(
            &weight.contiguous()?,
            &grad.contiguous()?,
            &BnBwdOp { eps: self.eps },
        )?;
        split_affine_grads(&flat, x, weight.elem_count())
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
            f32_values(s1, l1, "fused op: input")?,
            f32_values(s2, l2, "fused op: weight")?,
            f32_values(s3, l3, "fused op: gradient")?,
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
        let (x, a) = (
            f32_values(s1, l1, "fused op: input")?,
            f32_values(s2, l2, "fused op: weight")?,
        );
        if a.len() != c {
            return Err(Error::Msg(format!(
                "prelu: {c} channels but {} weights",
                a.len()
            )));
        }
        let y = map_channels(x, (c, s), |ch, xv| crate::kernels::math::prelu(xv, a[ch]));
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
            f32_values(s1, l1, "fused op: input")?,
            f32_values(s2, l2, "fused op: weight")?,
            f32_values(s3, l3, "fused op: gradient")?,
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
                        *d = (if xv > 0.0 { 1.0 } else { w }) * gv;
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

/// `Σ f(i)` over `0..n` in f64, in eight interleaved partial sums (so that it vectorises;
/// the same order on every instruction set).
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        for (j, l) in lanes.iter_mut().enumerate() {
            *l += f(i + j);
        }
    }
    let tail: f64 = (full..n).map(&f).sum();
    lanes.iter().sum::<f64>() + tail
}

/// Mean and `1/√(σ² + ε)` (biased variance) of one group's values, in f64.
fn group_stats(x: &[f32], eps: f64) -> (f64, f64) {
    let n = x.len().max(1) as f64;
    crate::kernels::math::dispatch(
        #[inline(always)]
        || {
            let mean = lane_sum(x.len(), |i| f64::from(x[i])) / n;
            let var = lane_sum(x.len(), |i| {
                let d = f64::from(x[i]) - mean;
                d * d
            }) / n;
            (mean, 1.0 / (var + eps).sqrt())
        },
    )
}

/// Checks a GroupNorm's geometry; returns `(B, C, S, channels per group)`.
fn gn_geometry(
    dims: &[usize],
    groups: usize,
    params: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (b, c, s) = bcs(dims)?;
    if groups == 0 || c % groups != 0 || params != c {
        return Err(Error::Msg(format!(
            "group norm: {c} channels, {groups} groups, {params} weights"
        )));
    }
    Ok((b, c, s, c / groups))
}

/// Forward op `(x, γ, β) → y` of GroupNorm (statistics per sample and group of
/// `C / groups` consecutive channels): `y = γ_c (x − μ_g)/√(σ²_g + ε) + β_c`.
struct GnOp {
    groups: usize,
    eps: f64,
}

impl CustomOp3 for GnOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
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
        let (x, g, bta) = (
            f32_values(s1, l1, "fused op: input")?,
            f32_values(s2, l2, "fused op: weight")?,
            f32_values(s3, l3, "fused op: bias")?,
        );
        let (_, _, s, cpg) = gn_geometry(l1.dims(), self.groups, g.len())?;
        if bta.len() != g.len() {
            return Err(Error::Msg(
                "group norm: weight and bias differ in length".into(),
            ));
        }
        let run = (cpg * s).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(run)
            .zip(x.par_chunks(run))
            .enumerate()
            .for_each(|(i, (y_g, x_g))| {
                let (mean, invstd) = group_stats(x_g, self.eps);
                let first = (i % self.groups) * cpg;
                for k in 0..cpg {
                    let a = g[first + k] as f64 * invstd;
                    let (a, b) = (a as f32, (bta[first + k] as f64 - mean * a) as f32);
                    for (yv, &xv) in y_g[k * s..(k + 1) * s]
                        .iter_mut()
                        .zip(&x_g[k * s..(k + 1) * s])
                    {
                        *yv = a * xv + b;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<AffineGrads> {
        let flat = x.apply_op3_no_bwd(
            &weight.contiguous()?,
            &grad.contiguous()?,
            &GnBwdOp {
                groups: self.groups,
                eps: self.eps,
            },
        )?;
        split_affine_grads(&flat, x, weight.elem_count())
    }
}

/// Backward op `(x, γ, dy) → [dx (flat), dγ, dβ]` of GroupNorm: with `x̂` the normalised
/// input and `d = γ_c dy`, `dx = (d − mean_g(d) − x̂ · mean_g(d · x̂)) / √(σ²_g + ε)`,
/// `dγ_c = Σ dy · x̂`, `dβ_c = Σ dy`.
struct GnBwdOp {
    groups: usize,
    eps: f64,
}

impl CustomOp3 for GnBwdOp {
    fn name(&self) -> &'static str {
        "fused-group-norm-backward"
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
        let (x, g, dy) = (
            f32_values(s1, l1, "fused op: input")?,
            f32_values(s2, l2, "fused op: weight")?,
            f32_values(s3, l3, "fused op: gradient")?,
        );
        let (_, c, s, cpg) = gn_geometry(l1.dims(), self.groups, g.len())?;
        if dy.len() != x.len() {
            return Err(Error::Msg("group norm backward: shape mismatch".into()));
        }
        let run = (cpg * s).max(1);
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, rest) = out.split_at_mut(x.len());
        // Per group: its channels' partial dγ and dβ, summed over the batch below.
        let partials: Vec<(usize, Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(run)
            .zip(x.par_chunks(run))
            .zip(dy.par_chunks(run))
            .enumerate()
            .map(|(i, ((dx_g, x_g), dy_g))| {
                let (mean, invstd) = group_stats(x_g, self.eps);
                let first = (i % self.groups) * cpg;
                // Per channel: Σ dy and Σ dy·x, then dβ = Σ dy, dγ = (Σ dy·x − μ Σ dy)/σ.
                let (mut dg, mut db) = (vec![0f64; cpg], vec![0f64; cpg]);
                crate::kernels::math::dispatch(
                    #[inline(always)]
                    || {
                        for k in 0..cpg {
                            let (xs, gs) = (&x_g[k * s..(k + 1) * s], &dy_g[k * s..(k + 1) * s]);
                            let sum_g = lane_sum(s, |j| f64::from(gs[j]));
                            let sum_gx = lane_sum(s, |j| f64::from(gs[j]) * f64::from(xs[j]));
                            db[k] = sum_g;
                            dg[k] = (sum_gx - mean * sum_g) * invstd;
                        }
                    },
                );
                let count = x_g.len().max(1) as f64;
                let sum_d: f64 = (0..cpg).map(|k| f64::from(g[first + k]) * db[k]).sum();
                let sum_dx: f64 = (0..cpg).map(|k| f64::from(g[first + k]) * dg[k]).sum();
                let (mean_d, mean_dx) = (sum_d / count, sum_dx / count);
                // dx = (γ dy − mean_d − x̂ mean_dx)/σ = a_k dy + b x + c, in single precision.
                let b = -mean_dx * invstd * invstd;
                let c = (mean * mean_dx * invstd - mean_d) * invstd;
                let (b, c) = (b as f32, c as f32);
                crate::kernels::math::dispatch(
                    #[inline(always)]
                    || {
                        for k in 0..cpg {
                            let a = (f64::from(g[first + k]) * invstd) as f32;
                            let r = k * s..(k + 1) * s;
                            let (xs, gs, ds) = (&x_g[r.clone()], &dy_g[r.clone()], &mut dx_g[r]);
                            for j in 0..s {
                                ds[j] = a * gs[j] + b * xs[j] + c;
                            }
                        }
                    },
                );
                (first, dg, db)
            })
            .collect();
        let (dgamma, dbeta) = rest.split_at_mut(c);
        let (mut sg, mut sb) = (vec![0f64; c], vec![0f64; c]);
        for (first, dg, db) in partials {
            for k in 0..cpg {
                sg[first + k] += dg[k];
                sb[first + k] += db[k];
            }
        }
        for ch in 0..c {
            dgamma[ch] = sg[ch] as f32;
            dbeta[ch] = sb[ch] as f32;
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Applies GroupNorm to a contiguous-able `[B, C, …]` F32 CPU tensor with the fused op
/// (differentiable in `x`, `weight` and `bias`).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(weight, bias, GnOp { groups, eps })
}

/// A pointwise activation with a fused CPU forward and backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · σ(x)`.
    Silu,
    /// `x · Φ(x)` with the exact (erf) normal CDF.
    GeluErf,
}

/// Forward op `x → f(x)`.
struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "fused-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "fused op: input")?;
        let y = map_parts(x, 1, |_, xs, ys| match self.0 {
            Activation::Silu => map_into(xs, ys, math::silu),
            Activation::GeluErf => map_into(xs, ys, math::gelu_erf),
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &ActivationBwdOp(self.0),
        )?))
    }
}

/// Backward op `(x, dy) → dy · f'(x)`.
struct ActivationBwdOp(Activation);

impl CustomOp2 for ActivationBwdOp {
    fn name(&self) -> &'static str {
        "fused-activation-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (
            f32_values(s1, l1, "fused op: input")?,
            f32_values(s2, l2, "fused op: gradient")?,
        );
        if x.len() != dy.len() {
            return Err(Error::Msg("activation backward: shape mismatch".into()));
        }
        let dx = map_parts(x, 1, |first, xs, ds| {
            let dy = &dy[first..first + ds.len()];
            match self.0 {
                Activation::Silu => zip_map_into(xs, dy, ds, |x, g| g * math::silu_derivative(x)),
                Activation::GeluErf => {
                    zip_map_into(xs, dy, ds, |x, g| g * math::gelu_erf_derivative(x))
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Applies `activation` to an F32 CPU tensor with the fused op (differentiable).
pub fn activation(x: &Tensor, activation: Activation) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActivationOp(activation))
}

/// `[B, C, S] → [C]`: the sum over samples and positions of each channel.
struct ChannelSumOp;

impl CustomOp1 for ChannelSumOp {
    fn name(&self) -> &'static str {
        "fused-channel-sum"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, s) = bcs(l.dims())?;
        let g = f32_values(st, l, "fused op: gradient")?;
        let sums = channel_sums((b, c, s), |_, r| {
            g[r].iter().map(|&v| v as f64).sum::<f64>()
        });
        Ok((
            CpuStorage::F32(sums.into_iter().map(|v| v as f32).collect()),
            Shape::from(c),
        ))
    }
}

/// `[B, C, …] → [C]`: the sum of each channel over samples and positions (no gradient).
pub fn channel_sum(x: &Tensor) -> Result<Tensor> {
    let (b, c, s) = bcs(x.dims())?;
    x.contiguous()?
        .reshape((b, c, s))?
        .apply_op1_no_bwd(&ChannelSumOp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    use crate::testutil::{max_abs_diff as max_diff, probed_grads};

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
            let gf = probed_grads(&yf, &probe);
            let gr = probed_grads(&yr, &probe);
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

    /// The fused GroupNorm against candle_nn's on the same parameters: output and the
    /// gradients of input, weight and bias, for 4-d and 3-d inputs and several group counts.
    #[test]
    fn group_norm_matches_candle_nn_forward_and_backward() {
        let dev = Device::Cpu;
        for shape in [vec![2usize, 8, 3, 5], vec![3, 8, 7]] {
            for groups in [1, 4, 8] {
                let x = Var::randn(0.5f32, 2.0, shape.as_slice(), &dev).unwrap();
                let w = Var::randn(1f32, 0.5, 8, &dev).unwrap();
                let b = Var::randn(0f32, 0.5, 8, &dev).unwrap();
                let ours =
                    group_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), groups, 1e-5).unwrap();
                let reference = candle_nn::GroupNorm::new(
                    w.as_tensor().clone(),
                    b.as_tensor().clone(),
                    8,
                    groups,
                    1e-5,
                )
                .unwrap();
                let theirs = reference.forward(x.as_tensor()).unwrap();
                assert!(max_diff(&ours, &theirs) < 1e-4, "{shape:?} g{groups}");
                let probe = Tensor::randn(0f32, 1., shape.as_slice(), &dev).unwrap();
                let (go, gt) = (probed_grads(&ours, &probe), probed_grads(&theirs, &probe));
                for v in [&x, &w, &b] {
                    let (a, e) = (
                        go.get(v.as_tensor()).unwrap(),
                        gt.get(v.as_tensor()).unwrap(),
                    );
                    assert!(
                        max_diff(a, e) < 1e-3,
                        "{shape:?} g{groups}: {}",
                        max_diff(a, e)
                    );
                }
            }
        }
        let x = Tensor::zeros((2, 6, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones(6, DType::F32, &dev).unwrap();
        let err = group_norm(&x, &w, &w, 4, 1e-5).unwrap_err().to_string();
        assert!(err.contains("6 channels, 4 groups"), "{err}");
    }

    /// Fused SiLU and GELU (erf) against candle's ops (values and gradients), and the channel
    /// sums.
    #[test]
    fn activations_and_channel_sums_match_candle() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3.0, (2, 5, 3, 4), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1., (2, 5, 3, 4), &dev).unwrap();
        let grad_of =
            |y: &Tensor, v: &Var| probed_grads(y, &probe).get(v.as_tensor()).unwrap().clone();
        for (act, theirs) in [
            (Activation::Silu, x.as_tensor().silu().unwrap()),
            (Activation::GeluErf, x.as_tensor().gelu_erf().unwrap()),
        ] {
            let ours = activation(x.as_tensor(), act).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-5, "{act:?}");
            let diff = max_diff(&grad_of(&ours, &x), &grad_of(&theirs, &x));
            assert!(diff < 1e-4, "{act:?} gradient: {diff}");
        }
        let sums = channel_sum(x.as_tensor()).unwrap();
        let want = x.as_tensor().sum((0, 2, 3)).unwrap();
        assert_eq!(sums.dims(), &[5]);
        assert!(max_diff(&sums, &want) < 1e-4);
    }
}
