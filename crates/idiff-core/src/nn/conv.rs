//! A CPU 2-d convolution whose backward pass is as fast as its forward pass.
//!
//! candle 0.11's CPU conv2d backward computes the input gradient with a direct
//! `conv_transpose2d` (a dot product per output pixel) and the weight gradient as a
//! convolution whose kernel is the whole feature map; for an IResNet that is ~10× the cost
//! of the forward pass. Here every pass is the packed matrix product of
//! [`crate::kernels::conv`] (parallel over images and output tiles):
//! - forward: `y_b = W · cols(x_b) + bias`,
//! - input gradient, stride 1: the convolution of `g_b` with the kernel transposed over
//!   channels and flipped in space (padding `k − 1 − p`); other strides:
//!   `dx_b = col2im(Wᵀ · g_b)`,
//! - weight gradient: `dW = Σ_b g_b · cols(x_b)ᵀ` over fixed groups of images (summed in
//!   order, so the result does not depend on the thread count), the transposed columns
//!   packed straight from channels-last copies of the inputs; bias gradient: the channel
//!   sums of `g`.
//!
//! On other devices [`conv2d`] falls back to candle's own `conv2d` (which has a backward).
//! Only square kernels, no dilation, no groups, F32.

use crate::kernels::conv::{ConvWeights, Geom, Im2colChannelsLastT};
use crate::kernels::gemm::{gemm, kernel_threads, Matrix, Output, PackedA};
use crate::kernels::{f32_values, transpose, with_thread_buffer};
use crate::nn::fused::channel_sum;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Groups of images whose weight gradients are summed apart, in parallel where threads are
/// free, then added in order.
const WEIGHT_GRAD_GROUPS: usize = 4;

thread_local! {
    /// Per-thread im2col buffer, kept between calls so large columns are not re-mapped
    /// (and page-faulted) for every image.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer resized to `len` values (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_thread_buffer(&SCRATCH, |buf| {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Forward op: `(x, w) → y`, or `(x, w, bias) → y` as [`CustomOp3`].
#[derive(Debug, Clone, Copy)]
struct Conv2dOp {
    stride: usize,
    pad: usize,
}

/// An op with weights whose backward pass is written out: its forward on contiguous values
/// (with an optional bias, one value per output channel) and the gradients of its input and
/// weight. [`WithBackward`] makes it a candle op; the bias gradient is the output
/// gradient's channel sums.
trait ConvPass: std::fmt::Debug + Copy + Send + Sync + 'static {
    /// Name of the op without and with bias.
    const NAMES: [&'static str; 2];

    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)>;

    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// A [`ConvPass`] as a candle op: [`CustomOp2`] without bias, [`CustomOp3`] with one.
#[derive(Debug, Clone, Copy)]
struct WithBackward<P>(P);

impl<P: ConvPass> CustomOp2 for WithBackward<P> {
    fn name(&self) -> &'static str {
        P::NAMES[0]
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.run((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.0.grads(x, w, &grad.contiguous()?)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl<P: ConvPass> CustomOp3 for WithBackward<P> {
    fn name(&self) -> &'static str {
        P::NAMES[1]
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
        let bias = f32_values(s3, l3, "bias")?;
        self.0.run((s1, l1), (s2, l2), Some(bias))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dx, dw) = self.0.grads(x, w, &grad)?;
        Ok((Some(dx), Some(dw), Some(channel_sum(&grad)?)))
    }
}

/// Applies `op` to contiguous copies of `x`, `w` and `bias`.
fn apply<P: ConvPass>(op: P, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, WithBackward(op)),
        None => x.apply_op2(&w, WithBackward(op)),
    }
}

