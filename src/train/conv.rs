//! A CPU 2-d convolution whose backward pass is as fast as its forward pass.
//!
//! candle 0.11's CPU conv2d backward computes the input gradient with a direct
//! `conv_transpose2d` (a dot product per output pixel) and the weight gradient as a
//! convolution whose kernel is the whole feature map; for an IResNet that is ~10× the cost
//! of the forward pass. Here forward and both gradients are per-image im2col + gemm
//! (parallel over the batch with rayon, single-threaded gemm inside):
//! - forward: `y_b = W · cols(x_b)`,
//! - input gradient: `dx_b = col2im(Wᵀ · g_b)`,
//! - weight gradient: `dW = Σ_b g_b · cols(x_b)ᵀ`.
//!
//! On other devices [`conv2d`] falls back to candle's own `conv2d` (which has a backward).
//! Only square kernels, no dilation, no groups, F32.

use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    b: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], wt: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, cin, h, w], &[cout, wcin, k, k2]) = (x, wt) else {
            return Err(Error::Msg(format!(
                "conv2d: input {x:?} and weight {wt:?} must both be 4-d"
            )));
        };
        if wcin != cin
            || k != k2
            || stride == 0
            || h == 0
            || w == 0
            || h + 2 * pad < k
            || w + 2 * pad < k
        {
            return Err(Error::Msg(format!(
                "conv2d: input {x:?} does not fit weight {wt:?} (stride {stride}, padding {pad})"
            )));
        }
        Ok(Self {
            b,
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad,
            ho: (h + 2 * pad - k) / stride + 1,
            wo: (w + 2 * pad - k) / stride + 1,
        })
    }

    fn ckk(&self) -> usize {
        self.cin * self.k * self.k
    }

    fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn out_len(&self) -> usize {
        self.cout * self.ho * self.wo
    }

    fn pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// True when the columns are the input itself (1×1, stride 1, no padding).
    fn trivial_cols(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    /// Source row of output row `o` at kernel offset `kk`, if inside the input.
    #[inline]
    fn src(&self, o: usize, kk: usize, limit: usize) -> Option<usize> {
        (o * self.stride + kk)
            .checked_sub(self.pad)
            .filter(|&i| i < limit)
    }

    /// Output columns `lo..hi` whose source column `ox·s + kx − p` lies inside the input.
    #[inline]
    fn valid_cols(&self, kx: usize) -> (usize, usize) {
        let s = self.stride;
        // ox·s + kx ≥ p  ⇔  ox ≥ ceil((p − kx) / s).
        let lo = self.pad.saturating_sub(kx).div_ceil(s).min(self.wo);
        // ox·s + kx − p ≤ w − 1  ⇔  ox ≤ (w − 1 + p − kx) / s.
        let hi = match (self.w - 1 + self.pad).checked_sub(kx) {
            Some(v) => (v / s + 1).min(self.wo),
            None => 0,
        };
        (lo, hi.max(lo))
    }

    /// `cols[(c·k + ky)·k + kx][oy·wo + ox] = x[c][oy·s + ky − p][ox·s + kx − p]` (0 outside).
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, p, s) = (self.k, self.pixels(), self.stride);
        for c in 0..self.cin {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut cols[((c * k + ky) * k + kx) * p..][..p];
                    let (lo, hi) = self.valid_cols(kx);
                    for oy in 0..self.ho {
                        let out = &mut row[oy * self.wo..(oy + 1) * self.wo];
                        let Some(iy) = self.src(oy, ky, self.h) else {
                            out.fill(0.0);
                            continue;
                        };
                        out[..lo].fill(0.0);
                        out[hi..].fill(0.0);
                        if lo < hi {
                            let start = iy * self.w + lo * s + kx - self.pad;
                            if s == 1 {
                                out[lo..hi].copy_from_slice(&plane[start..start + (hi - lo)]);
                            } else {
                                for (v, src) in
                                    out[lo..hi].iter_mut().zip(plane[start..].iter().step_by(s))
                                {
                                    *v = *src;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adjoint of [`Geom::im2col`]: accumulates `cols` into `dx` (which must start at zero).
    fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let (k, p, s) = (self.k, self.pixels(), self.stride);
        for c in 0..self.cin {
            let plane = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((c * k + ky) * k + kx) * p..][..p];
                    let (lo, hi) = self.valid_cols(kx);
                    if lo >= hi {
                        continue;
                    }
                    for oy in 0..self.ho {
                        let Some(iy) = self.src(oy, ky, self.h) else {
                            continue;
                        };
                        let src = &row[oy * self.wo + lo..oy * self.wo + hi];
                        let start = iy * self.w + lo * s + kx - self.pad;
                        if s == 1 {
                            for (d, v) in plane[start..start + (hi - lo)].iter_mut().zip(src) {
                                *d += v;
                            }
                        } else {
                            for (d, v) in plane[start..].iter_mut().step_by(s).zip(src) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst (m×n) = [dst +] a (m×k, strides) · b (k×n, strides)`; all row-major `dst`.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    debug_assert!(n == 0 || k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the slices cover every index gemm reads or writes (checked above in debug
    // builds and by construction in the callers: the strides describe dense matrices that
    // fit in the slices).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

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

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(Error::Msg(format!("conv2d: {what} must be F32")));
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(Error::Msg(format!("conv2d: {what} must be contiguous"))),
    }
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
        let (x, w) = (f32_slice(s1, l1, "input")?, f32_slice(s2, l2, "weight")?);
        let mut y = vec![0f32; g.b * g.out_len()];
        y.par_chunks_mut(g.out_len().max(1))
            .zip(x.par_chunks(g.in_len().max(1)))
            .for_each(|(y_b, x_b)| {
                let mut product = |cols: &[f32]| {
                    matmul(
                        g.cout,
                        g.pixels(),
                        g.ckk(),
                        y_b,
                        false,
                        w,
                        g.ckk(),
                        1,
                        cols,
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
            });
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
        let (gr, w) = (f32_slice(s1, l1, "gradient")?, f32_slice(s2, l2, "weight")?);
        let mut dx = vec![0f32; b * g.in_len()];
        dx.par_chunks_mut(g.in_len().max(1))
            .zip(gr.par_chunks(g.out_len().max(1)))
            .for_each(|(dx_b, g_b)| {
                if g.trivial_cols() {
                    // dx_b = Wᵀ · g_b directly.
                    matmul(
                        g.cin,
                        g.pixels(),
                        g.cout,
                        dx_b,
                        false,
                        w,
                        1,
                        g.ckk(),
                        g_b,
                        g.pixels(),
                        1,
                    );
                } else {
                    with_scratch(g.ckk() * g.pixels(), |cols| {
                        matmul(
                            g.ckk(),
                            g.pixels(),
                            g.cout,
                            cols,
                            false,
                            w,
                            1,
                            g.ckk(),
                            g_b,
                            g.pixels(),
                            1,
                        );
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
        let (x, gr) = (f32_slice(s1, l1, "input")?, f32_slice(s2, l2, "gradient")?);
        let wlen = g.cout * g.ckk();
        let dw = x
            .par_chunks(g.in_len().max(1))
            .zip(gr.par_chunks(g.out_len().max(1)))
            .fold(
                || vec![0f32; wlen],
                |mut acc, (x_b, g_b)| {
                    // acc (Cout × CKK) += g_b (Cout × P) · cols_bᵀ (P × CKK).
                    let mut product = |cols: &[f32]| {
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
