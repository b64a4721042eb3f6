//! Camera effects on the final image, in integer arithmetic only:
//! exposure and white balance, blur and sensor noise.

use super::nuisance::Nuisance;
use super::rng::stream;
use image::RgbImage;
use rand::RngCore;
use tiny_skia::Pixmap;

/// Domain tag of the pixel-noise stream.
const NOISE_DOMAIN: u64 = 0x0153_0001;

/// Drops alpha from an opaque pixmap.
pub(crate) fn to_rgb(pixmap: &Pixmap) -> RgbImage {
    let (w, h) = (pixmap.width(), pixmap.height());
    let mut out = RgbImage::new(w, h);
    for (dst, src) in out.pixels_mut().zip(pixmap.pixels()) {
        let c = src.demultiply();
        *dst = image::Rgb([c.red(), c.green(), c.blue()]);
    }
    out
}

/// Applies exposure, white balance, blur and noise described by `nuisance`.
pub(crate) fn apply_camera(image: &mut RgbImage, nuisance: &Nuisance) {
    apply_gains(image, nuisance);
    let size = image.width().max(1) as f32;
    let sigma_px = nuisance.blur * size;
    let passes = (2.0 * sigma_px * sigma_px).round() as u32;
    for _ in 0..passes.min(12) {
        binomial_blur(image);
    }
    add_noise(image, nuisance);
}

/// Channel gains in 8.8 fixed point.
fn apply_gains(image: &mut RgbImage, nuisance: &Nuisance) {
    let fixed = |g: f32| (g * 256.0).round().clamp(0.0, 1024.0) as u32;
    let gains = [
        fixed(nuisance.exposure * nuisance.white_balance.0),
        fixed(nuisance.exposure),
        fixed(nuisance.exposure * nuisance.white_balance.1),
    ];
    if gains == [256; 3] {
        return;
    }
    for pixel in image.pixels_mut() {
        for (v, g) in pixel.0.iter_mut().zip(gains) {
            *v = ((*v as u32 * g + 128) >> 8).min(255) as u8;
        }
    }
}

/// One separable pass of the [1 2 1] / 4 kernel (σ² = 0.5 px² per pass),
/// clamping at the borders.
fn binomial_blur(image: &mut RgbImage) {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let horizontal = blur_axis(image.as_raw(), w, h, 3, 3 * w);
    let vertical = blur_axis(&horizontal, h, w, 3 * w, 3);
    image.copy_from_slice(&vertical);
}

/// Blurs `lines` lines of `len` pixels; `step` is the byte distance between
/// neighbours along a line, `stride` between the starts of two lines.
fn blur_axis(src: &[u8], len: usize, lines: usize, step: usize, stride: usize) -> Vec<u8> {
    let mut dst = src.to_vec();
    for line in 0..lines {
        for i in 0..len {
            let prev = i.saturating_sub(1);
            let next = (i + 1).min(len - 1);
            for c in 0..3 {
                let at = |k: usize| src[line * stride + k * step + c] as u32;
                let v = (at(prev) + 2 * at(i) + at(next) + 2) >> 2;
                dst[line * stride + i * step + c] = v as u8;
            }
        }
    }
    dst
}

/// Adds roughly Gaussian noise: mostly luminance with a little chroma.
fn add_noise(image: &mut RgbImage, nuisance: &Nuisance) {
    let sigma16 = (nuisance.noise * 16.0).round() as i32;
    if sigma16 <= 0 {
        return;
    }
    let mut rng = stream(nuisance.noise_seed, image.width() as u64, NOISE_DOMAIN);
    // Sum of four uniform bytes: mean 510, standard deviation ≈ 147.8.
    let bell = |word: u32| word.to_le_bytes().iter().map(|b| *b as i32).sum::<i32>() - 510;
    for pixel in image.pixels_mut() {
        let luma = bell(rng.next_u32()) * sigma16 / (148 * 16);
        let chroma = rng.next_u32();
        for (c, v) in pixel.0.iter_mut().enumerate() {
            let jitter = ((chroma >> (8 * c)) & 0xFF) as i32 - 128;
            let delta = luma + jitter * sigma16 / (128 * 16 * 3);
            *v = (*v as i32 + delta).clamp(0, 255) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blur_preserves_flat_images() {
        let mut image = RgbImage::from_pixel(9, 7, image::Rgb([10, 120, 250]));
        binomial_blur(&mut image);
        assert!(image.pixels().all(|p| p.0 == [10, 120, 250]));
    }

    #[test]
    fn blur_spreads_a_point() {
        let mut image = RgbImage::new(5, 5);
        image.put_pixel(2, 2, image::Rgb([160, 160, 160]));
        binomial_blur(&mut image);
        assert_eq!(image.get_pixel(2, 2).0[0], 40);
        assert_eq!(image.get_pixel(1, 2).0[0], 20);
        assert_eq!(image.get_pixel(1, 1).0[0], 10);
    }

    #[test]
    fn neutral_camera_is_a_no_op() {
        let mut image =
            RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 77]));
        let before = image.clone();
        apply_camera(&mut image, &Nuisance::neutral());
        assert_eq!(image, before);
    }
}