impl ConvPass for Conv2dOp {
    const NAMES: [&'static str; 2] = ["fast-conv2d", "fast-conv2d-bias"];

    /// `y = conv(x, w) [+ bias]` on contiguous values.
    fn run(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_values(x, xl, "conv2d: input")?,
            f32_values(w, wl, "conv2d: weight")?,
        );
        let bias = bias.map(<[f32]>::to_vec);
        let conv = ConvWeights::from_slice(w, wl.dims(), bias, self.stride, self.pad)?;
        let (y, g) = conv.run_new(x, xl.dims())?;
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.cout, g.ho, g.wo))))
    }

    /// The gradients of input and weight.
    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, _, h, wd) = x.dims4()?;
        let dx = grad.apply_op2_no_bwd(
            &w.contiguous()?,
            &GradInputOp {
                stride: self.stride,
                pad: self.pad,
                h,
                w: wd,
            },
        )?;
        let k = w.dim(2)?;
        let dw = x.contiguous()?.apply_op2_no_bwd(
            grad,
            &GradWeightOp {
                stride: self.stride,
                pad: self.pad,
                k,
            },
        )?;
        Ok((dx, dw))
    }
}

/// `(grad [B, Cout, Ho, Wo], w) → dx [B, Cin, H, W]`.
#[derive(Debug, Clone, Copy)]
struct GradInputOp {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for GradInputOp {
    fn name(&self) -> &'static str {
        "fast-conv2d-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let &[b, cout, gho, gwo] = l1.dims() else {
            return Err(Error::Msg("conv2d grad: gradient must be 4-d".into()));
        };
        let wdims = l2.dims();
        let g = Geom::new(&[b, wdims[1], self.h, self.w], wdims, self.stride, self.pad)?;
        if (g.cout, g.ho, g.wo) != (cout, gho, gwo) {
            return Err(Error::Msg(format!(
                "conv2d grad: gradient {:?} does not match the forward output",
                l1.dims()
            )));
        }
        let (gr, w) = (
            f32_values(s1, l1, "conv2d: gradient")?,
            f32_values(s2, l2, "conv2d: weight")?,
        );
        if self.stride == 1 && self.pad < g.k {
            let (dx, _) = flipped_kernel(w, &g)?.run_new(gr, l1.dims())?;
            return Ok((CpuStorage::F32(dx), Shape::from((b, g.cin, g.h, g.w))));
        }
        let mut dx = vec![0f32; b * g.in_len()];
        // Wᵀ (ckk × cout), packed once for the batch.
        let wt = PackedA::new(w, g.ckk(), g.cout, 1, g.ckk());
        let n = g.pixels();
        dx.par_chunks_mut(g.in_len().max(1))
            .zip(gr.par_chunks(g.out_len().max(1)))
            .for_each(|(dx_b, g_b)| {
                let src = Matrix::new(g_b, n, 1);
                if g.trivial_cols() {
                    // dx_b = Wᵀ · g_b directly.
                    gemm(&wt, &src, n, Output::new(dx_b, n), false, None, 1);
                } else {
                    with_scratch(g.ckk() * n, |cols| {
                        gemm(&wt, &src, n, Output::new(cols, n), false, None, 1);
                        g.col2im(cols, dx_b);
                    });
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((b, g.cin, g.h, g.w))))
    }
}

/// `(x, grad) → dW [Cout, Cin, k, k]`.
#[derive(Debug, Clone, Copy)]
struct GradWeightOp {
    stride: usize,
    pad: usize,
    k: usize,
}

