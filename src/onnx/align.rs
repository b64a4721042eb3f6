//! 5-point face alignment: the least-squares similarity transform to the InsightFace
//! 112 × 112 template and the bilinear warp.

use anyhow::{bail, Result};
use image::{Rgb, RgbImage};

/// The InsightFace (arcface_torch) 112 × 112 template: left eye, right eye, nose tip,
/// left mouth corner, right mouth corner (image left/right), in pixels.
pub const ARCFACE_TEMPLATE_112: [[f32; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// A similarity transform (rotation, uniform scale, translation, no reflection):
/// `(x, y) ↦ (a·x − b·y + tx, b·x + a·y + ty)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    /// `scale · cos θ`.
    pub a: f64,
    /// `scale · sin θ`.
    pub b: f64,
    /// Translation x.
    pub tx: f64,
    /// Translation y.
    pub ty: f64,
}

impl Similarity {
    /// Maps one point.
    pub fn apply(&self, [x, y]: [f32; 2]) -> [f64; 2] {
        let (x, y) = (f64::from(x), f64::from(y));
        [
            self.a * x - self.b * y + self.tx,
            self.b * x + self.a * y + self.ty,
        ]
    }

    /// Scale factor `sqrt(a² + b²)`.
    pub fn scale(&self) -> f64 {
        self.a.hypot(self.b)
    }

    /// Root-mean-square distance between the mapped `src` points and `dst` (in `dst` units,
    /// i.e. template pixels for an alignment).
    pub fn rms_residual(&self, src: &[[f32; 2]], dst: &[[f32; 2]]) -> f64 {
        let n = src.len().min(dst.len()).max(1) as f64;
        let sum: f64 = src
            .iter()
            .zip(dst)
            .map(|(s, d)| {
                let [x, y] = self.apply(*s);
                (x - f64::from(d[0])).powi(2) + (y - f64::from(d[1])).powi(2)
            })
            .sum();
        (sum / n).sqrt()
    }
}

/// Least-squares similarity transform mapping `src` onto `dst` (Umeyama 1991; in 2-D the
/// optimal rotation-and-scale has the closed form `a = Σ(x̃·u + ỹ·v) / Σ|p̃|²`,
/// `b = Σ(x̃·v − ỹ·u) / Σ|p̃|²` over centred points, which is what skimage's
/// `SimilarityTransform.estimate` returns for non-reflected point sets).
///
/// # Errors
/// With fewer than two point pairs, mismatched lengths or coincident source points.
pub fn estimate_similarity(src: &[[f32; 2]], dst: &[[f32; 2]]) -> Result<Similarity> {
    if src.len() != dst.len() || src.len() < 2 {
        bail!(
            "similarity fit needs two or more point pairs ({} source, {} target points)",
            src.len(),
            dst.len()
        );
    }
    let n = src.len() as f64;
    let mean = |pts: &[[f32; 2]]| {
        let (sx, sy) = pts.iter().fold((0.0, 0.0), |(sx, sy), p| {
            (sx + f64::from(p[0]), sy + f64::from(p[1]))
        });
        (sx / n, sy / n)
    };
    let (mx, my) = mean(src);
    let (mu, mv) = mean(dst);
    let (mut num_a, mut num_b, mut den) = (0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (x, y) = (f64::from(s[0]) - mx, f64::from(s[1]) - my);
        let (u, v) = (f64::from(d[0]) - mu, f64::from(d[1]) - mv);
        num_a += x * u + y * v;
        num_b += x * v - y * u;
        den += x * x + y * y;
    }
    if den <= 1e-12 {
        bail!("similarity fit: the source points coincide");
    }
    let (a, b) = (num_a / den, num_b / den);
    Ok(Similarity {
        a,
        b,
        tx: mu - (a * mx - b * my),
        ty: mv - (b * mx + a * my),
    })
}

/// Warps `img` by `m` (source pixel coordinates → output pixel coordinates, integer pixel
/// centres as in OpenCV's `warpAffine`) into a `width × height` image: each output pixel is
/// the bilinear interpolation of the source at `m⁻¹(pixel)`; outside the source it is black
/// (OpenCV's constant border 0).
pub fn warp_similarity(img: &RgbImage, m: &Similarity, width: u32, height: u32) -> RgbImage {
    let s2 = m.a * m.a + m.b * m.b;
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let mut out = RgbImage::new(width, height);
    if s2 <= 0.0 || w == 0 || h == 0 {
        return out;
    }
    let pixel = |x: i64, y: i64| -> [f64; 3] {
        if x < 0 || y < 0 || x >= w || y >= h {
            [0.0; 3]
        } else {
            let p = img.get_pixel(x as u32, y as u32);
            [f64::from(p[0]), f64::from(p[1]), f64::from(p[2])]
        }
    };
    for oy in 0..height {
        for ox in 0..width {
            let (u, v) = (f64::from(ox) - m.tx, f64::from(oy) - m.ty);
            let sx = (m.a * u + m.b * v) / s2;
            let sy = (-m.b * u + m.a * v) / s2;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let (p00, p10) = (pixel(x0, y0), pixel(x0 + 1, y0));
            let (p01, p11) = (pixel(x0, y0 + 1), pixel(x0 + 1, y0 + 1));
            let mut rgb = [0u8; 3];
            for c in 0..3 {
                let top = p00[c] * (1.0 - fx) + p10[c] * fx;
                let bottom = p01[c] * (1.0 - fx) + p11[c] * fx;
                rgb[c] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
            }
            out.put_pixel(ox, oy, Rgb(rgb));
        }
    }
    out
}

/// The aligned 112 × 112 crop of a face with 5 landmarks (template order), and the RMS
/// landmark residual of the fit in template pixels.
///
/// # Errors
/// When the landmarks are degenerate.
pub fn align_112(img: &RgbImage, five: &[[f32; 2]; 5]) -> Result<(RgbImage, f64)> {
    let m = estimate_similarity(five, &ARCFACE_TEMPLATE_112)?;
    let residual = m.rms_residual(five, &ARCFACE_TEMPLATE_112);
    Ok((warp_similarity(img, &m, 112, 112), residual))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_similarity_recovers_a_known_transform_exactly() {
        let truth = Similarity {
            a: 0.8 * 0.3f64.cos(),
            b: 0.8 * 0.3f64.sin(),
            tx: 12.5,
            ty: -4.0,
        };
        let src: Vec<[f32; 2]> = vec![[10.0, 20.0], [60.0, 22.0], [35.0, 50.0], [15.0, 80.0]];
        let dst: Vec<[f32; 2]> = src
            .iter()
            .map(|p| {
                let [x, y] = truth.apply(*p);
                [x as f32, y as f32]
            })
            .collect();
        let m = estimate_similarity(&src, &dst).unwrap();
        assert!((m.a - truth.a).abs() < 1e-5 && (m.b - truth.b).abs() < 1e-5);
        assert!((m.tx - truth.tx).abs() < 1e-3 && (m.ty - truth.ty).abs() < 1e-3);
        assert!(m.rms_residual(&src, &dst) < 1e-4);
        assert!(estimate_similarity(&src[..1], &dst[..1]).is_err());
        assert!(estimate_similarity(&[[1.0, 1.0]; 3], &dst[..3]).is_err());
    }

    #[test]
    fn onnx_warp_by_identity_and_translation_moves_pixels() {
        let mut img = RgbImage::new(8, 6);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = Rgb([(x * 30) as u8, (y * 40) as u8, 7]);
        }
        let id = Similarity {
            a: 1.0,
            b: 0.0,
            tx: 0.0,
            ty: 0.0,
        };
        assert_eq!(warp_similarity(&img, &id, 8, 6), img);
        let shift = Similarity { tx: 2.0, ..id };
        let out = warp_similarity(&img, &shift, 8, 6);
        assert_eq!(out.get_pixel(5, 3), img.get_pixel(3, 3));
        assert_eq!(out.get_pixel(0, 0), &Rgb([0, 0, 0]));
        // Half-pixel shift: the mean of two neighbours.
        let half = Similarity { tx: 0.5, ..id };
        let out = warp_similarity(&img, &half, 8, 6);
        assert_eq!(out.get_pixel(3, 2)[0], 75);
    }
}
