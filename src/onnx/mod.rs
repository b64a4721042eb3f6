//! Real faces: ONNX face recognizers, face detection, 5-point alignment.
//!
//! Everything runs on the CPU through [tract-onnx](https://github.com/sonos/tract) (pure
//! Rust):
//!
//! - [`fr::OnnxFrModel`]: any ONNX face-recognition model with one `N × 3 × H × W` input and
//!   one `N × D` output; input size, channel order and normalisation come from a small
//!   [`fr::FrDescriptor`] (`<model>.json` beside the model, else InsightFace's defaults).
//! - [`detect::FaceDetector`]: the RFB-320 detector plus a 68-point landmark model, reduced
//!   to the 5 points (eye centres, nose tip, mouth corners) of the InsightFace template.
//! - [`align`]: the least-squares similarity transform (Umeyama) to the 112 × 112 template
//!   and the bilinear warp.
//! - [`photo::FacePipeline`]: every face of a photo, aligned and embedded (identity from a
//!   photo).
//! - [`embed`]: the `idiff-studio embed` command.
//!
//! The freely licensed model set used by the tests (npm `faceplugin-face-recognition-js`,
//! MIT) and the test photos (PyPI `face_recognition` sdist) are fetched by
//! `scripts/fetch-models.sh` into [`models_dir`]; nothing is downloaded at run time.

pub mod align;
pub mod detect;
pub mod fr;
pub mod photo;
pub mod runtime;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

/// File name of the recognizer in the model cache.
pub const FR_MODEL_FILE: &str = "fr_feature.onnx";
/// File name of the RFB-320 detector in the model cache.
pub const DETECTOR_FILE: &str = "fr_detect.onnx";
/// File name of the 68-point landmark model in the model cache.
pub const LANDMARK_FILE: &str = "fr_landmark.onnx";

/// Whether `path` names an ONNX model (by its `.onnx` extension, any case).
pub fn is_onnx_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// The model cache: `$IDIFF_MODELS`, else `$HOME/.cache/idiff-studio/models` (where
/// `scripts/fetch-models.sh` writes).
pub fn models_dir() -> PathBuf {
    match std::env::var_os("IDIFF_MODELS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
            PathBuf::from(home).join(".cache/idiff-studio/models")
        }
    }
}

/// Path of one file of the model cache (e.g. `fr_feature.onnx`, `photos/obama.jpg`) for
/// tests; `None` with a skip note when it is absent.
///
/// # Panics
/// Under `CI=true` a missing file panics (CI runs `scripts/fetch-models.sh` first), the
/// same convention as [`crate::testutil::fixture`].
pub fn cached_model_file(name: &str) -> Option<PathBuf> {
    let path = models_dir().join(name);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "model file {} is missing (run scripts/fetch-models.sh); CI=true forbids skipping",
            path.display()
        );
    }
    eprintln!(
        "skipping: {} not found (run scripts/fetch-models.sh or set IDIFF_MODELS)",
        path.display()
    );
    None
}