impl CustomOp2 for GradWeightOp {
    fn name(&self) -> &'static str {
        "fast-conv2d-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xd = l1.dims();
        let gd = l2.dims();
        if xd.len() != 4 || gd.len() != 4 {
            return Err(Error::Msg(
                "conv2d grad: input and gradient must be 4-d".into(),
            ));
        }
        let wdims = [gd[1], xd[1], self.k, self.k];
        let g = Geom::new(xd, &wdims, self.stride, self.pad)?;
        if gd != [g.b, g.cout, g.ho, g.wo] {
            return Err(Error::Msg(format!(
                "conv2d grad: gradient {gd:?} does not match the forward output"
            )));
        }
        let (x, gr) = (
            f32_values(s1, l1, "conv2d: input")?,
            f32_values(s2, l2, "conv2d: gradient")?,
        );
        let (ckk, cout, p) = (g.ckk(), g.cout, g.pixels());
        let wlen = cout * ckk;
        // dW (Cout × CKK) = Σ_b g_b (Cout × P) · cols_bᵀ (P × CKK): several images' gradients
        // side by side as one packed A; their transposed columns stacked as B, read from
        // channels-last copies of the inputs (columns in tap-major order, permuted at the end).
        // Fixed groups of images, each summed in order on one thread, then the groups in
        // order: the same gradient for any number of threads.
        let groups = g.b.clamp(1, WEIGHT_GRAD_GROUPS);
        let (hw, kk) = (g.h * g.w, g.k * g.k);
        let group = |i: usize| -> Vec<f32> {
            let mut acc = vec![0f32; wlen];
            let (first, end) = (i * g.b / groups, (i + 1) * g.b / groups);
            let n = end - first;
            let g_n = &gr[first * g.out_len()..end * g.out_len()];
            let a = PackedA::from_rows(cout, n * p, |o, j0, out| {
                let mut d = 0;
                while d < out.len() {
                    let (b, q) = ((j0 + d) / p, (j0 + d) % p);
                    let run = (p - q).min(out.len() - d);
                    out[d..d + run].copy_from_slice(&g_n[(b * cout + o) * p + q..][..run]);
                    d += run;
                }
            });
            with_scratch(n * g.in_len(), |x_last| {
                for (src, dst) in x[first * g.in_len()..end * g.in_len()]
                    .chunks_exact(g.in_len())
                    .zip(x_last.chunks_exact_mut(g.in_len()))
                {
                    transpose(src, g.cin, hw, dst);
                }
                let cols = Im2colChannelsLastT { g: &g, x: x_last };
                gemm(&a, &cols, ckk, Output::new(&mut acc, ckk), false, None, 1);
            });
            acc
        };
        let sums: Vec<Vec<f32>> = if kernel_threads() > 1 {
            (0..groups).into_par_iter().map(group).collect()
        } else {
            (0..groups).map(group).collect()
        };
        let mut sums = sums.into_iter();
        let mut dw = sums.next().unwrap_or_else(|| vec![0f32; wlen]);
        for part in sums {
            dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
        }
        // Columns (ky·k + kx)·cin + c → c·k² + ky·k + kx.
        let mut permuted = vec![0f32; wlen];
        for (src, dst) in dw.chunks_exact(ckk).zip(permuted.chunks_exact_mut(ckk)) {
            transpose(src, kk, g.cin, dst);
        }
        let dw = permuted;
        Ok((CpuStorage::F32(dw), Shape::from(wdims.to_vec())))
    }
}

/// `w [Cout, Cin, k, k]` transposed over channels and flipped in space: the kernel
/// `[Cin, Cout, k, k]` whose stride-1 convolution with padding `k − 1 − p` of a gradient
/// `[B, Cout, Ho, Wo]` is the input gradient `[B, Cin, H, W]`.
fn flipped_kernel(w: &[f32], g: &Geom) -> Result<ConvWeights> {
    let (k, kk, cin) = (g.k, g.k * g.k, g.cin);
    if w.len() != g.cout * cin * kk {
        return Err(Error::Msg(
            "conv2d grad: weight does not fit the geometry".into(),
        ));
    }
    // Row c, column o·k² + t of the flipped kernel is w[o][c][k² − 1 − t], packed as read.
    let packed = PackedA::from_rows(cin, g.cout * kk, |c, p0, out| {
        let (mut o, mut t) = (p0 / kk, p0 % kk);
        for v in out.iter_mut() {
            *v = w[(o * cin + c) * kk + kk - 1 - t];
            t += 1;
            if t == kk {
                (o, t) = (o + 1, 0);
            }
        }
    });
    ConvWeights::from_packed(packed, [cin, g.cout, k, k], 1, k - 1 - g.pad)
}

