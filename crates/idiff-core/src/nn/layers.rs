//! Drop-in `Conv2d`, `ConvTranspose2d`, `Linear`, `GroupNorm`, SiLU and GELU that are fast
//! on the CPU, for training and inference.
//!
//! Inference on F32 CPU tensors (no gradient tracked) runs on the packed kernels of
//! [`crate::kernels`], with each layer's weights packed on first use. Training: candle 0.11's
//! CPU backward of `conv2d` runs `conv_transpose2d`, a direct loop that is one to two orders
//! of magnitude slower than the forward GEMM, and `GroupNorm` is a chain of broadcast ops
//! each with its own backward (as are the backward passes of SiLU and GELU, and of a
//! broadcast bias). Whenever a gradient is being tracked on an F32 CPU tensor these use the
//! fused ops of [`crate::nn::conv`] (the packed convolution and transposed convolution, each
//! the other's gradient, bias included, and the packed weight gradient) and
//! [`crate::nn::fused`] (GroupNorm and activations: one op forward, one backward). Other
//! devices and dtypes run candle's own layers. Parameter names (`weight`, `bias`) and
//! initialisation are candle_nn's.
//!
//! [`TrainKernels::Composed`] selects candle's own ops everywhere (for training: convolution
//! as im2col from differentiable `narrow` + `cat` and one matmul, candle's GroupNorm, SiLU
//! and GELU), which `train-diffusion --bench-steps` times as the baseline.

use crate::kernels::conv::{ConvTransposeWeights, ConvWeights};
use crate::kernels::linear::LinearWeights;
use crate::kernels::math::{pointwise, Pointwise};
use crate::kernels::norm::{Epilogue, GroupNormWeights};
use crate::kernels::PackedCache;
use crate::nn::fused::{activation, group_norm as group_norm_op, Activation};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder};
use std::cell::Cell;

/// Which implementation trainable layers use on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainKernels {
    /// The fused ops with hand-written backward passes (the default).
    Fused,
    /// Composed from candle primitives (the baseline of the benchmark).
    Composed,
}

thread_local! {
    static KERNELS: Cell<TrainKernels> = const { Cell::new(TrainKernels::Fused) };
}

/// Runs `f` with trainable layers on this thread using `kernels`.
pub fn with_kernels<R>(kernels: TrainKernels, f: impl FnOnce() -> R) -> R {
    let previous = KERNELS.with(|k| k.replace(kernels));
    let out = f();
    KERNELS.with(|k| k.set(previous));
    out
}

/// The kernels trainable layers on this thread use.
pub fn current_kernels() -> TrainKernels {
    KERNELS.with(Cell::get)
}

/// Whether a layer with parameter `weight` (if any) applied to `x` takes the fused training
/// path: a gradient is tracked, on an F32 CPU tensor, with [`TrainKernels::Fused`].
fn fused(x: &Tensor, weight: Option<&Tensor>) -> bool {
    (x.track_op() || weight.is_some_and(Tensor::track_op))
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && current_kernels() == TrainKernels::Fused
}

/// `a + b` (same shapes): the vectorised kernel at inference, candle's add otherwise.
pub fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if packed_inference(a, b) && a.dims() == b.dims() {
        return crate::kernels::math::add(a, b);
    }
    a + b
}

/// SiLU (`x · σ(x)`), fused on the training path, vectorised at inference.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if packed_inference(x, x) {
        return pointwise(x, Pointwise::Silu);
    }
    if fused(x, None) {
        activation(x, Activation::Silu)
    } else {
        x.silu()
    }
}

/// GELU with the exact normal CDF, fused on the training path, vectorised at inference.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if packed_inference(x, x) {
        return pointwise(x, Pointwise::GeluErf);
    }
    if fused(x, None) {
        activation(x, Activation::GeluErf)
    } else {
        x.gelu_erf()
    }
}

/// Whether inference on `x` runs on the packed CPU kernels of [`crate::kernels`]: an F32
/// CPU tensor with no gradient tracked, and [`TrainKernels::Fused`] selected.
pub fn packed_inference(x: &Tensor, weight: &Tensor) -> bool {
    !x.track_op()
        && !weight.track_op()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && current_kernels() == TrainKernels::Fused
}

