//! Face-recognition embeddings of an ImageFolder dataset (`DIR/<identity>/<sample>.png`).
//!
//! Preprocessing follows the reference's context extraction: RGB bytes → `x / 255`,
//! normalised with mean 0.5 / std 0.5 to [-1, 1], then — when the image is not
//! 112 × 112 — resized with bilinear interpolation exactly like torch
//! `F.interpolate(x, size=(112, 112), mode="bilinear", align_corners=False)` (no
//! antialiasing; see [`crate::imageops::resize_bilinear`]). The IResNet embedding (optionally
//! `f(x) + f(flip(x))`) is L2-normalised.
//!
//! Results are cached per image in a safetensors file keyed by the image's canonical
//! path, modification time and size, the model file's SHA-256 and the flip flag, so a
//! re-analysis of an unchanged dataset does not run the network at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::imageops::resize_bilinear;
use sha2::{Digest, Sha256};

use crate::models::config::read_config;
use crate::models::iresnet::{normalise, IResNet, IResNetConfig};
use crate::onnx::detect::FaceDetector;

/// Mixed into the model hash of cached embeddings of aligned images.
const ALIGNMENT_CACHE_TAG: &str = "+aligned-112/insightface-template/v1";

/// Side length of the standard (arcface_torch) face-recognition input.
pub const FR_INPUT_SIZE: usize = 112;

/// Marker stored in the metadata of embedding files written by [`Embeddings::save`].
pub const EMBEDDINGS_FORMAT: &str = "idiff-studio-embeddings/1";

/// The images of an ImageFolder: one sub-folder per identity, sorted by name.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageFolder {
    /// The dataset folder.
    pub root: PathBuf,
    /// Identity folder names; label `k` is `identities[k]`.
    pub identities: Vec<String>,
    /// Image paths relative to `root` (`<identity>/<file>`), identity by identity.
    pub files: Vec<String>,
    /// Identity index of every file.
    pub labels: Vec<u32>,
}

/// Lists `dir/<identity>/<image>` files, both levels sorted by name.
///
/// Hidden entries (names starting with `.`, e.g. unfinished `.partial-*` folders) and
/// files at the top level (grid, manifest) are skipped; identity folders without images
/// are left out.
///
/// # Errors
/// When `dir` cannot be read or holds no images.
pub fn scan_image_folder(dir: &Path) -> Result<ImageFolder> {
    let mut identity_dirs = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.path().is_dir() {
            identity_dirs.push(name);
        }
    }
    identity_dirs.sort();
    let mut folder = ImageFolder {
        root: dir.to_path_buf(),
        identities: Vec::new(),
        files: Vec::new(),
        labels: Vec::new(),
    };
    for name in identity_dirs {
        let sub = dir.join(&name);
        let mut images: Vec<String> = std::fs::read_dir(&sub)
            .with_context(|| format!("cannot read folder {}", sub.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| !f.starts_with('.') && crate::files::is_image_name(f))
            .collect();
        if images.is_empty() {
            continue;
        }
        images.sort();
        let label = folder.identities.len() as u32;
        for f in images {
            folder.files.push(format!("{name}/{f}"));
            folder.labels.push(label);
        }
        folder.identities.push(name);
    }
    if folder.files.is_empty() {
        bail!(
            "{}: no images found (expected <identity>/<image>.png sub-folders)",
            dir.display()
        );
    }
    Ok(folder)
}

/// Planar `3 × size × size` network input in [-1, 1] from an RGB image of any size
/// (bilinear resize when the sizes differ).
pub fn preprocess(img: &RgbImage, size: usize) -> Result<Vec<f32>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planar = vec![0.0f32; 3 * h * w];
    for (p, px) in img.pixels().enumerate() {
        for c in 0..3 {
            planar[c * h * w + p] = (f32::from(px[c]) / 255.0 - 0.5) / 0.5;
        }
    }
    if (h, w) == (size, size) {
        return Ok(planar);
    }
    resize_bilinear(&planar, 3, (h, w), (size, size))
}

