//! Face-dataset file formats: InsightFace/MXNet RecordIO training sets and verification `.bin` pairs.

pub mod bench_export;
pub mod commands;
pub mod convert;
pub mod curate;
pub mod embeddings;
pub mod export;
mod jpeg;
pub mod merge;
pub mod recordio;
pub mod resize;
pub mod source;
pub mod staging;
pub mod verification_bin;

use anyhow::{anyhow, Context, Result};
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How images are encoded when written into a dataset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageEncoding {
    /// Lossless PNG (decodes to identical pixels).
    #[default]
    Png,
    /// Baseline JPEG at the given quality (1–100).
    Jpeg {
        /// JPEG quality, 1–100.
        quality: u8,
    },
}

/// Encodes an RGB image as PNG or JPEG bytes.
pub fn encode_image(img: &RgbImage, encoding: ImageEncoding) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let (w, h) = img.dimensions();
    match encoding {
        ImageEncoding::Png => image::codecs::png::PngEncoder::new(&mut out).write_image(
            img.as_raw(),
            w,
            h,
            ExtendedColorType::Rgb8,
        ),
        ImageEncoding::Jpeg { quality } => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
                .write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)
        }
    }
    .map_err(|e| anyhow!("cannot encode {w}x{h} image: {e}"))?;
    Ok(out)
}

/// Decodes JPEG/PNG bytes (format guessed from the content) into an RGB u8 image.
///
/// Baseline JPEGs are decoded exactly as libjpeg-turbo's defaults do (as OpenCV and Pillow
/// decode them in the reference); other JPEG variants and PNG use the `image` crate.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        match jpeg::decode(bytes) {
            Ok(Some(img)) => return Ok(img),
            Ok(None) => tracing::debug!("JPEG variant not reproduced exactly; using image crate"),
            Err(e) => tracing::debug!("exact JPEG decoder failed ({e}); trying image crate"),
        }
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| anyhow!("cannot read image bytes: {e}"))?;
    let img = reader
        .decode()
        .map_err(|e| anyhow!("cannot decode image ({} bytes): {e}", bytes.len()))?;
    Ok(img.to_rgb8())
}

/// Temporary sibling of `path` used for atomic writes (unique per process and call).
pub(crate) fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Writes `bytes` to a temporary sibling of `path`, then renames it into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path)?;
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    rename_into_place(&tmp, path)
}

/// Renames a finished temporary file over `path`, removing it if that fails.
pub(crate) fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        anyhow!("cannot rename {} to {}: {e}", tmp.display(), path.display())
    })
}
