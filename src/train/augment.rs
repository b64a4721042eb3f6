//! Training augmentation on `image::RgbImage`: horizontal flip and a RandAugment subset.
//!
//! RandAugment follows torchvision's `RandAugment(num_ops, magnitude, num_magnitude_bins=31)`:
//! `num_ops` operations are drawn uniformly with replacement from [`RandOp::ALL`], each
//! applied at magnitude `m ∈ [0, 30]`, with a random sign for the signed ones. Magnitude
//! ranges are torchvision's (rotate 30°, shear 0.3, translate 150/331 of the width,
//! enhance factors 1 ± 0.9, posterize 8 → 4 bits, solarize threshold 255 → 0); the pixel
//! operations follow PIL (`ImageEnhance`, `ImageOps`). Geometric operations use nearest
//! interpolation and fill with black, like torchvision's defaults. `Grayscale` is an extra
//! operation beyond torchvision's list.
//!
//! Everything is a pure function of the image and an RNG; [`sample_rng`] seeds that RNG
//! from `(seed, epoch, sample index)`, so augmented batches are reproducible.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Highest RandAugment magnitude (torchvision's 31 bins → 0..=30).
pub const MAX_MAGNITUDE: u32 = 30;

/// Augmentation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Random horizontal flip with probability ½.
    pub hflip: bool,
    /// RandAugment operations per image (0 disables RandAugment; the paper's best rows use 4).
    pub num_ops: usize,
    /// RandAugment magnitude in `0..=30` (the paper uses 16).
    pub magnitude: u32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            hflip: true,
            num_ops: 0,
            magnitude: 16,
        }
    }
}

impl AugmentConfig {
    /// Checks the magnitude range.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.magnitude > MAX_MAGNITUDE {
            anyhow::bail!(
                "RandAugment magnitude must be in 0..={MAX_MAGNITUDE}, got {}",
                self.magnitude
            );
        }
        Ok(())
    }
}

/// One RandAugment operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandOp {
    /// No change.
    Identity,
    /// Rotation about the centre by up to ±30°.
    Rotate,
    /// Horizontal shear about the top-left corner (torchvision's centre `[0, 0]`).
    ShearX,
    /// Horizontal translation by up to ±45 % of the width.
    TranslateX,
    /// Brightness factor 1 ± 0.9·m/30.
    Brightness,
    /// Contrast factor 1 ± 0.9·m/30.
    Contrast,
    /// Saturation (PIL "Color") factor 1 ± 0.9·m/30.
    Color,
    /// Sharpness factor 1 ± 0.9·m/30.
    Sharpness,
    /// Keep `8 − round(m/7.5)` bits per channel.
    Posterize,
    /// Invert values ≥ `255·(1 − m/30)`.
    Solarize,
    /// Stretch each channel to the full range.
    AutoContrast,
    /// Histogram-equalise each channel.
    Equalize,
    /// Replace colour by luma.
    Grayscale,
}

impl RandOp {
    /// The operations RandAugment draws from.
    pub const ALL: [RandOp; 13] = [
        Self::Identity,
        Self::Rotate,
        Self::ShearX,
        Self::TranslateX,
        Self::Brightness,
        Self::Contrast,
        Self::Color,
        Self::Sharpness,
        Self::Posterize,
        Self::Solarize,
        Self::AutoContrast,
        Self::Equalize,
        Self::Grayscale,
    ];

    /// Applies the operation at `magnitude` (0..=30); `negative` flips the signed ones.
    pub fn apply(self, img: &RgbImage, magnitude: u32, negative: bool) -> RgbImage {
        let frac = magnitude.min(MAX_MAGNITUDE) as f64 / MAX_MAGNITUDE as f64;
        let sign = if negative { -1.0 } else { 1.0 };
        let factor = 1.0 + sign * 0.9 * frac;
        match self {
            Self::Identity => img.clone(),
            Self::Rotate => rotate(img, sign * 30.0 * frac),
            Self::ShearX => shear_x(img, sign * 0.3 * frac),
            Self::TranslateX => translate_x(img, sign * 150.0 / 331.0 * img.width() as f64 * frac),
            Self::Brightness => brightness(img, factor),
            Self::Contrast => contrast(img, factor),
            Self::Color => color(img, factor),
            Self::Sharpness => sharpness(img, factor),
            Self::Posterize => posterize(img, 8 - (magnitude.min(30) as f64 / 7.5).round() as u32),
            Self::Solarize => solarize(img, 255.0 * (1.0 - frac)),
            Self::AutoContrast => autocontrast(img),
            Self::Equalize => equalize(img),
            Self::Grayscale => grayscale(img),
        }
    }
}

