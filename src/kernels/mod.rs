//! Fast CPU kernels shared by inference and training: packed matrix products on AVX-512,
//! AVX2 or portable code ([`gemm`]), convolutions built on them ([`conv`]; wide 3×3
//! layers by Winograd's F(2×2, 3×3) where that is faster, [`winograd`]) and a one-op
//! GroupNorm with its modulation and activation ([`norm`]).
//!
//! They take the place of candle's CPU ops for F32 tensors; on other devices and dtypes the
//! models keep candle's own ops. `IDIFF_SIMD=avx2` (or [`gemm::set_simd`]) forces the AVX2
//! path; every path computes the same bits.

pub mod attention;
pub mod conv;
pub mod gemm;
pub mod linear;
pub mod math;
pub mod norm;
pub mod winograd;

use candle_core::{CpuStorage, Error, Layout, Result, Tensor};
use std::sync::{Arc, OnceLock};

/// Packed parameters built on first use. Weights that are `Var`s change in place during
/// training, so they are packed anew for every call instead of being cached.
#[derive(Debug)]
pub struct PackedCache<T>(Arc<OnceLock<T>>);

impl<T> Default for PackedCache<T> {
    fn default() -> Self {
        Self(Arc::new(OnceLock::new()))
    }
}

impl<T> Clone for PackedCache<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> PackedCache<T> {
    /// Runs `f` on the packed form of `weight`, building it with `build` when needed.
    pub fn with<R>(
        &self,
        weight: &Tensor,
        build: impl FnOnce() -> Result<T>,
        f: impl FnOnce(&T) -> Result<R>,
    ) -> Result<R> {
        if weight.is_variable() {
            return f(&build()?);
        }
        if let Some(p) = self.0.get() {
            return f(p);
        }
        let p = build()?;
        f(self.0.get_or_init(|| p))
    }
}

/// Runs `f` on this thread's buffer in `slot`, kept between calls so that large buffers are
/// not mapped (and page-faulted) anew; on a fresh one when the slot is already in use further
/// up this thread's stack (a kernel entered again from inside itself, e.g. by work stealing).
pub(crate) fn with_thread_buffer<T: Default + 'static, R>(
    slot: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    slot.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut T::default()),
    })
}

/// A tensor's values as a flat F32 vector (for packing parameters).
pub(crate) fn tensor_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// The contiguous F32 values behind a CPU storage and its layout, or an error naming `what`.
pub(crate) fn f32_values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(Error::Msg(format!("{what} must be F32")));
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(Error::Msg(format!("{what} must be contiguous"))),
    }
}

/// Writes the transpose of the row-major `rows × cols` matrix `src` into `dst`
/// (`cols × rows`), in square tiles so that reads and writes both stay in cache.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 16;
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let row = &src[r * cols..][c0..(c0 + TILE).min(cols)];
                for (c, &v) in (c0..).zip(row) {
                    dst[c * rows + r] = v;
                }
            }
        }
    }
}