/// `weight · x_b + bias` at every position of a `(B, in, N)` sequence (weight `(out, in)` or
/// `(out, in, 1)`, bias `(out)`) as a 1×1 convolution with the fused training backward;
/// `None` when `x` is not on the fused training path.
pub fn fused_channels_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Option<Result<Tensor>> {
    if x.rank() != 3 || !fused(x, Some(weight)) {
        return None;
    }
    let run = || {
        let (out, inp) = (weight.dim(0)?, weight.dim(1)?);
        let w = weight.reshape((out, inp, 1, 1))?;
        crate::nn::conv::conv2d(&x.unsqueeze(3)?, &w, bias, 1, 0)?.squeeze(3)
    };
    Some(run())
}

/// Attention of `q (heads, d, Nq)` over `k`, `v (heads, d, Nk)` with scores `alpha·qᵀk`
/// as one op with a fused backward ([`crate::nn::attention`]); `None` when no gradient
/// is tracked or the tensors are not F32 on the CPU with [`TrainKernels::Fused`].
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, alpha: f64) -> Option<Result<Tensor>> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let cpu_f32 = [q, k, v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !tracked || !cpu_f32 || current_kernels() != TrainKernels::Fused {
        return None;
    }
    Some(crate::nn::attention::attention(q, k, v, alpha))
}

/// A 2-D convolution with candle's parameter names (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    packed: PackedCache<ConvWeights>,
}

/// Builds a [`Conv2d`] like `candle_nn::conv2d` (same names, shapes and initialisation).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d {
        inner: candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, vb)?,
        packed: PackedCache::default(),
    })
}

/// Builds a [`Conv2d`] without bias like `candle_nn::conv2d_no_bias`.
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d {
        inner: candle_nn::conv2d_no_bias(in_channels, out_channels, kernel_size, cfg, vb)?,
        packed: PackedCache::default(),
    })
}

impl Conv2d {
    /// The kernel `[c_out, c_in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[c_out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Padding, stride and friends.
    pub fn config(&self) -> &Conv2dConfig {
        self.inner.config()
    }
}

impl Conv2d {
    /// The convolution of `x`'s nearest-neighbour ×2 upsampling; on the packed inference
    /// path the upsampled image is read from `x` and never built.
    pub fn forward_upsampled2(&self, x: &Tensor) -> Result<Tensor> {
        let cfg = self.inner.config();
        let weight = self.inner.weight();
        if packed_inference(x, weight) && cfg.groups == 1 && cfg.dilation == 1 {
            return self.packed.with(
                weight,
                || ConvWeights::new(weight, self.inner.bias(), cfg.stride, cfg.padding),
                |p| p.forward_upsampled2(x),
            );
        }
        let (_, _, h, w) = x.dims4()?;
        self.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cfg = self.inner.config();
        let (weight, bias) = (self.inner.weight(), self.inner.bias());
        if cfg.groups != 1 || cfg.dilation != 1 {
            return self.inner.forward(x);
        }
        if packed_inference(x, weight) {
            return self.packed.with(
                weight,
                || ConvWeights::new(weight, bias, cfg.stride, cfg.padding),
                |p| p.forward(x),
            );
        }
        let training = x.track_op() || weight.track_op();
        if !training || !x.device().is_cpu() {
            return self.inner.forward(x);
        }
        if !fused(x, Some(weight)) {
            return im2col_conv(x, weight, bias, cfg.padding, cfg.stride);
        }
        crate::nn::conv::conv2d(x, weight, bias, cfg.stride, cfg.padding)
    }
}

/// A linear layer with candle's parameter names (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    packed: PackedCache<LinearWeights>,
}

/// Builds a [`Linear`] like `candle_nn::linear` (same names, shapes and initialisation).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear(in_dim, out_dim, vb)?,
        packed: PackedCache::default(),
    })
}

impl Linear {
    fn packed<R>(&self, f: impl FnOnce(&LinearWeights) -> Result<R>) -> Result<R> {
        let (w, b) = (self.inner.weight(), self.inner.bias());
        self.packed.with(w, || LinearWeights::new(w, b), f)
    }