/// The network behind an [`FrModel`].
#[derive(Debug, Clone)]
enum Backbone {
    /// IResNet weights run by candle.
    IResNet(Box<IResNet>),
    /// An ONNX recognizer run by tract (its descriptor sets size and normalisation).
    Onnx(Box<crate::onnx::fr::OnnxFrModel>),
}

/// Face detection and 5-point alignment run before the FR preprocessing.
#[derive(Debug, Clone)]
struct Aligner {
    detector: Arc<FaceDetector>,
    /// Images in which no face was found (embedded whole instead).
    unaligned: Arc<AtomicUsize>,
}

/// A loaded face-recognition backbone plus the facts the cache needs.
#[derive(Debug, Clone)]
pub struct FrModel {
    model: Backbone,
    sha256: String,
    device: Device,
    aligner: Option<Aligner>,
}

impl FrModel {
    /// Loads IResNet weights (`.pth` / `.pt` torch zip or safetensors) or an ONNX recognizer
    /// (`.onnx`, with its optional descriptor `<model>.json`). Without a config file the
    /// IResNet architecture (blocks per stage, widths, input size) is read off the weights.
    ///
    /// # Errors
    /// When the file cannot be read or does not match the architecture.
    pub fn load(weights: &Path, config: Option<&Path>, device: &Device) -> Result<Self> {
        if crate::onnx::is_onnx_file(weights) {
            let model = crate::onnx::fr::OnnxFrModel::load(weights)?;
            return Ok(Self {
                sha256: model.sha256().to_owned(),
                model: Backbone::Onnx(Box::new(model)),
                device: device.clone(),
                aligner: None,
            });
        }
        let sha256 = crate::files::sha256_file(weights)?;
        let cfg = config.map(read_config::<IResNetConfig>).transpose()?;
        let model = IResNet::load_or_infer(weights, cfg.as_ref(), device)?;
        Ok(Self {
            model: Backbone::IResNet(Box::new(model)),
            sha256,
            device: device.clone(),
            aligner: None,
        })
    }

    /// The same model with every image first detected and aligned to the InsightFace
    /// 112 × 112 template (best-scoring face), as the reference evaluates generated faces.
    /// Images without a detected face are embedded whole and counted
    /// ([`FrModel::unaligned_count`]). Cached embeddings are kept apart from unaligned ones.
    pub fn with_alignment(mut self, detector: FaceDetector) -> Self {
        let mut h = Sha256::new();
        h.update(self.sha256.as_bytes());
        h.update(ALIGNMENT_CACHE_TAG.as_bytes());
        self.sha256 = format!("{:x}", h.finalize());
        self.aligner = Some(Aligner {
            detector: Arc::new(detector),
            unaligned: Arc::new(AtomicUsize::new(0)),
        });
        self
    }

    /// Whether images are aligned before embedding.
    pub fn aligns(&self) -> bool {
        self.aligner.is_some()
    }

    /// Images so far in which alignment found no face (embedded whole).
    pub fn unaligned_count(&self) -> usize {
        self.aligner
            .as_ref()
            .map_or(0, |a| a.unaligned.load(Ordering::Relaxed))
    }