/// The RNG of sample `index` in `epoch` of a run seeded `seed`.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(b"augment\0");
    ChaCha8Rng::from_seed(key)
}

/// Flip (p = ½) then RandAugment, drawing every choice from `rng`.
pub fn augment(img: &RgbImage, cfg: &AugmentConfig, rng: &mut impl Rng) -> RgbImage {
    let mut out = if cfg.hflip && rng.random_bool(0.5) {
        image::imageops::flip_horizontal(img)
    } else {
        img.clone()
    };
    for _ in 0..cfg.num_ops {
        let op = RandOp::ALL[rng.random_range(0..RandOp::ALL.len())];
        let negative = rng.random_bool(0.5);
        out = op.apply(&out, cfg.magnitude, negative);
    }
    out
}

fn to_u8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// PIL "L" luma: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`.
fn luma(p: &Rgb<u8>) -> u8 {
    let [r, g, b] = p.0;
    ((19595 * r as u32 + 38470 * g as u32 + 7471 * b as u32 + 0x8000) >> 16) as u8
}

/// Samples the source pixel `map(x, y)` (nearest) for each output pixel, black outside.
fn warp(img: &RgbImage, map: impl Fn(f64, f64) -> (f64, f64)) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let (sx, sy) = map(x as f64, y as f64);
        let (sx, sy) = (sx.round(), sy.round());
        if sx >= 0.0 && sy >= 0.0 && sx < w as f64 && sy < h as f64 {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

/// Rotation by `degrees` (counter-clockwise) about the image centre.
pub fn rotate(img: &RgbImage, degrees: f64) -> RgbImage {
    let (cx, cy) = (
        (img.width() as f64 - 1.0) / 2.0,
        (img.height() as f64 - 1.0) / 2.0,
    );
    let (s, c) = degrees.to_radians().sin_cos();
    // Inverse of a counter-clockwise rotation in image coordinates (y down).
    warp(img, |x, y| {
        let (dx, dy) = (x - cx, y - cy);
        (cx + c * dx - s * dy, cy + s * dx + c * dy)
    })
}

/// Horizontal shear `x' = x + k·y` about the top-left corner.
pub fn shear_x(img: &RgbImage, k: f64) -> RgbImage {
    warp(img, |x, y| (x - k * y, y))
}

/// Horizontal translation by `dx` pixels (rounded).
pub fn translate_x(img: &RgbImage, dx: f64) -> RgbImage {
    let dx = dx.round();
    warp(img, |x, y| (x - dx, y))
}

/// `degenerate + factor·(img − degenerate)` per channel (PIL `Image.blend`).
fn blend_with(
    img: &RgbImage,
    factor: f64,
    degenerate: impl Fn(u32, u32, usize) -> f64,
) -> RgbImage {
    let mut out = img.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        for c in 0..3 {
            let d = degenerate(x, y, c);
            p.0[c] = to_u8(d + factor * (p.0[c] as f64 - d));
        }
    }
    out
}

/// PIL `ImageEnhance.Brightness`.
pub fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    blend_with(img, factor, |_, _, _| 0.0)
}

/// PIL `ImageEnhance.Contrast` (blend with the rounded mean luma).
pub fn contrast(img: &RgbImage, factor: f64) -> RgbImage {
    let n = (img.width() * img.height()).max(1) as f64;
    let mean = img.pixels().map(|p| luma(p) as f64).sum::<f64>() / n;
    let mean = (mean + 0.5).floor();
    blend_with(img, factor, |_, _, _| mean)
}

/// PIL `ImageEnhance.Color` (blend with the luma image).
pub fn color(img: &RgbImage, factor: f64) -> RgbImage {
    let gray = grayscale(img);
    blend_with(img, factor, |x, y, _| gray.get_pixel(x, y).0[0] as f64)
}