    /// Applies the layer to `(B, in)`. At inference each row's result is independent of the
    /// other rows (on the CPU: the packed product, or one product per row), so an image's
    /// numbers do not depend on its batch; training takes one product for the batch.
    pub fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        if packed_inference(x, self.inner.weight()) {
            return self.packed(|p| p.forward_rows(x));
        }
        let b = x.dim(0)?;
        let training = x.track_op() || self.inner.weight().track_op();
        if b == 1 || !x.device().is_cpu() || training {
            return self.inner.forward(x);
        }
        let rows = (0..b)
            .map(|i| self.inner.forward(&x.narrow(0, i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }

    /// Applies the layer at every position of a `(B, in, N)` sequence → `(B, out, N)`.
    pub fn forward_channels(&self, x: &Tensor) -> Result<Tensor> {
        if packed_inference(x, self.inner.weight()) {
            return self.packed(|p| p.forward_channels(x));
        }
        if let Some(y) = fused_channels_linear(x, self.inner.weight(), self.inner.bias()) {
            return y;
        }
        self.inner
            .forward(&x.transpose(1, 2)?.contiguous()?)?
            .transpose(1, 2)
    }
}

impl Module for Linear {
    /// [`Linear::forward_rows`] for `(B, in)`, candle's layer for other shapes.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() == 2 {
            return self.forward_rows(x);
        }
        self.inner.forward(x)
    }
}

/// A transposed 2-d convolution with candle's parameter names (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    inner: candle_nn::ConvTranspose2d,
    packed: PackedCache<ConvTransposeWeights>,
}

/// Builds a [`ConvTranspose2d`] like `candle_nn::conv_transpose2d`.
pub fn conv_transpose2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: ConvTranspose2dConfig,
    vb: VarBuilder,
) -> Result<ConvTranspose2d> {
    Ok(ConvTranspose2d {
        inner: candle_nn::conv_transpose2d(in_channels, out_channels, kernel_size, cfg, vb)?,
        packed: PackedCache::default(),
    })
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cfg = self.inner.config();
        let (weight, bias) = (self.inner.weight(), self.inner.bias());
        if cfg.output_padding != 0 || cfg.dilation != 1 {
            return self.inner.forward(x);
        }
        if fused(x, Some(weight)) {
            return crate::nn::conv::conv_transpose2d(x, weight, bias, cfg.stride, cfg.padding);
        }
        if !packed_inference(x, weight) {
            return self.inner.forward(x);
        }
        self.packed.with(
            weight,
            || ConvTransposeWeights::new(weight, bias, cfg.stride, cfg.padding),
            |p| p.forward(x),
        )
    }
}

/// GroupNorm with candle's parameter names (`weight`, `bias`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    packed: PackedCache<GroupNormWeights>,
}

/// Builds a [`GroupNorm`] like `candle_nn::group_norm` (weight 1, bias 0).
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
    Ok(GroupNorm {
        inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
        weight,
        bias,
        groups,
        eps,
        packed: PackedCache::default(),
    })
}

impl GroupNorm {
    /// Normalises `x`, then applies `epilogue` (modulation, SiLU): one op on the packed
    /// inference path, composed ops otherwise.
    pub fn forward_with(&self, x: &Tensor, epilogue: &Epilogue) -> Result<Tensor> {
        if packed_inference(x, &self.weight) && x.rank() >= 2 {
            return self.packed.with(
                &self.weight,
                || GroupNormWeights::new(&self.weight, &self.bias, self.groups, self.eps),
                |p| p.forward(x, epilogue),
            );
        }
        let mut y = if !fused(x, Some(&self.weight)) || x.rank() < 3 {
            self.inner.forward(x)?
        } else {
            group_norm_op(x, &self.weight, &self.bias, self.groups, self.eps)?
        };
        if let Some((scale, shift)) = &epilogue.modulation {
            let mut shape = scale.dims().to_vec();
            shape.resize(x.rank(), 1);
            let (scale, shift) = (scale.reshape(shape.as_slice())?, shift.reshape(shape)?);
            y = y.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
        }
        if epilogue.silu {
            y = silu(&y)?;
        }
        Ok(y)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &Epilogue::default())
    }
}