    /// The aligned 112 × 112 crop of the best face, or `None` when there is none.
    fn align(&self, img: &RgbImage) -> Result<Option<RgbImage>> {
        let Some(a) = &self.aligner else {
            return Ok(None);
        };
        let faces = a.detector.detect(img)?;
        match faces.first() {
            Some(face) => Ok(Some(crate::onnx::align::align_112(img, &face.five)?.0)),
            None => {
                a.unaligned.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// SHA-256 (hex) of the weights file.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Embedding width.
    pub fn dim(&self) -> usize {
        match &self.model {
            Backbone::IResNet(m) => m.config().num_features,
            Backbone::Onnx(m) => m.dim(),
        }
    }

    /// Input `(height, width)` of the model.
    pub fn input_hw(&self) -> (usize, usize) {
        match &self.model {
            Backbone::IResNet(m) => (m.input_size(), m.input_size()),
            Backbone::Onnx(m) => (m.descriptor().input_size[0], m.descriptor().input_size[1]),
        }
    }

    /// The model's planar `3 × H × W` input for an RGB image of any size (aligned first when
    /// [`FrModel::with_alignment`] asked for it; bilinear resize; [-1, 1] for IResNet, the
    /// descriptor's channel order and mean/std for ONNX models).
    ///
    /// # Errors
    /// When the image is empty.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let aligned = self.align(img)?;
        let img = aligned.as_ref().unwrap_or(img);
        match &self.model {
            Backbone::IResNet(m) => preprocess(img, m.input_size()),
            Backbone::Onnx(m) => m.descriptor().preprocess(img),
        }
    }

    /// L2-normalised embeddings of `n` inputs from [`FrModel::preprocess`], row-major
    /// `n × dim`; `flip` embeds `f(x) + f(flip(x))`.
    ///
    /// # Errors
    /// On a shape mismatch or a failing forward pass.
    pub fn embed(&self, inputs: Vec<f32>, n: usize, flip: bool) -> Result<Vec<f32>> {
        let (h, w) = self.input_hw();
        match &self.model {
            Backbone::IResNet(m) => {
                let x = Tensor::from_vec(inputs, (n, 3, h, w), &self.device)?;
                let raw = if flip {
                    m.embed_flip_sum(&x)?
                } else {
                    m.forward(&x)?
                };
                Ok(normalise(&raw)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            }
            Backbone::Onnx(m) => {
                let per = 3 * h * w;
                anyhow::ensure!(
                    inputs.len() == n * per,
                    "{} inputs of {per} values expected, got {} values",
                    n,
                    inputs.len()
                );
                let mut out = Vec::with_capacity(n * m.dim());
                for x in inputs.chunks_exact(per) {
                    let mut raw = m.forward_raw(x)?;
                    if flip {
                        let flipped: Vec<f32> = x
                            .chunks_exact(w)
                            .flat_map(|row| row.iter().rev().copied())
                            .collect();
                        for (r, f) in raw.iter_mut().zip(m.forward_raw(&flipped)?) {
                            *r += f;
                        }
                    }
                    let e = crate::onnx::fr::l2_normalised(raw).ok_or_else(|| {
                        anyhow!("{}: zero or non-finite embedding", m.path().display())
                    })?;
                    out.extend(e);
                }
                Ok(out)
            }
        }
    }
}

/// L2-normalised embeddings with identity labels and file names.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Embedding width.
    pub dim: usize,
    /// Row-major `len × dim` values.
    pub data: Vec<f32>,
    /// Identity index of each row (into `identities`).
    pub labels: Vec<u32>,
    /// Identity names, by label.
    pub identities: Vec<String>,
    /// File name of each row (relative to the dataset folder), or the row number.
    pub files: Vec<String>,
}

impl Embeddings {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True without rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`.
    ///
    /// # Panics
    /// When `i >= len()`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Checks shapes, labels and finiteness.
    ///
    /// # Errors
    /// On the first inconsistency, naming it.
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 {
            bail!("embedding width is 0");
        }
        if self.data.len() != self.labels.len() * self.dim {
            bail!(
                "{} embedding values do not make {} rows of {}",
                self.data.len(),
                self.labels.len(),
                self.dim
            );
        }
        if self.files.len() != self.labels.len() {
            bail!("{} file names for {} rows", self.files.len(), self.len());
        }
        if let Some(l) = self
            .labels
            .iter()
            .find(|&&l| l as usize >= self.identities.len())
        {
            bail!(
                "label {l} has no identity name ({} names)",
                self.identities.len()
            );
        }
        if let Some(i) = self.data.iter().position(|v| !v.is_finite()) {
            bail!("embedding row {} has a non-finite value", i / self.dim);
        }
        Ok(())
    }

    /// Writes a safetensors file: `embeddings` F32 `[N, dim]`, `labels` U32 `[N]`, and
    /// the identity and file names as JSON in the metadata (`identities`, `files`).
    ///
    /// # Errors
    /// On I/O failure.
    pub fn save(&self, path: &Path) -> Result<()> {
        let emb: Vec<u8> = self.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let lab: Vec<u8> = self.labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = self.len();
        let tensors = [
            (
                "embeddings",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![n, self.dim], &emb)?,
            ),
            (
                "labels",
                safetensors::tensor::TensorView::new(Dtype::U32, vec![n], &lab)?,
            ),
        ];
        let metadata: HashMap<String, String> = [
            ("format".to_owned(), EMBEDDINGS_FORMAT.to_owned()),
            (
                "identities".to_owned(),
                serde_json::to_string(&self.identities)?,
            ),
            ("files".to_owned(), serde_json::to_string(&self.files)?),
        ]
        .into();
        let bytes = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| anyhow!("cannot serialise embeddings: {e}"))?;
        crate::files::write_atomic(path, &bytes)
    }

    /// Reads an embeddings file: a safetensors file with a float tensor `embeddings`
    /// `[N, dim]` and an integer tensor `labels` `[N]` (names from the metadata when
    /// written by [`Embeddings::save`], else the label values and row numbers). Rows are
    /// L2-normalised on load.
    ///
    /// # Errors
    /// One line naming the file and the offending tensor.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("not a safetensors file ({e})"))?;
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| anyhow!("not a safetensors file ({e})"))?;
        let emb = st
            .tensor("embeddings")
            .map_err(|_| anyhow!("tensor `embeddings` is missing"))?;
        let [n, dim] = emb.shape() else {
            bail!(
                "tensor `embeddings` has shape {:?}, expected [N, dim]",
                emb.shape()
            );
        };
        let (n, dim) = (*n, *dim);
        let mut data = float_values(&emb).context("tensor `embeddings`")?;
        let lab = st
            .tensor("labels")
            .map_err(|_| anyhow!("tensor `labels` is missing"))?;
        if lab.shape() != [n] {
            bail!(
                "tensor `labels` has shape {:?}, expected [{n}]",
                lab.shape()
            );
        }
        let raw = int_values(&lab).context("tensor `labels`")?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let names: Option<Vec<String>> = meta
            .get("identities")
            .and_then(|s| serde_json::from_str(s).ok());
        let (labels, identities) = match names {
            Some(names) => {
                let labels: Vec<u32> = raw
                    .iter()
                    .map(|&l| u32::try_from(l).map_err(|_| anyhow!("label {l} is negative")))
                    .collect::<Result<_>>()?;
                (labels, names)
            }
            None => dense_labels(&raw),
        };
        let files: Vec<String> = meta
            .get("files")
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_else(|| (0..n).map(|i| i.to_string()).collect());
        normalise_rows(&mut data, dim);
        let e = Self {
            dim,
            data,
            labels,
            identities,
            files,
        };
        e.validate()?;
        Ok(e)
    }
}

/// Maps arbitrary integer labels to `0..K` in ascending label order; names are the values.
fn dense_labels(raw: &[i64]) -> (Vec<u32>, Vec<String>) {
    let mut distinct: Vec<i64> = raw.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let index: HashMap<i64, u32> = distinct
        .iter()
        .enumerate()
        .map(|(k, &l)| (l, k as u32))
        .collect();
    (
        raw.iter().map(|l| index[l]).collect(),
        distinct.iter().map(|l| l.to_string()).collect(),
    )
}

/// Divides every row by its L2 norm. Rows of norm 0 stay zero; rows already of unit norm
/// (within 1e-6) are kept bit for bit, so saved embeddings load unchanged.
pub fn normalise_rows(data: &mut [f32], dim: usize) {
    for row in data.chunks_exact_mut(dim.max(1)) {
        let norm = row
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 && (norm - 1.0).abs() > 1e-6 {
            row.iter_mut()
                .for_each(|v| *v = (f64::from(*v) / norm) as f32);
        }
    }
}

/// Values of a float safetensors tensor as f32.
pub(crate) fn float_values(t: &safetensors::tensor::TensorView) -> Result<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("dtype {other:?} is not a float type"),
    })
}

/// Values of an integer safetensors tensor as i64.
fn int_values(t: &safetensors::tensor::TensorView) -> Result<Vec<i64>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::I64 => d
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            .collect(),
        Dtype::U32 => d
            .chunks_exact(4)
            .map(|b| i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::I32 => d
            .chunks_exact(4)
            .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        Dtype::U8 => d.iter().map(|&b| i64::from(b)).collect(),
        other => bail!("dtype {other:?} is not an integer type (i64, i32, u32, u8)"),
    })
}

/// How [`embed_folder`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedOptions {
    /// Use `f(x) + f(flip(x))`.
    pub flip: bool,
    /// Images per forward pass (at least 1).
    pub batch_size: usize,
    /// Folder of the embedding cache; `None` disables caching.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EmbedOptions {
    fn default() -> Self {
        Self {
            flip: false,
            batch_size: 32,
            cache_dir: default_cache_dir(),
        }
    }
}

/// `$IDIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/idiff-studio/embeddings`, else
/// `$HOME/.cache/idiff-studio/embeddings`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("IDIFF_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("idiff-studio").join("embeddings"))
}

/// Progress of [`embed_folder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbedProgress {
    /// Images embedded or found in the cache so far.
    pub done: usize,
    /// Images in the dataset.
    pub total: usize,
    /// Of those, images taken from the cache.
    pub cached: usize,
}

/// Embeds every image of an ImageFolder, reusing cached rows.
///
/// `progress` is called after the cache lookup and after every batch; a set `cancel`
/// stops between batches with an error. A cache that cannot be written only logs a
/// warning.
///
/// # Errors
/// On unreadable images, model failures or cancellation.
pub fn embed_folder(
    dir: &Path,
    model: &FrModel,
    opts: &EmbedOptions,
    progress: &mut dyn FnMut(EmbedProgress),
    cancel: Option<&AtomicBool>,
) -> Result<Embeddings> {
    let folder = scan_image_folder(dir)?;
    let root = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let keys: Vec<[u8; 32]> = folder
        .files
        .iter()
        .map(|f| image_key(&root.join(f), model.sha256(), opts.flip))
        .collect::<Result<_>>()?;
    let cache_file = opts
        .cache_dir
        .as_ref()
        .map(|d| d.join(cache_file_name(&root, model.sha256(), opts.flip)));
    let cached = cache_file
        .as_deref()
        .and_then(|p| read_cache(p, model.dim()))
        .unwrap_or_default();
    let n = folder.files.len();
    let dim = model.dim();
    let mut data = vec![0.0f32; n * dim];
    let mut missing = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        match cached.get(key) {
            Some(row) => data[i * dim..(i + 1) * dim].copy_from_slice(row),
            None => missing.push(i),
        }
    }
    let from_cache = n - missing.len();
    let mut done = from_cache;
    progress(EmbedProgress {
        done,
        total: n,
        cached: from_cache,
    });
    for batch in missing.chunks(opts.batch_size.max(1)) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            bail!("embedding cancelled after {done} of {n} images");
        }
        let inputs: Vec<Vec<f32>> = batch
            .par_iter()
            .map(|&i| load_input(&root.join(&folder.files[i]), model))
            .collect::<Result<_>>()?;
        let emb = model.embed(inputs.concat(), batch.len(), opts.flip)?;
        for (row, &i) in emb.chunks_exact(dim).zip(batch) {
            data[i * dim..(i + 1) * dim].copy_from_slice(row);
        }
        done += batch.len();
        progress(EmbedProgress {
            done,
            total: n,
            cached: from_cache,
        });
    }
    if let Some(path) = cache_file.filter(|_| !missing.is_empty() || cached.len() != n) {
        if let Err(e) = write_cache(&path, &keys, &data, dim) {
            tracing::warn!("embedding cache not written: {e:#}");
        }
    }
    let e = Embeddings {
        dim,
        data,
        labels: folder.labels,
        identities: folder.identities,
        files: folder.files,
    };
    e.validate()?;
    Ok(e)
}

