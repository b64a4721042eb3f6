//! Verification of a backbone with the InsightFace protocol: embedding =
//! `normalise(f(x) + f(flip(x)))`, then [`crate::analysis::verification::verify`]
//! (10 folds, squared L2 distance).

use super::loader::images_to_tensor;
use super::net::TrainNet;
use crate::analysis::embed::FrModel;
use crate::analysis::verification::{verify, VerificationResult};
use crate::dataset::verification_bin::VerificationPairs;
use crate::models::iresnet::{normalise, IResNet};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use candle_core::Tensor;
use image::RgbImage;
use std::path::Path;

/// A backbone that can be evaluated: normalised `f(x) + f(flip(x))` of decoded images.
pub trait Embedder {
    /// Normalised flip-sum embeddings `(n, d)` of decoded images, each preprocessed the way
    /// the model expects.
    fn embed_images(&self, images: &[RgbImage], device: &Device) -> Result<Tensor>;
}

/// Resizes to `size` in [-1, 1] and normalises `flip_sum(x)`: the candle backbones' path.
fn embed_resized(
    images: &[RgbImage],
    size: usize,
    device: &Device,
    flip_sum: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let x = images_to_tensor(images, size, device)?;
    Ok(normalise(&flip_sum(&x)?)?)
}

/// Any analysis FR model (IResNet or ONNX) evaluates with its own preprocessing (for ONNX
/// models the descriptor's size, channel order and normalisation).
impl Embedder for FrModel {
    fn embed_images(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let inputs = images
            .iter()
            .map(|img| self.preprocess(img))
            .collect::<Result<Vec<_>>>()?;
        let e = self.embed(inputs.concat(), images.len(), true)?;
        Ok(Tensor::from_vec(e, (images.len(), self.dim()), device)?)
    }
}

impl Embedder for IResNet {
    fn embed_images(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        embed_resized(images, self.input_size(), device, |x| {
            Ok(self.embed_flip_sum(x)?)
        })
    }
}

impl Embedder for TrainNet {
    fn embed_images(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        embed_resized(images, self.config().input_size, device, |x| {
            let a = self.forward_t(x, false)?;
            let b = self.forward_t(&x.flip(&[3])?, false)?;
            Ok((a + b)?)
        })
    }
}

/// Images of a verification set.
#[derive(Debug, Clone)]
enum Images {
    /// Encoded as in a `.bin` (decoded batch by batch).
    Encoded(VerificationPairs),
    /// Already decoded.
    Decoded(Vec<RgbImage>),
}

/// A verification set: unique images and the pairs over them.
#[derive(Debug, Clone)]
pub struct ValidationSet {
    /// Display name (file stem of a `.bin`).
    pub name: String,
    images: Images,
    pairs: Vec<(usize, usize)>,
    issame: Vec<bool>,
}

impl ValidationSet {
    /// Reads an InsightFace `.bin` (pair `k` = images `2k`, `2k + 1`).
    pub fn from_bin(path: &Path) -> Result<Self> {
        let pairs = VerificationPairs::read(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let n = pairs.len();
        Ok(Self {
            name,
            issame: pairs.issame.clone(),
            pairs: (0..n).map(|k| (2 * k, 2 * k + 1)).collect(),
            images: Images::Encoded(pairs),
        })
    }

    /// A set of decoded `images` with `pairs` of indices into them.
    pub fn from_images(
        name: impl Into<String>,
        images: Vec<RgbImage>,
        pairs: Vec<(usize, usize)>,
        issame: Vec<bool>,
    ) -> Result<Self> {
        if pairs.len() != issame.len() {
            bail!("{} pairs but {} issame labels", pairs.len(), issame.len());
        }
        if let Some(&(a, b)) = pairs.iter().find(|(a, b)| *a.max(b) >= images.len()) {
            bail!("pair ({a}, {b}) indexes past {} images", images.len());
        }
        Ok(Self {
            name: name.into(),
            images: Images::Decoded(images),
            pairs,
            issame,
        })
    }

    /// Number of pairs.
    pub fn num_pairs(&self) -> usize {
        self.pairs.len()
    }

    /// Number of distinct images.
    pub fn num_images(&self) -> usize {
        match &self.images {
            Images::Encoded(p) => p.encoded.len(),
            Images::Decoded(v) => v.len(),
        }
    }

    fn decode(&self, range: std::ops::Range<usize>) -> Result<Vec<RgbImage>> {
        match &self.images {
            Images::Encoded(p) => {
                use rayon::prelude::*;
                range
                    .into_par_iter()
                    .map(|i| p.decode_image(i).with_context(|| self.name.clone()))
                    .collect()
            }
            Images::Decoded(v) => Ok(v[range].to_vec()),
        }
    }

    /// `[num_images × d]` normalised flip-sum embeddings, row-major f64.
    pub fn embed(
        &self,
        model: &dyn Embedder,
        device: &Device,
        batch_size: usize,
    ) -> Result<(Vec<f64>, usize)> {
        let n = self.num_images();
        let mut out = Vec::new();
        let mut dim = 0;
        for start in (0..n).step_by(batch_size.max(1)) {
            let images = self.decode(start..(start + batch_size.max(1)).min(n))?;
            let e = model.embed_images(&images, device)?;
            dim = e.dim(1)?;
            out.extend(
                e.to_dtype(candle_core::DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?,
            );
        }
        Ok((out, dim))
    }

    /// Runs the 10-fold protocol on `model`.
    pub fn evaluate(
        &self,
        model: &dyn Embedder,
        device: &Device,
        batch_size: usize,
    ) -> Result<VerificationResult> {
        let (emb, dim) = self.embed(model, device, batch_size)?;
        let mut rows = Vec::with_capacity(2 * self.pairs.len() * dim);
        for &(a, b) in &self.pairs {
            rows.extend_from_slice(&emb[a * dim..(a + 1) * dim]);
            rows.extend_from_slice(&emb[b * dim..(b + 1) * dim]);
        }
        verify(&rows, dim, &self.issame).map_err(|e| anyhow!("{}: {e:#}", self.name))
    }
}

/// Images per forward batch in evaluation.
pub const EVAL_BATCH: usize = 64;
