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

/// A new vector of `len` values written by `write` into memory that is never zero-filled
/// first; `write`'s error (and nothing kept) when it fails.
///
/// # Safety
/// When it returns `Ok`, `write` must have written every one of the `len` values.
pub(crate) unsafe fn written<E>(
    len: usize,
    write: impl FnOnce(&mut [std::mem::MaybeUninit<f32>]) -> std::result::Result<(), E>,
) -> std::result::Result<Vec<f32>, E> {
    let mut y = Vec::with_capacity(len);
    write(&mut y.spare_capacity_mut()[..len])?;
    // SAFETY: the caller's promise: `write` succeeded, so all `len` values are written.
    unsafe { y.set_len(len) };
    Ok(y)
}

/// A tensor's values as a flat F32 vector (for packing parameters).
pub(crate) fn tensor_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// The contiguous F32 values behind a CPU storage and its layout, or an error naming `what`.
pub fn f32_values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(Error::Msg(format!("{what} must be F32")));
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(Error::Msg(format!("{what} must be contiguous"))),
    }
}

/// Writes the transpose of the row-major `rows × cols` matrix `src` into `dst`
/// (`cols × rows`), 8 × 8 blocks at a time through registers, the edges one by one.
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 8;
    let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
    let (full_r, full_c) = (rows / B * B, cols / B * B);
    for r0 in (0..full_r).step_by(B) {
        for c0 in (0..full_c).step_by(B) {
            let mut block = [[0f32; B]; B];
            for (i, line) in block.iter_mut().enumerate() {
                line.copy_from_slice(&src[(r0 + i) * cols + c0..][..B]);
            }
            for j in 0..B {
                let out: &mut [f32; B] = (&mut dst[(c0 + j) * rows + r0..][..B])
                    .try_into()
                    .expect("a block row");
                for (i, o) in out.iter_mut().enumerate() {
                    *o = block[i][j];
                }
            }
        }
    }
    for r in 0..rows {
        let start = if r < full_r { full_c } else { 0 };
        for c in start..cols {
            dst[c * rows + r] = src[r * cols + c];
        }
    }
}
