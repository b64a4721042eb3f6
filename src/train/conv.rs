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

use candle_core::{
    CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor,
};
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
        if wcin != cin || k != k2 || stride == 0 || h + 2 * pad < k || w + 2 * pad < k {
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

    /// Source row/column of output position `o` at kernel offset `kk`, if inside.
    #[inline]
    fn src(&self, o: usize, kk: usize, limit: usize) -> Option<usize> {
        (o * self.stride + kk).checked_sub(self.pad).filter(|&i| i < limit)
    }

    /// `cols[(c·k + ky)·k + kx][oy·wo + ox] = x[c][oy·s + ky − p][ox·s + kx − p]` (0 outside).
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, p) = (self.k, self.pixels());
        for c in 0..self.cin {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut cols[((c * k + ky) * k + kx) * p..][..p];
                    for oy in 0..self.ho {
                        let out = &mut row[oy * self.wo..(oy + 1) * self.wo];
                        let Some(iy) = self.src(oy, ky, self.h) else {
                            out.fill(0.0);
                            continue;
                        };
                        let src = &plane[iy * self.w..(iy + 1) * self.w];
                        for (ox, v) in out.iter_mut().enumerate() {
                            *v = self.src(ox, kx, self.w).map_or(0.0, |ix| src[ix]);
                        }
                    }
                }
            }
        }
    }

    /// Adjoint of [`Geom::im2col`]: accumulates `cols` into `dx` (which must start at zero).
    fn col2im(&self, cols: &[f32], dx: &mut [f32]) {
        let (k, p) = (self.k, self.pixels());
        for c in 0..self.cin {
            let plane = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((c * k + ky) * k + kx) * p..][..p];
                    for oy in 0..self.ho {
                        let Some(iy) = self.src(oy, ky, self.h) else {
                            continue;
                        };
                        let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                        for (ox, v) in row[oy * self.wo..(oy + 1) * self.wo].iter().enumerate() {
                            if let Some(ix) = self.src(ox, kx, self.w) {
                                dst[ix] += v;
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
            .for_each_init(Vec::new, |cols, (y_b, x_b)| {
                let cols_b: &[f32] = if g.trivial_cols() {
                    x_b
                } else {
                    cols.resize(g.ckk() * g.pixels(), 0.0);
                    g.im2col(x_b, cols);
                    cols
                };
                matmul(g.cout, g.pixels(), g.ckk(), y_b, false, w, g.ckk(), 1, cols_b, g.pixels(), 1);
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
            .for_each_init(Vec::new, |cols, (dx_b, g_b)| {
                if g.trivial_cols() {
                    // dx_b = Wᵀ · g_b directly.
                    matmul(g.cin, g.pixels(), g.cout, dx_b, false, w, 1, g.ckk(), g_b, g.pixels(), 1);
                } else {
                    cols.resize(g.ckk() * g.pixels(), 0.0);
                    matmul(g.ckk(), g.pixels(), g.cout, cols, false, w, 1, g.ckk(), g_b, g.pixels(), 1);
                    g.col2im(cols, dx_b);
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
            return Err(Error::Msg("conv2d grad: input and gradient must be 4-d".into()));
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
                || (vec![0f32; wlen], Vec::new()),
                |(mut acc, mut cols), (x_b, g_b)| {
                    let cols_b: &[f32] = if g.trivial_cols() {
                        x_b
                    } else {
                        cols.resize(g.ckk() * g.pixels(), 0.0);
                        g.im2col(x_b, &mut cols);
                        &cols
                    };
                    // acc (Cout × CKK) += g_b (Cout × P) · cols_bᵀ (P × CKK).
                    matmul(g.cout, g.ckk(), g.pixels(), &mut acc, true, g_b, g.pixels(), 1, cols_b, 1, g.pixels());
                    (acc, cols)
                },
            )
            .map(|(acc, _)| acc)
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
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dOp { stride, pad: padding })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

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
            let (x, w) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap());
            let want = x.as_tensor().conv2d(w.as_tensor(), pad, stride, 1, 1).unwrap();
            let got = conv2d(x.as_tensor(), w.as_tensor(), stride, pad).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-4);
            let probe = Tensor::randn(0f32, 1., want.dims(), &dev).unwrap();
            let gw = (want * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gg = (got * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (gw.get(v.as_tensor()).unwrap(), gg.get(v.as_tensor()).unwrap());
                assert!(max_diff(a, b) < 1e-3, "k{k} s{stride} p{pad}: {}", max_diff(a, b));
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
