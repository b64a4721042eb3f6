//! A CPU 2-d convolution whose backward pass is as fast as its forward pass.
//!
//! candle 0.11's CPU conv2d backward computes the input gradient with a direct
//! `conv_transpose2d` (a dot product per output pixel) and the weight gradient as a
//! convolution whose kernel is the whole feature map; for an IResNet that is ~10× the cost
//! of the forward pass. Here the forward pass is the packed convolution of
//! [`crate::kernels::conv`] and both gradients are per-image im2col + the same packed
//! matrix product (parallel over the batch with rayon, one thread per image):
//! - forward: `y_b = W · cols(x_b)`,
//! - input gradient: `dx_b = col2im(Wᵀ · g_b)`,
//! - weight gradient: `dW = Σ_b g_b · cols(x_b)ᵀ`.
//!
//! On other devices [`conv2d`] falls back to candle's own `conv2d` (which has a backward).
//! Only square kernels, no dilation, no groups, F32.

use crate::kernels::conv::{ConvWeights, Geom};
use crate::kernels::f32_values;
use crate::kernels::gemm::{gemm, matmul, Matrix, Output, PackedA};
use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

thread_local! {
    /// Per-thread im2col buffer, kept between calls so large columns are not re-mapped
    /// (and page-faulted) for every image.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer resized to `len` values (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            f(&mut buf[..len])
        }
        // Re-entered on the same thread (not expected): use a fresh buffer.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// Forward op: `(x, w) → y`.
#[derive(Debug, Clone, Copy)]
struct Conv2dOp {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "fast-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(l1.dims(), l2.dims(), self.stride, self.pad)?;
        let (x, w) = (
            f32_values(s1, l1, "conv2d: input")?,
            f32_values(s2, l2, "conv2d: weight")?,
        );
        let mut y = vec![0f32; g.b * g.out_len()];
        ConvWeights::from_slice(w, l2.dims(), None, self.stride, self.pad)?.run(
            x,
            l1.dims(),
            &mut y,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((g.b, g.cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
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
            &grad,
            &GradWeightOp {
                stride: self.stride,
                pad: self.pad,
                k,
            },
        )?;
        Ok((Some(dx), Some(dw)))
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
        let wlen = g.cout * g.ckk();
        let dw = x
            .par_chunks(g.in_len().max(1))
            .zip(gr.par_chunks(g.out_len().max(1)))
            .fold(
                || vec![0f32; wlen],
                |mut acc, (x_b, g_b)| {
                    // acc (Cout × CKK) += g_b (Cout × P) · cols_bᵀ (P × CKK).
                    let mut product = |cols: &[f32]| {
                        // One thread: the batch already runs in parallel.
                        matmul(
                            g.cout,
                            g.ckk(),
                            g.pixels(),
                            &mut acc,
                            true,
                            g_b,
                            g.pixels(),
                            1,
                            cols,
                            1,
                            g.pixels(),
                            1,
                        )
                    };
                    if g.trivial_cols() {
                        product(x_b);
                    } else {
                        with_scratch(g.ckk() * g.pixels(), |cols| {
                            g.im2col(x_b, cols);
                            product(cols);
                        });
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f32; wlen],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        Ok((CpuStorage::F32(dw), Shape::from(wdims.to_vec())))
    }
}

/// 2-d convolution of `x [B, Cin, H, W]` with `w [Cout, Cin, k, k]` (no bias), with the
/// fast CPU backward described in the module docs.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        Conv2dOp {
            stride,
            pad: padding,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::testutil::max_abs_diff as max_diff;

    #[test]
    fn forward_and_gradients_match_candle() {
        let dev = Device::Cpu;
        for (cin, cout, k, stride, pad, h) in [
            (3, 5, 3, 1, 1, 7),
            (4, 6, 3, 2, 1, 8),
            (4, 6, 1, 2, 0, 8),
            (5, 3, 1, 1, 0, 6),
            (2, 3, 3, 2, 0, 9),
        ] {
            // Non-square input: forward only (candle's own conv2d backward assumes square).
            let xr = Tensor::randn(0f32, 1., (2, cin, h, h + 3), &dev).unwrap();
            let wr = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev).unwrap();
            let want = xr.conv2d(&wr, pad, stride, 1, 1).unwrap();
            assert!(max_diff(&conv2d(&xr, &wr, stride, pad).unwrap(), &want) < 1e-4);
            let x0 = Tensor::randn(0f32, 1., (3, cin, h, h), &dev).unwrap();
            let w0 = Tensor::randn(0f32, 1., (cout, cin, k, k), &dev).unwrap();
            let (x, w) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&w0).unwrap(),
            );
            let want = x
                .as_tensor()
                .conv2d(w.as_tensor(), pad, stride, 1, 1)
                .unwrap();
            let got = conv2d(x.as_tensor(), w.as_tensor(), stride, pad).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-4);
            let probe = Tensor::randn(0f32, 1., want.dims(), &dev).unwrap();
            let gw = (want * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gg = (got * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w] {
                let (a, b) = (
                    gw.get(v.as_tensor()).unwrap(),
                    gg.get(v.as_tensor()).unwrap(),
                );
                assert!(
                    max_diff(a, b) < 1e-3,
                    "k{k} s{stride} p{pad}: {}",
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
        assert!(conv2d(&x, &w, 1, 1).is_err());
    }
}
