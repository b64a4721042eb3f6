//! Face-dataset file formats: InsightFace/MXNet RecordIO training sets and verification `.bin` pairs.

pub mod bench_export;
pub mod commands;
pub mod convert;
pub mod curate;
pub mod embeddings;
pub mod export;
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