/// PIL `ImageEnhance.Sharpness`: blend with the 3×3 SMOOTH filter (centre 5, others 1,
/// divided by 13); border pixels are left as they are in the degenerate image.
pub fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    let mut smooth = img.clone();
    if w >= 3 && h >= 3 {
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let mut acc = [0u32; 3];
                for dy in 0..3 {
                    for dx in 0..3 {
                        let weight = if dx == 1 && dy == 1 { 5 } else { 1 };
                        let p = img.get_pixel(x + dx - 1, y + dy - 1);
                        for (a, &v) in acc.iter_mut().zip(&p.0) {
                            *a += weight * v as u32;
                        }
                    }
                }
                let p = smooth.get_pixel_mut(x, y);
                for (v, &a) in p.0.iter_mut().zip(&acc) {
                    *v = ((a as f64) / 13.0).round() as u8;
                }
            }
        }
    }
    blend_with(img, factor, |x, y, c| smooth.get_pixel(x, y).0[c] as f64)
}

/// Keeps the top `bits` (1..=8) bits of every channel.
pub fn posterize(img: &RgbImage, bits: u32) -> RgbImage {
    let bits = bits.clamp(1, 8);
    let mask = !((1u16 << (8 - bits)) - 1) as u8;
    let mut out = img.clone();
    out.iter_mut().for_each(|v| *v &= mask);
    out
}

/// Inverts every value `>= threshold`.
pub fn solarize(img: &RgbImage, threshold: f64) -> RgbImage {
    let mut out = img.clone();
    out.iter_mut().for_each(|v| {
        if *v as f64 >= threshold {
            *v = 255 - *v;
        }
    });
    out
}

fn map_channels(img: &RgbImage, luts: &[[u8; 256]; 3]) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        for c in 0..3 {
            p.0[c] = luts[c][p.0[c] as usize];
        }
    }
    out
}

fn histograms(img: &RgbImage) -> [[u32; 256]; 3] {
    let mut h = [[0u32; 256]; 3];
    for p in img.pixels() {
        for c in 0..3 {
            h[c][p.0[c] as usize] += 1;
        }
    }
    h
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// PIL `ImageOps.autocontrast` (no cut-off): each channel stretched to 0..255.
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let luts = std::array::from_fn(|c| {
        let lo = hist[c].iter().position(|&n| n > 0);
        let hi = hist[c].iter().rposition(|&n| n > 0);
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                std::array::from_fn(|i| (i as f64 * scale + offset).clamp(0.0, 255.0) as u8)
            }
            _ => identity_lut(),
        }
    });
    map_channels(img, &luts)
}

/// PIL `ImageOps.equalize`: per-channel histogram equalisation.
pub fn equalize(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let luts = std::array::from_fn(|c| {
        let h = &hist[c];
        let nonzero: Vec<u32> = h.iter().copied().filter(|&n| n > 0).collect();
        if nonzero.len() <= 1 {
            return identity_lut();
        }
        let total: u32 = nonzero.iter().sum();
        let step = (total - nonzero[nonzero.len() - 1]) / 255;
        if step == 0 {
            return identity_lut();
        }
        let mut lut = [0u8; 256];
        let mut n = step / 2;
        for i in 0..256 {
            lut[i] = (n / step).min(255) as u8;
            n += h[i];
        }
        lut
    });
    map_channels(img, &luts)
}