/// 2-d convolution of `x [B, Cin, H, W]` with `w [Cout, Cin, k, k]` and an optional `bias
/// [Cout]`, with the fast CPU backward described in the module docs.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let op = Conv2dOp {
        stride,
        pad: padding,
    };
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    apply(op, x, w, bias)
}

/// Transposed convolution `(x [B, Cin, H, W], w [Cin, Cout, k, k]) → y [B, Cout, Ho, Wo]`
/// with `Ho = (H − 1)·stride − 2·pad + k`: the input gradient of the convolution by `w`, so
/// its own gradients are that convolution (for `x`) and its weight gradient with the roles
/// of input and output gradient exchanged (for `w`).
#[derive(Debug, Clone, Copy)]
struct ConvTranspose2dOp {
    stride: usize,
    pad: usize,
}

impl ConvPass for ConvTranspose2dOp {
    const NAMES: [&'static str; 2] = ["fast-conv-transpose2d", "fast-conv-transpose2d-bias"];

    fn run(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[_, _, h, wd], &[_, _, k, _]) = (xl.dims(), wl.dims()) else {
            return Err(Error::Msg(
                "conv_transpose2d: input and weight must both be 4-d".into(),
            ));
        };
        let grow = |n: usize| ((n.max(1) - 1) * self.stride + k).checked_sub(2 * self.pad);
        let (Some(ho), Some(wo)) = (grow(h), grow(wd)) else {
            return Err(Error::Msg(format!(
                "conv_transpose2d: input {:?} too small for kernel {k} with padding {}",
                xl.dims(),
                self.pad
            )));
        };
        if bias.is_some_and(|b| Some(&b.len()) != wl.dims().get(1)) {
            return Err(Error::Msg(format!(
                "conv_transpose2d: bias of {} values for weight {:?}",
                bias.map_or(0, <[f32]>::len),
                wl.dims()
            )));
        }
        let op = GradInputOp {
            stride: self.stride,
            pad: self.pad,
            h: ho,
            w: wo,
        };
        let (y, shape) = op.cpu_fwd(x, xl, w, wl)?;
        let Some(bias) = bias else {
            return Ok((y, shape));
        };
        let CpuStorage::F32(mut y) = y else {
            return Err(Error::Msg("conv_transpose2d: F32 only".into()));
        };
        let plane = ho * wo;
        for (i, chunk) in y.chunks_exact_mut(plane.max(1)).enumerate() {
            let beta = bias[i % bias.len()];
            chunk.iter_mut().for_each(|v| *v += beta);
        }
        Ok((CpuStorage::F32(y), shape))
    }

    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let conv = WithBackward(Conv2dOp {
            stride: self.stride,
            pad: self.pad,
        });
        let w = w.contiguous()?;
        let dx = grad.apply_op2_no_bwd(&w, &conv)?;
        let dw = grad.apply_op2_no_bwd(
            &x.contiguous()?,
            &GradWeightOp {
                stride: self.stride,
                pad: self.pad,
                k: w.dim(2)?,
            },
        )?;
        Ok((dx, dw))
    }
}

