//! Reading, decoding and resampling images, shared by the datasets, the recognisers, the
//! detector and the embedding pipeline.

mod jpeg;

use anyhow::{anyhow, bail, Result};
use image::RgbImage;
use std::path::Path;

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

/// Reads an image as RGB, naming the file on failure.
///
/// # Errors
/// When the file cannot be read or decoded.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path)
        .map_err(|e| anyhow!("{}: cannot read image ({e})", path.display()))?
        .to_rgb8())
}

/// Bilinear resize of a planar `channels × in_h × in_w` f32 image to `out_h × out_w`,
/// matching torch `F.interpolate(mode="bilinear", align_corners=False)` on the CPU:
/// scale `in / out` in f32, source coordinate `max(scale · (o + 0.5) − 0.5, 0)`, lower
/// index `min(floor(src), in − 1)`, weight `λ = clamp(src − index, 0, 1)`, the upper
/// neighbour clamped to the edge, and `out = λh0 (λw0 a + λw1 b) + λh1 (λw0 c + λw1 d)`.
///
/// # Errors
/// When a size is zero or `src.len()` disagrees with the shape.
pub fn resize_bilinear(
    src: &[f32],
    channels: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Result<Vec<f32>> {
    if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
        bail!("cannot resize {in_h}x{in_w} to {out_h}x{out_w}: sizes must be positive");
    }
    if src.len() != channels * in_h * in_w {
        bail!(
            "image buffer has {} values, expected {channels}x{in_h}x{in_w}",
            src.len()
        );
    }
    let rows = linear_taps(in_h, out_h);
    let cols = linear_taps(in_w, out_w);
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    for plane in src.chunks_exact(in_h * in_w) {
        for &(h0, h1, lh0, lh1) in &rows {
            let (r0, r1) = (&plane[h0 * in_w..], &plane[h1 * in_w..]);
            for &(w0, w1, lw0, lw1) in &cols {
                let top = lw0 * r0[w0] + lw1 * r0[w1];
                let bottom = lw0 * r1[w0] + lw1 * r1[w1];
                out.push(lh0 * top + lh1 * bottom);
            }
        }
    }
    Ok(out)
}

/// `(index0, index1, λ0, λ1)` per output position along one axis (torch's linear taps).
pub(crate) fn linear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let lambda = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - lambda, lambda)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_hand_computed_torch_values() {
        // torch: F.interpolate(tensor([[[[1., 2.]]]]), size=(1, 4), mode="bilinear",
        // align_corners=False) == [[1.00, 1.25, 1.75, 2.00]].
        let up = resize_bilinear(&[1.0, 2.0], 1, (1, 2), (1, 4)).unwrap();
        assert_eq!(up, vec![1.0, 1.25, 1.75, 2.0]);
        // 4 -> 2 averages neighbouring pairs: src = 2 (o + 0.5) - 0.5 = 0.5, 2.5.
        let down = resize_bilinear(&[0.0, 4.0, 8.0, 16.0], 1, (1, 4), (1, 2)).unwrap();
        assert_eq!(down, vec![2.0, 12.0]);
        // 3x3 -> 2x2 of v = 3r + c (bilinear is exact on linear functions): source
        // coordinates 1.5 (o + 0.5) - 0.5 = 0.25 and 1.75 on both axes.
        let src: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let out = resize_bilinear(&src, 1, (3, 3), (2, 2)).unwrap();
        assert_eq!(out, vec![1.0, 2.5, 5.5, 7.0]);
        // Planes are resized independently.
        let two = resize_bilinear(&[1.0, 2.0, 10.0, 20.0], 2, (1, 2), (1, 4)).unwrap();
        assert_eq!(two, vec![1.0, 1.25, 1.75, 2.0, 10.0, 12.5, 17.5, 20.0]);
        assert!(resize_bilinear(&[1.0], 1, (1, 2), (1, 4)).is_err());
        assert!(resize_bilinear(&[], 1, (0, 2), (1, 4)).is_err());
    }
}
