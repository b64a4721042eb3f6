//! Element-wise maths for the kernels, vectorised: `exp`, SiLU, GELU (erf) and a row
//! softmax, written branch-free so that the compiler vectorises them, and compiled once per
//! instruction set ([`super::gemm::Simd`]). Every element goes through the same IEEE
//! operations on every path (no fused multiply–add is formed), so the results are the same
//! bits everywhere.

use super::f32_values;
use super::gemm::{active_simd, kernel_threads, Simd};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `eˣ` to within 2 ulp for `x` in [−87, 88] (clamped outside: 0 and a large finite value).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // 2ⁿ from the exponent bits: n + 127 ∈ [1, 254] lands in the low mantissa bits of
    // n + 127 + 2²³, and the shift drops the bits above it (no float → int conversion, which
    // would not vectorise).
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    p * scale
}

/// `x · σ(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `erf(x)` to within 6e-7 (Abramowitz & Stegun 7.1.26, whose 1.5e-7 grows by the rounding
/// of single precision, with `exp` above).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let v = 1.0 - y * exp(-a * a);
    v.copysign(x)
}

/// `x · Φ(x)` with the exact normal CDF.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    (erf(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// `d/dx [x · σ(x)] = σ(x) · (1 + x · (1 − σ(x)))`.
#[inline(always)]
pub fn silu_derivative(x: f32) -> f32 {
    let s = 1.0 / (1.0 + exp(-x));
    s * (1.0 + x * (1.0 - s))
}

/// `d/dx [x · Φ(x)] = Φ(x) + x · φ(x)`.
#[inline(always)]
pub fn gelu_erf_derivative(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp(-0.5 * x * x) * 0.398_942_3;
    cdf + x * pdf
}

/// Runs `f` compiled for the active instruction set (the body must be `#[inline(always)]`
/// code so that it is vectorised inside each wrapper).
#[inline]
pub fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match active_simd() {
            // SAFETY: the active instruction set is one this CPU supports.
            Simd::Avx512 => return unsafe { avx512(f) },
            Simd::Avx2 => return unsafe { avx2(f) },
            Simd::Portable => {}
        }
    }
    f()
}

/// Elements from which an element-wise pass is split over the kernel threads.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// Runs `f(first, part)` on consecutive parts of `y` whose lengths are multiples of `unit`
/// (`first` = index of the part's first element), on all kernel threads when `y` is long
/// enough, else at once on this thread. Every element sees the same operations either way.
pub(crate) fn for_each_part<T: Send>(y: &mut [T], unit: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let unit = unit.max(1);
    let threads = kernel_threads();
    if threads > 1 && y.len() >= PARALLEL_ELEMENTS && y.len() > unit {
        let units = y.len().div_ceil(unit);
        let part = units.div_ceil(threads) * unit;
        y.par_chunks_mut(part)
            .enumerate()
            .for_each(|(i, chunk)| f(i * part, chunk));
    } else {
        f(0, y);
    }
}

/// A new vector `y` of `x.len()` values written part by part (parts as in
/// [`for_each_part`]) by `f(first, x_part, y_part)`, which must write every value of
/// `y_part`; `y` is never filled beforehand.
pub(crate) fn map_parts(
    x: &[f32],
    unit: usize,
    f: impl Fn(usize, &[f32], &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let parts = |y: &mut [MaybeUninit<f32>]| {
        for_each_part(y, unit, |first, part| {
            f(first, &x[first..first + part.len()], part)
        });
        Ok::<_, std::convert::Infallible>(())
    };
    // SAFETY: the parts cover all values and `f` writes each of them.
    let Ok(y) = unsafe { super::written(x.len(), parts) };
    y
}

/// PReLU with slope `p`: `t` where `t > 0`, else `p·t`, written as a product with a chosen
/// factor (`1·t = t` exactly) so that it compiles to a vector select instead of a branch.
#[inline(always)]
pub fn prelu(t: f32, p: f32) -> f32 {
    let factor = if t > 0.0 { 1.0 } else { p };
    factor * t
}

/// `y = f(x)` element by element, vectorised.
#[inline(always)]
pub fn map_into(xs: &[f32], ys: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32 + Copy) {
    assert_eq!(xs.len(), ys.len(), "map_into: lengths differ");
    dispatch(
        #[inline(always)]
        || {
            ys.iter_mut().zip(xs).for_each(|(y, &x)| {
                y.write(f(x));
            })
        },
    )
}

/// `y = f(a, b)` element by element, vectorised.
#[inline(always)]
pub fn zip_map_into(
    a: &[f32],
    b: &[f32],
    ys: &mut [MaybeUninit<f32>],
    f: impl Fn(f32, f32) -> f32 + Copy,
) {
    assert!(
        a.len() == ys.len() && b.len() == ys.len(),
        "zip_map_into: lengths differ"
    );
    dispatch(
        #[inline(always)]
        || {
            let n = ys.len();
            let (a, b) = (&a[..n], &b[..n]);
            for i in 0..n {
                ys[i].write(f(a[i], b[i]));
            }
        },
    )
}

/// Applies `f` to every element of `xs` in place, vectorised.
#[inline(always)]
pub fn map_in_place(xs: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    dispatch(
        #[inline(always)]
        || xs.iter_mut().for_each(|v| *v = f(*v)),
    )
}

/// Softmax of one row in place (max-subtracted).
pub fn softmax(row: &mut [f32]) {
    dispatch(
        #[inline(always)]
        || {
            // Sixteen running maxima (the maximum is exact in any order), so the loop
            // vectorises.
            let mut highs = [f32::NEG_INFINITY; 16];
            let chunks = row.chunks_exact(16);
            let mut max = chunks
                .remainder()
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            for c in chunks {
                for (h, &v) in highs.iter_mut().zip(c) {
                    *h = h.max(v);
                }
            }
            max = highs.into_iter().fold(max, f32::max);
            row.iter_mut().for_each(|v| *v = exp(*v - max));
            // Eight partial sums, so the reduction vectorises (the same order on every path).
            let mut lanes = [0f32; 8];
            let chunks = row.chunks_exact(8);
            let tail: f32 = chunks.remainder().iter().sum();
            for c in chunks {
                for (l, v) in lanes.iter_mut().zip(c) {
                    *l += v;
                }
            }
            let sum = lanes.iter().sum::<f32>() + tail;
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|v| *v *= inv);
        },
    )
}

