//! Locating the parity fixtures produced by the reference implementation.
//!
//! Tests find them via `$IDIFF_FIXTURES`, else `../shared/fixtures` next to the workspace.
//! When they are absent a test prints a skip note and returns, except under `CI=true`,
//! where a missing fixture is a failure.

use std::path::PathBuf;

/// Directory holding the reference fixtures, if present.
pub fn fixtures_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("IDIFF_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    };
    dir.is_dir().then_some(dir)
}

/// Path of one fixture file; `None` (with a skip note) when fixtures are unavailable.
///
/// # Panics
/// Under `CI=true` a missing fixture panics, so CI cannot silently skip parity tests.
pub fn fixture(name: &str) -> Option<PathBuf> {
    let path = fixtures_dir().map(|d| d.join(name));
    match path {
        Some(p) if p.exists() => Some(p),
        _ => {
            if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
                panic!("fixture {name} is missing (set IDIFF_FIXTURES); CI=true forbids skipping");
            }
            eprintln!("skipping: fixture {name} not found (set IDIFF_FIXTURES)");
            None
        }
    }
}

/// Largest absolute element of a tensor (as f32), e.g. the scale of a relative bound.
///
/// # Panics
/// When the tensor cannot be read.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max abs")
}

/// Largest absolute element-wise difference of two tensors of the same shape (as f32).
///
/// # Panics
/// When the shapes differ or the tensors cannot be read.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max abs diff")
}

/// The gradients of `Σ y ⊙ probe` (a random linear read-out of `y`) with respect to every
/// variable `y` depends on.
///
/// # Panics
/// When the shapes differ or the backward pass fails.
pub fn probed_grads(
    y: &candle_core::Tensor,
    probe: &candle_core::Tensor,
) -> candle_core::backprop::GradStore {
    (y * probe)
        .and_then(|p| p.sum_all())
        .and_then(|s| s.backward())
        .expect("probed gradients")
}