/// Luma replicated into the three channels.
pub fn grayscale(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let l = luma(p);
        p.0 = [l, l, l];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| Rgb([(x * 20) as u8, (y * 30) as u8, 100]))
    }

    #[test]
    fn geometric_ops_move_pixels_as_expected() {
        let img = gradient(5, 5);
        let t = translate_x(&img, 2.0);
        assert_eq!(t.get_pixel(2, 1), img.get_pixel(0, 1));
        assert_eq!(t.get_pixel(1, 1), &Rgb([0, 0, 0]));
        let r = rotate(&img, 90.0);
        // Counter-clockwise: the top-right corner moves to the top-left.
        assert_eq!(r.get_pixel(0, 0), img.get_pixel(4, 0));
        assert_eq!(r.get_pixel(2, 2), img.get_pixel(2, 2));
        let s = shear_x(&img, 1.0);
        assert_eq!(s.get_pixel(3, 2), img.get_pixel(1, 2));
        assert_eq!(s.get_pixel(0, 0), img.get_pixel(0, 0));
        assert_eq!(rotate(&img, 0.0), img);
    }

    #[test]
    fn pixel_ops_match_pil_formulas() {
        let img = RgbImage::from_pixel(2, 1, Rgb([200, 100, 10]));
        assert_eq!(brightness(&img, 0.5).get_pixel(0, 0), &Rgb([100, 50, 5]));
        assert_eq!(brightness(&img, 2.0).get_pixel(0, 0), &Rgb([255, 200, 20]));
        // luma = (19595·200 + 38470·100 + 7471·10 + 32768) >> 16 = 7873478 >> 16 = 120.
        assert_eq!(grayscale(&img).get_pixel(0, 0), &Rgb([120, 120, 120]));
        assert_eq!(color(&img, 0.0).get_pixel(0, 0), &Rgb([120, 120, 120]));
        assert_eq!(contrast(&img, 0.0).get_pixel(0, 0), &Rgb([120, 120, 120]));
        // Half-way colour: 120 + 0.5·(200 − 120) = 160.
        assert_eq!(color(&img, 0.5).get_pixel(0, 0).0[0], 160);
        assert_eq!(posterize(&img, 4).get_pixel(0, 0), &Rgb([192, 96, 0]));
        assert_eq!(solarize(&img, 128.0).get_pixel(0, 0), &Rgb([55, 100, 10]));
        let two = RgbImage::from_fn(2, 1, |x, _| Rgb([50 + 100 * x as u8, 7, 9]));
        let a = autocontrast(&two);
        assert_eq!(a.get_pixel(0, 0).0[0], 0);
        assert_eq!(a.get_pixel(1, 0).0[0], 255);
        assert_eq!(a.get_pixel(0, 0).0[1], 7, "a flat channel is kept");
        // Flat image: sharpness does nothing.
        assert_eq!(
            sharpness(&RgbImage::from_pixel(4, 4, Rgb([9, 9, 9])), 1.9),
            RgbImage::from_pixel(4, 4, Rgb([9, 9, 9]))
        );
    }

    #[test]
    fn equalize_spreads_a_two_level_image() {
        // 3 pixels at 10 and 1 at 20: step = (4 − 1) / 255 = 0 → unchanged.
        let img = RgbImage::from_fn(4, 1, |x, _| Rgb([if x < 3 { 10 } else { 20 }; 3]));
        assert_eq!(equalize(&img), img);
        // 256 pixels at 0..=255 (one each) → step = 1: lut[i] = i.
        let ramp = RgbImage::from_fn(256, 1, |x, _| Rgb([x as u8; 3]));
        assert_eq!(equalize(&ramp), ramp);
        // 300 pixels at 10 and 300 at 20: step = 300/255 = 1, lut[10] = 0, lut[20] = 300.min(255).
        let halves = RgbImage::from_fn(600, 1, |x, _| Rgb([if x < 300 { 10 } else { 20 }; 3]));
        let e = equalize(&halves);
        assert_eq!(e.get_pixel(0, 0).0[0], 0);
        assert_eq!(e.get_pixel(599, 0).0[0], 255);
    }

    #[test]
    fn augmentation_is_reproducible_per_sample() {
        let img = gradient(12, 12);
        let cfg = AugmentConfig {
            hflip: true,
            num_ops: 4,
            magnitude: 16,
        };
        let a = augment(&img, &cfg, &mut sample_rng(1, 2, 3));
        let b = augment(&img, &cfg, &mut sample_rng(1, 2, 3));
        assert_eq!(a, b);
        let differs = (0..20).any(|i| augment(&img, &cfg, &mut sample_rng(1, 2, i)) != a);
        assert!(differs);
        for op in RandOp::ALL {
            for m in [0, 16, 30] {
                assert_eq!(op.apply(&img, m, true).dimensions(), (12, 12));
            }
        }
        assert!(AugmentConfig {
            magnitude: 31,
            ..cfg
        }
        .validate()
        .is_err());
    }
}
