//! Antialiased bilinear resizing of RGB images (for the 112×112 RecordIO export).
//!
//! Separable triangle filter whose support is widened by the scale factor when shrinking
//! (the scheme of Pillow's `BILINEAR` resize and of `image`'s `Triangle` filter): output
//! pixel `x` is centred at source coordinate `c = (x + 0.5) · in/out`, and source pixel `j`
//! gets weight `max(0, 1 − |j + 0.5 − c| / s)` with `s = max(1, in/out)`, normalised to
//! sum 1. The horizontal pass keeps f32 values, the vertical pass rounds to u8 (half away
//! from zero) and clamps. Weights are computed once per size pair, so this is several times
//! faster than the generic `image::imageops::resize`; results are deterministic.

use image::RgbImage;

/// The contributing source pixels of one output pixel.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

fn taps(in_size: u32, out_size: u32) -> Vec<Taps> {
    let scale = f64::from(in_size) / f64::from(out_size);
    let support = scale.max(1.0);
    (0..out_size)
        .map(|x| {
            let centre = (f64::from(x) + 0.5) * scale;
            let lo = (centre - support + 0.5).floor().max(0.0) as usize;
            let hi = ((centre + support + 0.5).floor() as usize).min(in_size as usize);
            let raw: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|w| if sum > 0.0 { (w / sum) as f32 } else { 0.0 })
                .collect();
            Taps { start: lo, weights }
        })
        .collect()
}

/// Resizes `img` to `width × height` (see the module docs). Same-size input is copied.
///
/// # Panics
/// If a target side is zero.
pub fn resize_bilinear_aa(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    assert!(width > 0 && height > 0, "target size must be positive");
    let (w, h) = img.dimensions();
    if (w, h) == (width, height) {
        return img.clone();
    }
    if w == 0 || h == 0 {
        return RgbImage::new(width, height);
    }
    let src = img.as_raw();
    let hx = taps(w, width);
    let (ow, oh) = (width as usize, height as usize);
    // Horizontal pass: h rows × width columns, f32.
    let mut mid = vec![0f32; h as usize * ow * 3];
    for y in 0..h as usize {
        let row = &src[y * w as usize * 3..(y + 1) * w as usize * 3];
        let out = &mut mid[y * ow * 3..(y + 1) * ow * 3];
        for (x, t) in hx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &wt) in t.weights.iter().enumerate() {
                let p = (t.start + k) * 3;
                acc[0] += wt * f32::from(row[p]);
                acc[1] += wt * f32::from(row[p + 1]);
                acc[2] += wt * f32::from(row[p + 2]);
            }
            out[x * 3..x * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass.
    let vy = taps(h, height);
    let mut dst = vec![0u8; oh * ow * 3];
    let mut acc = vec![0f32; ow * 3];
    for (y, t) in vy.iter().enumerate() {
        acc.iter_mut().for_each(|a| *a = 0.0);
        for (k, &wt) in t.weights.iter().enumerate() {
            let row = &mid[(t.start + k) * ow * 3..(t.start + k + 1) * ow * 3];
            for (a, v) in acc.iter_mut().zip(row) {
                *a += wt * v;
            }
        }
        for (d, a) in dst[y * ow * 3..(y + 1) * ow * 3].iter_mut().zip(&acc) {
            *d = a.round().clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage::from_raw(width, height, dst).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halving_uses_the_widened_triangle() {
        // Columns alternate 0 / 255: 2x shrinking weights (1, 3, 3, 1) / 8 give 127.5 inside.
        let img = RgbImage::from_fn(16, 4, |x, _| image::Rgb([255 * (x % 2) as u8; 3]));
        let out = resize_bilinear_aa(&img, 8, 4);
        for x in 1..7 {
            assert_eq!(out.get_pixel(x, 1).0, [128; 3], "x = {x}");
        }
        // Flat images stay flat.
        let flat = RgbImage::from_pixel(128, 128, image::Rgb([37, 200, 5]));
        assert!(resize_bilinear_aa(&flat, 112, 112)
            .pixels()
            .all(|p| p.0 == [37, 200, 5]));
        // Same size is a copy.
        assert_eq!(resize_bilinear_aa(&img, 16, 4), img);
    }

    #[test]
    fn close_to_the_image_crates_triangle_filter() {
        let img = crate::procface::render_sample(3, 1, 128);
        let ours = resize_bilinear_aa(&img, 112, 112);
        let theirs = image::imageops::resize(&img, 112, 112, image::imageops::FilterType::Triangle);
        let max = ours
            .as_raw()
            .iter()
            .zip(theirs.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(max <= 1, "max difference {max}");
    }
}
