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

use anyhow::{anyhow, Result};
use image::{ExtendedColorType, ImageEncoder, RgbImage};

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