/// Softmax of every column of the row-major matrix `m` (`cols` wide) in place
/// (max-subtracted; each column summed from the first row down).
pub fn softmax_columns(m: &mut [f32], cols: usize) {
    if cols == 0 {
        return;
    }
    dispatch(
        #[inline(always)]
        || {
            let mut max = vec![f32::NEG_INFINITY; cols];
            for row in m.chunks_exact(cols) {
                for (h, &v) in max.iter_mut().zip(row) {
                    *h = h.max(v);
                }
            }
            let mut sum = vec![0f32; cols];
            for row in m.chunks_exact_mut(cols) {
                for ((v, &h), s) in row.iter_mut().zip(&max).zip(sum.iter_mut()) {
                    *v = exp(*v - h);
                    *s += *v;
                }
            }
            sum.iter_mut().for_each(|s| *s = 1.0 / *s);
            for row in m.chunks_exact_mut(cols) {
                for (v, &inv) in row.iter_mut().zip(&sum) {
                    *v *= inv;
                }
            }
        },
    )
}

/// A vectorised point-wise activation as an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointwise {
    /// `x · σ(x)`.
    Silu,
    /// `x · Φ(x)`.
    GeluErf,
}

impl CustomOp1 for Pointwise {
    fn name(&self) -> &'static str {
        match self {
            Self::Silu => "silu-inference",
            Self::GeluErf => "gelu-erf-inference",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, self.name())?;
        let y = map_parts(x, 1, |_, xs, ys| match self {
            Self::Silu => map_into(xs, ys, silu),
            Self::GeluErf => map_into(xs, ys, gelu_erf),
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// Applies `op` to an F32 CPU tensor.
pub fn pointwise(x: &Tensor, op: Pointwise) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// Element-wise sum of two tensors of the same shape.
struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "add-inference"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            f32_values(s1, l1, "add: input")?,
            f32_values(s2, l2, "add: input")?,
        );
        if l1.dims() != l2.dims() {
            return Err(Error::Msg(format!(
                "add: shapes {:?} and {:?} differ",
                l1.dims(),
                l2.dims()
            )));
        }
        let y = map_parts(a, 1, |first, a, part| {
            let b = &b[first..first + part.len()];
            dispatch(
                #[inline(always)]
                || {
                    for ((y, a), b) in part.iter_mut().zip(a).zip(b) {
                        y.write(a + b);
                    }
                },
            )
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// `a + b` for F32 CPU tensors of one shape (split over the kernel threads when large).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

/// A per-channel affine map `y = a_c·x + b_c` on `[B, C, …]`, optionally followed by a
/// per-channel PReLU (`y` for `y > 0`, `p_c·y` otherwise): an inference BatchNorm (with
/// `a = γ/√(σ²+ε)`, `b = β − μ·a`) and the PReLU after it in one pass.
#[derive(Debug, Clone)]
pub struct ChannelAffine {
    /// Scale per channel.
    pub scale: Vec<f32>,
    /// Shift per channel.
    pub shift: Vec<f32>,
    /// PReLU slope per channel.
    pub prelu: Option<Vec<f32>>,
}

impl ChannelAffine {
    /// The map on `x` of shape `dims`, plus `residual` (of the same shape) when given.
    fn apply(&self, x: &[f32], dims: &[usize], residual: Option<&[f32]>) -> Result<Vec<f32>> {
        let c = self.scale.len();
        let fits = dims.len() >= 2
            && dims[1] == c
            && self.shift.len() == c
            && self.prelu.as_ref().is_none_or(|p| p.len() == c);
        if !fits {
            return Err(Error::Msg(format!(
                "channel affine: input {dims:?} does not have {c} channels"
            )));
        }
        let spatial: usize = dims[2..].iter().product();
        let spatial = spatial.max(1);
        Ok(map_parts(x, spatial, |first, xs, ys| {
            for (i, (xp, yp)) in xs.chunks(spatial).zip(ys.chunks_mut(spatial)).enumerate() {
                let ch = (first / spatial + i) % c;
                let (a, b) = (self.scale[ch], self.shift[ch]);
                let start = first + i * spatial;
                match (&self.prelu, residual) {
                    (Some(p), None) => {
                        let p = p[ch];
                        map_into(xp, yp, |x| prelu(a * x + b, p))
                    }
                    (None, None) => map_into(xp, yp, |x| a * x + b),
                    (slopes, Some(r)) => {
                        let r = &r[start..start + xp.len()];
                        let p = slopes.as_ref().map(|p| p[ch]);
                        zip_map_into(xp, r, yp, |x, r| {
                            let t = a * x + b;
                            let t = match p {
                                Some(p) => prelu(t, p),
                                None => t,
                            };
                            t + r
                        })
                    }
                }
            }
        }))
    }
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "channel affine: input")?;
        let y = self.apply(x, l.dims(), None)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// [`ChannelAffine`] of the first operand plus the second (a residual connection), in one
/// pass: the same values as the map followed by an addition.
impl CustomOp2 for ChannelAffine {
    fn name(&self) -> &'static str {
        "channel-affine-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_values(s1, l1, "channel affine: input")?;
        let r = f32_values(s2, l2, "channel affine: residual")?;
        if l1.dims() != l2.dims() {
            return Err(Error::Msg(format!(
                "channel affine: input {:?} and residual {:?} differ",
                l1.dims(),
                l2.dims()
            )));
        }
        let y = self.apply(x, l1.dims(), Some(r))?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_match_the_standard_library() {
        let mut worst = [0f64; 4];
        for i in -40_000..=40_000 {
            let x = i as f32 / 1000.0;
            let e = (x as f64).exp();
            worst[0] = worst[0].max(((exp(x) as f64 - e) / e).abs());
            let s = x as f64 / (1.0 + (-x as f64).exp());
            worst[1] = worst[1].max((silu(x) as f64 - s).abs() / (1.0 + s.abs()));
            let g = candle_core::cpu::erf::erf_f64(x as f64 / std::f64::consts::SQRT_2);
            worst[2] = worst[2].max((erf(x / std::f32::consts::SQRT_2) as f64 - g).abs());
            let gl = 0.5 * x as f64 * (1.0 + g);
            worst[3] = worst[3].max((gelu_erf(x) as f64 - gl).abs() / (1.0 + gl.abs()));
        }
        assert!(worst[0] < 3e-7, "exp relative error {}", worst[0]);
        assert!(worst[1] < 3e-7, "silu error {}", worst[1]);
        assert!(worst[2] < 6e-7, "erf error {}", worst[2]);
        assert!(worst[3] < 6e-7, "gelu error {}", worst[3]);
        assert_eq!(exp(-200.0), exp(-87.0));
        assert!(exp(200.0).is_finite());
    }

    #[test]
    fn channel_affine_with_residual_equals_the_map_then_the_sum() {
        let dev = candle_core::Device::Cpu;
        // Large enough to be split across threads, with values of both signs.
        let (b, c, hw) = (2, 3, 9000);
        let n = b * c * hw;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        let r: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 613) as f32 / 61.0 - 4.0)
            .collect();
        let x = Tensor::from_vec(x, (b, c, hw), &dev).unwrap();
        let r = Tensor::from_vec(r, (b, c, hw), &dev).unwrap();
        for prelu in [None, Some(vec![0.25, -0.5, 1.5])] {
            let op = ChannelAffine {
                scale: vec![0.5, -1.25, 2.0],
                shift: vec![0.125, 3.0, -0.75],
                prelu,
            };
            let mapped = x.apply_op1_no_bwd(&op).unwrap();
            let want: Vec<f32> = (mapped + &r)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = x
                .apply_op2_no_bwd(&r, &op)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want);
        }
        let short = r.narrow(2, 0, 10).unwrap();
        let op = ChannelAffine {
            scale: vec![1.0; 3],
            shift: vec![0.0; 3],
            prelu: None,
        };
        let err = x.apply_op2_no_bwd(&short, &op).unwrap_err().to_string();
        assert!(err.contains("residual"), "{err}");
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let before = row.clone();
        softmax(&mut row);
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        let want: Vec<f64> = {
            let m = before.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let e: Vec<f64> = before.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        for (g, w) in row.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-6);
        }
    }
}