/// L2-normalised embeddings of in-memory images (any size), `images.len() × dim`.
///
/// # Errors
/// On a failing forward pass or cancellation.
pub fn embed_images(
    model: &FrModel,
    images: &[&RgbImage],
    flip: bool,
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
    cancel: Option<&AtomicBool>,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(images.len() * model.dim());
    for batch in images.chunks(batch_size.max(1)) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            bail!(
                "embedding cancelled after {} images",
                out.len() / model.dim()
            );
        }
        let inputs: Vec<Vec<f32>> = batch
            .par_iter()
            .map(|img| model.preprocess(img))
            .collect::<Result<_>>()?;
        out.extend(model.embed(inputs.concat(), batch.len(), flip)?);
        progress(out.len() / model.dim());
    }
    Ok(out)
}

fn load_input(path: &Path, model: &FrModel) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let img =
        crate::imageops::decode_rgb(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    model
        .preprocess(&img)
        .map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// SHA-256 of (canonical path, mtime in ns, size, model hash, flip flag).
fn image_key(path: &Path, model_sha: &str, flip: bool) -> Result<[u8; 32]> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(path.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(mtime.to_le_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(model_sha.as_bytes());
    h.update([u8::from(flip)]);
    Ok(h.finalize().into())
}

/// One cache file per (dataset folder, model, flip flag).
fn cache_file_name(root: &Path, model_sha: &str, flip: bool) -> String {
    let mut h = Sha256::new();
    h.update(root.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(model_sha.as_bytes());
    h.update([u8::from(flip)]);
    let digest = h.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("emb-{hex}.safetensors")
}

/// Cached rows by key; `None` when the file is absent, unreadable or of another width.
fn read_cache(path: &Path, dim: usize) -> Option<HashMap<[u8; 32], Vec<f32>>> {
    let bytes = std::fs::read(path).ok()?;
    let st = SafeTensors::deserialize(&bytes).ok()?;
    let keys = st.tensor("keys").ok()?;
    let emb = st.tensor("embeddings").ok()?;
    let n = *keys.shape().first()?;
    if keys.dtype() != Dtype::U8 || keys.shape() != [n, 32] || emb.shape() != [n, dim] {
        return None;
    }
    let values = float_values(&emb).ok()?;
    Some(
        keys.data()
            .chunks_exact(32)
            .zip(values.chunks_exact(dim))
            .map(|(k, row)| (k.try_into().unwrap_or([0; 32]), row.to_vec()))
            .collect(),
    )
}

fn write_cache(path: &Path, keys: &[[u8; 32]], data: &[f32], dim: usize) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let key_bytes: Vec<u8> = keys.concat();
    let emb: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = keys.len();
    let tensors = [
        (
            "keys",
            safetensors::tensor::TensorView::new(Dtype::U8, vec![n, 32], &key_bytes)?,
        ),
        (
            "embeddings",
            safetensors::tensor::TensorView::new(Dtype::F32, vec![n, dim], &emb)?,
        ),
    ];
    let bytes = safetensors::serialize(tensors, None)
        .map_err(|e| anyhow!("cannot serialise the cache: {e}"))?;
    crate::files::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_128_to_112_taps() {
        // scale = 128/112 in f32; output 0 reads rows 0/1, the last output clamps.
        let taps = crate::imageops::linear_taps(128, 112);
        assert_eq!(taps.len(), 112);
        let (i0, i1, l0, l1) = taps[0];
        assert_eq!((i0, i1), (0, 1));
        let src = (128.0f32 / 112.0) * 0.5 - 0.5;
        assert_eq!((l0, l1), (1.0 - src, src));
        // Last output: src = 1.142857 * 111.5 - 0.5 = 126.93, between rows 126 and 127.
        let last = taps[111];
        assert_eq!((last.0, last.1), (126, 127));
        assert!((last.3 - 0.928_57).abs() < 1e-4, "{last:?}");
        // Upsampling clamps at the far edge: 2 -> 4, output 3 reads row 1 only.
        assert_eq!(crate::imageops::linear_taps(2, 4)[3], (1, 1, 0.75, 0.25));
        // Constant images stay constant; a 112 input is left untouched.
        let img = RgbImage::from_pixel(128, 128, image::Rgb([255, 0, 128]));
        let x = preprocess(&img, FR_INPUT_SIZE).unwrap();
        assert_eq!(x.len(), 3 * 112 * 112);
        assert!(x[..112 * 112].iter().all(|&v| v == 1.0));
        assert!(x[112 * 112..2 * 112 * 112].iter().all(|&v| v == -1.0));
        let img = RgbImage::from_pixel(112, 112, image::Rgb([10, 20, 30]));
        assert_eq!(
            preprocess(&img, FR_INPUT_SIZE).unwrap()[0],
            (10.0 / 255.0 - 0.5) / 0.5
        );
        assert_eq!(preprocess(&img, 64).unwrap().len(), 3 * 64 * 64);
    }

    #[test]
    fn scan_skips_hidden_and_top_level_files() {
        let dir = tempfile::tempdir().unwrap();
        for (sub, files) in [
            ("000001", &["0001.png", "0000.png"][..]),
            ("000000", &["0000.png"][..]),
            (".partial-000002", &["0000.png"][..]),
            ("empty", &["notes.txt"][..]),
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
            for f in files {
                std::fs::write(dir.path().join(sub).join(f), b"x").unwrap();
            }
        }
        std::fs::write(dir.path().join("grid.png"), b"x").unwrap();
        let f = scan_image_folder(dir.path()).unwrap();
        assert_eq!(f.identities, vec!["000000", "000001"]);
        assert_eq!(
            f.files,
            vec!["000000/0000.png", "000001/0000.png", "000001/0001.png"]
        );
        assert_eq!(f.labels, vec![0, 1, 1]);
        let empty = tempfile::tempdir().unwrap();
        let e = scan_image_folder(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no images"), "{e}");
    }

    #[test]
    fn embeddings_file_round_trip_and_foreign_labels() {
        let dir = tempfile::tempdir().unwrap();
        let e = Embeddings {
            dim: 2,
            data: vec![1.0, 0.0, 0.0, 1.0, 0.6, 0.8],
            labels: vec![0, 1, 1],
            identities: vec!["a".into(), "b".into()],
            files: vec!["a/0.png".into(), "b/0.png".into(), "b/1.png".into()],
        };
        let p = dir.path().join("e.safetensors");
        e.save(&p).unwrap();
        assert_eq!(Embeddings::load(&p).unwrap(), e);
        // A foreign file: i64 labels 7, 3, 7 and unnormalised f64 rows.
        let data: Vec<u8> = [3.0f64, 4.0, 1.0, 0.0, 0.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let labels: Vec<u8> = [7i64, 3, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = safetensors::serialize(
            [
                (
                    "embeddings",
                    safetensors::tensor::TensorView::new(Dtype::F64, vec![3, 2], &data).unwrap(),
                ),
                (
                    "labels",
                    safetensors::tensor::TensorView::new(Dtype::I64, vec![3], &labels).unwrap(),
                ),
            ],
            None,
        )
        .unwrap();
        std::fs::write(&p, bytes).unwrap();
        let f = Embeddings::load(&p).unwrap();
        assert_eq!(f.labels, vec![1, 0, 1]);
        assert_eq!(f.identities, vec!["3", "7"]);
        assert_eq!(f.data, vec![0.6, 0.8, 1.0, 0.0, 0.0, 1.0]);
        std::fs::write(&p, b"junk").unwrap();
        let err = Embeddings::load(&p).unwrap_err().to_string();
        assert!(
            err.contains("e.safetensors") && !err.contains('\n'),
            "{err}"
        );
    }
}