/// `conv2d` as im2col + GEMM from differentiable primitives (the composed baseline).
pub fn im2col_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (c_out, c_in, kh, kw) = w.dims4()?;
    if c_in != c {
        candle_core::bail!("conv2d: input has {c} channels, kernel expects {c_in}");
    }
    let hp = h + 2 * padding;
    let wp = wd + 2 * padding;
    if hp < kh || wp < kw || stride == 0 {
        candle_core::bail!("conv2d: kernel {kh}x{kw} does not fit a {hp}x{wp} input");
    }
    let ho = (hp - kh) / stride + 1;
    let wo = (wp - kw) / stride + 1;
    // (C, B, Hp, Wp), padded; stride > 1 needs room for `stride * out` rows per offset.
    let mut xc = x.transpose(0, 1)?;
    let need_h = (kh - 1) + stride * ho;
    let need_w = (kw - 1) + stride * wo;
    let extra_h = need_h.saturating_sub(hp);
    let extra_w = need_w.saturating_sub(wp);
    if padding > 0 || extra_h > 0 {
        xc = xc.pad_with_zeros(2, padding, padding + extra_h)?;
    }
    if padding > 0 || extra_w > 0 {
        xc = xc.pad_with_zeros(3, padding, padding + extra_w)?;
    }
    let n = b * ho * wo;
    let mut cols = Vec::with_capacity(kh * kw);
    for dy in 0..kh {
        for dx in 0..kw {
            let mut s = xc.narrow(2, dy, stride * ho)?.narrow(3, dx, stride * wo)?;
            if stride > 1 {
                s = s
                    .reshape((c, b, ho, stride, wo, stride))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?;
            }
            cols.push(s.contiguous()?.reshape((c, 1, n))?);
        }
    }
    let cols = Tensor::cat(&cols, 1)?.reshape((c * kh * kw, n))?;
    let out = w.reshape((c_out, c * kh * kw))?.matmul(&cols)?; // (C_out, B·Ho·Wo)
    let out = out
        .reshape((c_out, b, ho, wo))?
        .transpose(0, 1)?
        .contiguous()?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::testutil::{max_abs, max_abs_diff as max_diff, probed_grads};

    #[test]
    fn matches_candle_conv2d_values_and_gradients() {
        let dev = Device::Cpu;
        for (k, pad, stride, h) in [(3, 1, 1, 9), (3, 0, 2, 9), (3, 1, 2, 8), (1, 0, 1, 5)] {
            let x = Var::randn(0f32, 1.0, (2, 4, h, h), &dev).unwrap();
            let w = Var::randn(0f32, 1.0, (6, 4, k, k), &dev).unwrap();
            let bias = Var::randn(0f32, 1.0, 6, &dev).unwrap();
            let ours = im2col_conv(
                x.as_tensor(),
                w.as_tensor(),
                Some(bias.as_tensor()),
                pad,
                stride,
            )
            .unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(w.as_tensor(), pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, 6, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-4);
            let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &bias] {
                let a = g_ours.get(v.as_tensor()).unwrap();
                let b = g_theirs.get(v.as_tensor()).unwrap();
                let scale = max_abs(b);
                assert!(
                    max_diff(a, b) <= 1e-4 * scale.max(1.0),
                    "k{k} p{pad} s{stride}"
                );
            }
        }
    }

    /// The fused 1×1 projection of a `(B, in, N)` sequence against candle's ops: values
    /// and the gradients of input, weight and bias; off the training path it declines.
    #[test]
    fn fused_channels_linear_matches_a_batched_matmul() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 5, 7), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (4, 5, 1), &dev).unwrap();
        let bias = Var::randn(0f32, 1.0, 4, &dev).unwrap();
        let ours = fused_channels_linear(x.as_tensor(), w.as_tensor(), Some(bias.as_tensor()))
            .expect("a tracked CPU input takes the fused path")
            .unwrap();
        // y_b = W · x_b + bias from candle's matmul and broadcast add (candle 0.11's `Conv1d`
        // has the right values but a wrong backward for batches of more than one sequence).
        let theirs = w
            .as_tensor()
            .squeeze(2)
            .unwrap()
            .broadcast_matmul(x.as_tensor())
            .unwrap()
            .broadcast_add(&bias.as_tensor().reshape((1, 4, 1)).unwrap())
            .unwrap();
        assert_eq!(ours.dims(), &[3, 4, 7]);
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let probe = Tensor::randn(0f32, 1.0, (3, 4, 7), &dev).unwrap();
        let g_ours = probed_grads(&ours, &probe);
        let g_theirs = probed_grads(&theirs, &probe);
        for v in [&x, &w, &bias] {
            let (a, b) = (
                g_ours.get(v.as_tensor()).unwrap(),
                g_theirs.get(v.as_tensor()).unwrap(),
            );
            assert!(
                max_diff(a, b) <= 1e-4 * max_abs(b).max(1.0),
                "{:?}",
                v.dims()
            );
        }
        let plain = x.as_tensor().detach();
        assert!(fused_channels_linear(&plain, &w.as_tensor().detach(), None).is_none());
    }
}
