//! In-memory ProcFace training data and image ↔ tensor conversions.

use crate::procface::render_sample;
use anyhow::Result;
use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;
use rayon::prelude::*;
use std::ops::Range;

/// ProcFace images kept as 8-bit RGB (CHW-planar bytes), labelled by identity index.
pub struct FaceSet {
    /// Image side length.
    pub size: usize,
    /// `3 * size * size` bytes per image, channel-planar.
    pub pixels: Vec<u8>,
    /// Identity index (0-based position in the identity range) of each image.
    pub labels: Vec<usize>,
    /// The identity seeds rendered.
    pub identities: Range<u64>,
    /// Samples per identity.
    pub per_identity: u64,
}

impl FaceSet {
    /// Renders samples `0..per_identity` of every identity seed in `identities` in parallel.
    pub fn render(identities: Range<u64>, per_identity: u64, size: u32) -> Result<Self> {
        anyhow::ensure!(size > 0, "image size must be positive");
        anyhow::ensure!(per_identity > 0, "per-identity count must be positive");
        anyhow::ensure!(!identities.is_empty(), "identity range is empty");
        let jobs: Vec<(u64, u64)> = identities
            .clone()
            .flat_map(|i| (0..per_identity).map(move |s| (i, s)))
            .collect();
        let images: Vec<Vec<u8>> = jobs
            .par_iter()
            .map(|&(i, s)| planar_bytes(&render_sample(i, s, size)))
            .collect();
        let labels = jobs
            .iter()
            .map(|&(i, _)| (i - identities.start) as usize)
            .collect();
        Ok(Self {
            size: size as usize,
            pixels: images.concat(),
            labels,
            identities,
            per_identity,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Images `idx` as a `(B, 3, size, size)` tensor in [-1, 1].
    pub fn batch(&self, idx: &[usize], device: &Device) -> Result<Tensor> {
        let n = 3 * self.size * self.size;
        let mut data = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            data.extend(
                self.pixels[i * n..(i + 1) * n]
                    .iter()
                    .map(|&p| p as f32 / 127.5 - 1.0),
            );
        }
        Ok(Tensor::from_vec(
            data,
            (idx.len(), 3, self.size, self.size),
            device,
        )?)
    }

    /// Image `i` as an `RgbImage`.
    pub fn image(&self, i: usize) -> RgbImage {
        let s = self.size;
        let plane = s * s;
        let px = &self.pixels[i * 3 * plane..(i + 1) * 3 * plane];
        RgbImage::from_fn(s as u32, s as u32, |x, y| {
            let p = y as usize * s + x as usize;
            image::Rgb([px[p], px[plane + p], px[2 * plane + p]])
        })
    }

    /// A random batch of indices (with replacement).
    pub fn random_indices(&self, rng: &mut impl Rng, batch: usize) -> Vec<usize> {
        (0..batch)
            .map(|_| rng.random_range(0..self.len()))
            .collect()
    }
}

/// Channel-planar bytes of an RGB image.
pub fn planar_bytes(img: &RgbImage) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (p, px) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + p] = px.0[c];
        }
    }
    out
}

/// RGB images (any common size) as a `(B, 3, size, size)` tensor in [-1, 1], resized
/// bilinearly when they are not `size`×`size` already.
pub fn images_to_tensor(images: &[RgbImage], size: u32, device: &Device) -> Result<Tensor> {
    let n = 3 * (size * size) as usize;
    let mut data = Vec::with_capacity(images.len() * n);
    for img in images {
        let bytes = if img.dimensions() == (size, size) {
            planar_bytes(img)
        } else {
            planar_bytes(&image::imageops::resize(
                img,
                size,
                size,
                image::imageops::FilterType::Triangle,
            ))
        };
        data.extend(bytes.iter().map(|&p| p as f32 / 127.5 - 1.0));
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, size as usize, size as usize),
        device,
    )?)
}