/// `conv_transpose2d(x, w) [+ bias]` (no output padding, no dilation) with the backward pass
/// above on F32 CPU tensors; candle's own op elsewhere.
pub fn conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        let y = x.conv_transpose2d(w, padding, 0, stride, 1)?;
        return match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let op = ConvTranspose2dOp {
        stride,
        pad: padding,
    };
    apply(op, x, w, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and the gradients of input, weight and bias against candle's
    /// conv_transpose2d (the U-Net's ×2 upsampling and a stride-1 case).
    #[test]
    fn transposed_convolution_and_gradients_match_candle() {
        let dev = Device::Cpu;
        for (b, cin, cout, k, stride, pad, h) in [
            (3, 5, 4, 4, 2, 1, 6),
            (2, 3, 6, 3, 2, 1, 5),
            (2, 4, 3, 3, 1, 1, 7),
        ] {
            let x = Var::randn(0f32, 1., (b, cin, h, h), &dev).unwrap();
            let w = Var::randn(0f32, 1., (cin, cout, k, k), &dev).unwrap();
            let bias = Var::randn(0f32, 1., cout, &dev).unwrap();
            let want = x
                .as_tensor()
                .conv_transpose2d(w.as_tensor(), pad, 0, stride, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let got = conv_transpose2d(
                x.as_tensor(),
                w.as_tensor(),
                Some(bias.as_tensor()),
                stride,
                pad,
            )
            .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-4, "k{k} s{stride}");
            let probe = Tensor::randn(0f32, 1., want.dims(), &dev).unwrap();
            let gw = probed_grads(&want, &probe);
            let gg = probed_grads(&got, &probe);
            for v in [&x, &w, &bias] {
                let (a, e) = (
                    gg.get(v.as_tensor()).unwrap(),
                    gw.get(v.as_tensor()).unwrap(),
                );
                assert!(max_diff(a, e) < 1e-3, "k{k} s{stride}: {}", max_diff(a, e));
            }
        }
    }

    use crate::testutil::{max_abs_diff as max_diff, probed_grads};

    /// Values and the gradients of input, weight and bias against candle's conv2d, for the
    /// flipped-kernel input gradient (stride 1) and the col2im one (stride 2), for one image
    /// and for a batch whose weight gradient sums groups of different sizes.
    #[test]
    fn forward_and_gradients_match_candle() {
        let dev = Device::Cpu;
        for case in [
            (3, 5, 3, 1, 1, 7),
            (4, 6, 3, 2, 1, 8),
            (4, 6, 1, 2, 0, 8),
            (5, 3, 1, 1, 0, 6),
            (2, 3, 3, 2, 0, 9),
            (2, 3, 3, 1, 0, 9),
        ]
        .into_iter()
        .flat_map(|case| [(1, case), (7, case)])
        {
            let (b, (cin, cout, k, stride, pad, h)) = case;
            // Non-square input: forward only (candle's own conv2d backward assumes square).
            let xr = Tensor::randn(0f32, 1., (2, cin, h, h + 3), &dev).unwrap();
            let wr = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev).unwrap();
            let want = xr.conv2d(&wr, pad, stride, 1, 1).unwrap();
            assert!(max_diff(&conv2d(&xr, &wr, None, stride, pad).unwrap(), &want) < 1e-4);
            let x0 = Tensor::randn(0f32, 1., (b, cin, h, h), &dev).unwrap();
            let w0 = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev).unwrap();
            let (x, w) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&w0).unwrap(),
            );
            let bias = Var::randn(0f32, 1., cout, &dev).unwrap();
            let want = x
                .as_tensor()
                .conv2d(w.as_tensor(), pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let got = conv2d(
                x.as_tensor(),
                w.as_tensor(),
                Some(bias.as_tensor()),
                stride,
                pad,
            )
            .unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-4);
            let probe = Tensor::randn(0f32, 1., want.dims(), &dev).unwrap();
            let gw = probed_grads(&want, &probe);
            let gg = probed_grads(&got, &probe);
            for v in [&x, &w, &bias] {
                let (a, b) = (
                    gw.get(v.as_tensor()).unwrap(),
                    gg.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(a, b) < 1e-3,
                    "b{b} k{k} s{stride} p{pad}: {}",
                    max_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 5, 5), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((2, 4, 3, 3), DType::F32, &dev).unwrap();
        assert!(conv2d(&x, &w, None, 1, 1).is_err());
    }
}
