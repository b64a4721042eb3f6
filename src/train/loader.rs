//! Parallel batch loader: a prefetch thread decodes and augments each batch with rayon and
//! hands finished NCHW f32 batches (pixels in [-1, 1], 112×112 unless the backbone's input
//! size differs) to the trainer over a bounded channel.
//!
//! The epoch order is a seeded shuffle of all images (`drop_last`, like arcface_torch); the
//! augmentation of image `i` in epoch `e` uses [`sample_rng`]`(seed, e, i)`, so batches are
//! reproducible whatever the thread count.

use super::augment::{augment, sample_rng, AugmentConfig};
use super::data::ImageSource;
use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, Receiver};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One decoded, augmented batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Position of the batch in its epoch.
    pub index: usize,
    /// `B × 3 × S × S` values in [-1, 1], row-major NCHW.
    pub pixels: Vec<f32>,
    /// Labels of the `B` images.
    pub labels: Vec<u32>,
}

impl Batch {
    /// The pixels as a `[B, 3, size, size]` tensor on `device`.
    pub fn tensor(&self, size: usize, device: &Device) -> Result<Tensor> {
        let s = size;
        if self.pixels.len() != self.labels.len() * 3 * s * s {
            anyhow::bail!(
                "batch of {} images holds {} values, not {}x3x{s}x{s}",
                self.labels.len(),
                self.pixels.len(),
                self.labels.len()
            );
        }
        Ok(Tensor::from_slice(
            &self.pixels,
            (self.labels.len(), 3, s, s),
            device,
        )?)
    }
}

/// Shuffled image order of `epoch` (a pure function of `n`, `seed` and `epoch`).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    key[16..23].copy_from_slice(b"shuffle");
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::from_seed(key));
    order
}

/// Writes `img` (resized to `size`×`size` bilinearly if needed) as CHW values `v/127.5 − 1`.
pub fn write_chw(img: &RgbImage, size: usize, out: &mut [f32]) {
    let s = size as u32;
    let resized;
    let img = if img.dimensions() == (s, s) {
        img
    } else {
        resized = image::imageops::resize(img, s, s, image::imageops::FilterType::Triangle);
        &resized
    };
    let plane = (s * s) as usize;
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
}

/// `[N, 3, size, size]` tensor of un-augmented images (resized when needed).
pub fn images_to_tensor(images: &[RgbImage], size: usize, device: &Device) -> Result<Tensor> {
    let s = size;
    let mut pixels = vec![0f32; images.len() * 3 * s * s];
    pixels
        .par_chunks_mut(3 * s * s)
        .zip(images.par_iter())
        .for_each(|(out, img)| write_chw(img, s, out));
    Ok(Tensor::from_vec(pixels, (images.len(), 3, s, s), device)?)
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Side length of the network input.
    pub image_size: usize,
    /// Augmentation.
    pub augment: AugmentConfig,
    /// Seed of shuffling and augmentation.
    pub seed: u64,
    /// Batches decoded ahead of the trainer.
    pub prefetch: usize,
}

/// Number of full batches per epoch.
pub fn batches_per_epoch(num_images: usize, batch_size: usize) -> usize {
    num_images / batch_size.max(1)
}

/// Decodes one batch of `indices` (images of `source`) for `epoch`.
pub fn load_batch(
    source: &dyn ImageSource,
    indices: &[usize],
    cfg: &LoaderConfig,
    epoch: usize,
    index: usize,
) -> Result<Batch> {
    let plane = 3 * cfg.image_size * cfg.image_size;
    let mut pixels = vec![0f32; indices.len() * plane];
    pixels
        .par_chunks_mut(plane)
        .zip(indices.par_iter())
        .try_for_each(|(out, &i)| -> Result<()> {
            let img = source
                .image(i)
                .map_err(|e| anyhow!("training image {i}: {e:#}"))?;
            let mut rng = sample_rng(cfg.seed, epoch as u64, i as u64);
            write_chw(&augment(&img, &cfg.augment, &mut rng), cfg.image_size, out);
            Ok(())
        })?;
    Ok(Batch {
        index,
        pixels,
        labels: indices.iter().map(|&i| source.label(i)).collect(),
    })
}

/// Batches of one epoch, produced ahead on a background thread.
pub struct EpochLoader {
    rx: Option<Receiver<Result<Batch>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EpochLoader {
    /// Starts producing batches `first_batch..` of `epoch`.
    pub fn start(
        source: Arc<dyn ImageSource>,
        cfg: LoaderConfig,
        epoch: usize,
        first_batch: usize,
    ) -> Result<Self> {
        let (tx, rx) = bounded(cfg.prefetch.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = stop.clone();
        let handle = std::thread::Builder::new()
            .name("train-loader".into())
            .spawn(move || {
                let order = epoch_order(source.len(), cfg.seed, epoch);
                let nb = batches_per_epoch(source.len(), cfg.batch_size);
                for b in first_batch..nb {
                    if stop_thread.load(Ordering::Relaxed) {
                        break;
                    }
                    let idx = &order[b * cfg.batch_size..(b + 1) * cfg.batch_size];
                    let batch = load_batch(source.as_ref(), idx, &cfg, epoch, b);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                }
            })
            .map_err(|e| anyhow!("cannot start the data-loader thread: {e}"))?;
        Ok(Self {
            rx: Some(rx),
            stop,
            handle: Some(handle),
        })
    }
}

impl Iterator for EpochLoader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for EpochLoader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a producer waiting on a full channel.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::ProcFaceSource;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 7, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 7, 2));
        assert_ne!(a, epoch_order(50, 8, 1));
    }

    #[test]
    fn loader_batches_are_reproducible_and_in_range() {
        let source: Arc<dyn ImageSource> = Arc::new(ProcFaceSource {
            first_identity: 0,
            identities: 3,
            per_identity: 3,
            size: 64,
        });
        let cfg = LoaderConfig {
            batch_size: 4,
            image_size: 112,
            augment: AugmentConfig {
                hflip: true,
                num_ops: 2,
                magnitude: 9,
            },
            seed: 3,
            prefetch: 2,
        };
        let all: Vec<Batch> = EpochLoader::start(source.clone(), cfg.clone(), 0, 0)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(all.len(), 2, "9 images, batch 4, drop_last");
        assert!(all[0].pixels.iter().all(|v| (-1.0..=1.0).contains(v)));
        let t = all[1].tensor(112, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[4, 3, 112, 112]);
        // Starting at batch 1 gives the same second batch.
        let resumed: Vec<Batch> = EpochLoader::start(source.clone(), cfg.clone(), 0, 1)
            .unwrap()
            .collect::<Result<_>>()
            .unwrap();
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].pixels, all[1].pixels);
        assert_eq!(resumed[0].labels, all[1].labels);
        // Dropping a loader early does not hang.
        let mut early = EpochLoader::start(source, cfg, 1, 0).unwrap();
        assert!(early.next().is_some());
        drop(early);
    }
}
