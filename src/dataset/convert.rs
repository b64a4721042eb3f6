//! `dataset convert`: between ImageFolder, InsightFace RecordIO, verification `.bin` and a
//! safetensors form for inspection from Python.
//!
//! Two kinds of data exist and convert only within their kind:
//! - *labelled images*: an ImageFolder (`DIR/<identity>/<sample>.png|jpg`; labels are the
//!   ranks of the identity folders, as torchvision's `ImageFolder` numbers them), a RecordIO
//!   set (`X.rec` with `X.idx`, or a folder holding `train.rec`), or safetensors with
//!   `images_hwc_rgb` (uint8, N×H×W×3) and `labels` (int64, N);
//! - *verification pairs*: a `.bin`, or safetensors with `images_hwc_rgb` (2N images) and
//!   `issame` (uint8, N).
//!
//! Encoded images (ImageFolder, RecordIO, `.bin`) are copied byte for byte between those
//! formats; pixels from safetensors are encoded as PNG (lossless) or JPEG when a quality is
//! given. Writing to `X.rec` also writes `X.idx` and `property` beside it. Destinations must
//! not exist; folders appear atomically, files through a temporary file and a rename.

use super::recordio::{RecordReader, RecordWriter};
use super::source::FolderSource;
use super::staging::StagedDir;
use super::verification_bin::VerificationPairs;
use super::{encode_image, ImageEncoding};
use crate::files::write_atomic;
use crate::imageops::decode_rgb;
use anyhow::{anyhow, bail, ensure, Context, Result};
use image::RgbImage;
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Tensor of the images in the safetensors form.
pub const IMAGES_TENSOR: &str = "images_hwc_rgb";
/// Tensor of the labels (int64) in the safetensors form.
pub const LABELS_TENSOR: &str = "labels";
/// Tensor of the pair flags (uint8) in the safetensors form.
pub const ISSAME_TENSOR: &str = "issame";

/// A dataset location and its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetPath {
    /// An ImageFolder.
    ImageFolder(PathBuf),
    /// A RecordIO set: `.rec`, `.idx` and the `property` file beside them.
    RecordIo {
        /// `.rec` file.
        rec: PathBuf,
        /// `.idx` file.
        idx: PathBuf,
        /// `property` file.
        property: PathBuf,
    },
    /// A verification `.bin`.
    VerificationBin(PathBuf),
    /// The safetensors form.
    Safetensors(PathBuf),
}

impl DatasetPath {
    /// Recognises an input: `.rec`, `.bin`, `.safetensors`, a folder holding `train.rec`
    /// (RecordIO) or any other folder (ImageFolder).
    pub fn input(path: &Path) -> Result<Self> {
        if path.is_dir() {
            if path.join("train.rec").is_file() {
                return Ok(Self::record_io(&path.join("train.rec")));
            }
            return Ok(Self::ImageFolder(path.to_path_buf()));
        }
        ensure!(path.exists(), "{} does not exist", path.display());
        Self::by_extension(path).ok_or_else(|| {
            anyhow!(
                "{}: unknown dataset format (expected a folder, .rec, .bin or .safetensors)",
                path.display()
            )
        })
    }

    /// Recognises an output by its extension; anything else is an ImageFolder.
    pub fn output(path: &Path) -> Self {
        Self::by_extension(path).unwrap_or_else(|| Self::ImageFolder(path.to_path_buf()))
    }

    fn by_extension(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_string_lossy().to_ascii_lowercase();
        match ext.as_str() {
            "rec" => Some(Self::record_io(path)),
            "bin" => Some(Self::VerificationBin(path.to_path_buf())),
            "safetensors" => Some(Self::Safetensors(path.to_path_buf())),
            _ => None,
        }
    }

    fn record_io(rec: &Path) -> Self {
        Self::RecordIo {
            rec: rec.to_path_buf(),
            idx: rec.with_extension("idx"),
            property: rec.with_file_name("property"),
        }
    }

    /// The format's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ImageFolder(_) => "ImageFolder",
            Self::RecordIo { .. } => "RecordIO",
            Self::VerificationBin(_) => "verification .bin",
            Self::Safetensors(_) => "safetensors",
        }
    }
}

/// One image: still encoded, or pixels.
#[derive(Debug, Clone)]
pub enum ImageData {
    /// JPEG/PNG bytes.
    Encoded(Vec<u8>),
    /// Decoded pixels.
    Pixels(RgbImage),
}

impl ImageData {
    fn pixels(&self) -> Result<RgbImage> {
        match self {
            Self::Encoded(b) => decode_rgb(b),
            Self::Pixels(p) => Ok(p.clone()),
        }
    }

    fn encoded(&self, encoding: ImageEncoding) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Self::Encoded(b) => Ok(b.as_slice().into()),
            Self::Pixels(p) => Ok(encode_image(p, encoding)?.into()),
        }
    }
}

/// Random access to labelled images.
trait Labelled: Sync {
    fn len(&self) -> usize;
    fn label(&self, i: usize) -> i64;
    fn item(&self, i: usize) -> Result<ImageData>;
}

struct RecordSet {
    reader: RecordReader,
    labels: Vec<i64>,
}

impl Labelled for RecordSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn label(&self, i: usize) -> i64 {
        self.labels[i]
    }
    fn item(&self, i: usize) -> Result<ImageData> {
        let key = self.reader.image_keys()[i];
        Ok(ImageData::Encoded(self.reader.read_record(key)?.1))
    }
}

struct FolderSet {
    source: FolderSource,
    labels: Vec<i64>,
}

impl Labelled for FolderSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn label(&self, i: usize) -> i64 {
        self.labels[i]
    }
    fn item(&self, i: usize) -> Result<ImageData> {
        let p = self.source.path(i);
        Ok(ImageData::Encoded(
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        ))
    }
}

struct PixelSet {
    images: Vec<RgbImage>,
    labels: Vec<i64>,
}

impl Labelled for PixelSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn label(&self, i: usize) -> i64 {
        self.labels[i]
    }
    fn item(&self, i: usize) -> Result<ImageData> {
        Ok(ImageData::Pixels(self.images[i].clone()))
    }
}

/// Pair data: `2N` images and `N` flags.
struct Pairs {
    images: Vec<ImageData>,
    issame: Vec<bool>,
}

enum Loaded {
    Labelled(Box<dyn Labelled>),
    Pairs(Pairs),
}

/// Result of a conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertSummary {
    /// Images written.
    pub images: usize,
    /// Distinct labels (labelled data) or pairs (verification data).
    pub groups: usize,
    /// Warnings about the input (e.g. a RecordIO whose labels are all equal).
    pub warnings: Vec<String>,
}

/// Converts `from` into `to` (see the module docs). `jpeg_quality` encodes pixels as JPEG
/// instead of PNG.
pub fn convert(from: &Path, to: &Path, jpeg_quality: Option<u8>) -> Result<ConvertSummary> {
    let input = DatasetPath::input(from)?;
    let output = DatasetPath::output(to);
    let encoding = match jpeg_quality {
        Some(q) => {
            ensure!(
                (1..=100).contains(&q),
                "JPEG quality must be 1-100, got {q}"
            );
            ImageEncoding::Jpeg { quality: q }
        }
        None => ImageEncoding::Png,
    };
    check_output_free(&output)?;
    let mut warnings = Vec::new();
    let loaded = load(&input, &mut warnings)?;
    let (images, groups) = match (loaded, &output) {
        (Loaded::Labelled(set), DatasetPath::ImageFolder(dir)) => {
            write_folder(set.as_ref(), dir, encoding)?
        }
        (Loaded::Labelled(set), DatasetPath::RecordIo { rec, idx, property }) => {
            write_record_io(set.as_ref(), rec, idx, property, encoding)?
        }
        (Loaded::Labelled(set), DatasetPath::Safetensors(path)) => {
            write_labelled_safetensors(set.as_ref(), path)?
        }
        (Loaded::Pairs(pairs), DatasetPath::VerificationBin(path)) => {
            let n = pairs.issame.len();
            let encoded = pairs
                .images
                .par_iter()
                .map(|im| im.encoded(encoding).map(|b| b.into_owned()))
                .collect::<Result<Vec<_>>>()?;
            VerificationPairs {
                encoded,
                issame: pairs.issame,
            }
            .save(path)?;
            (2 * n, n)
        }
        (Loaded::Pairs(pairs), DatasetPath::Safetensors(path)) => {
            write_pairs_safetensors(&pairs, path)?
        }
        (Loaded::Labelled(_), out) => bail!(
            "cannot convert labelled images ({}) into a {}: a .bin holds verification pairs",
            input.kind(),
            out.kind()
        ),
        (Loaded::Pairs(_), out) => bail!(
            "cannot convert verification pairs ({}) into a {}: convert to .bin or .safetensors",
            input.kind(),
            out.kind()
        ),
    };
    Ok(ConvertSummary {
        images,
        groups,
        warnings,
    })
}

fn check_output_free(output: &DatasetPath) -> Result<()> {
    let files: Vec<&PathBuf> = match output {
        DatasetPath::ImageFolder(dir) => {
            return super::staging::check_destination(dir);
        }
        DatasetPath::RecordIo { rec, idx, property } => vec![rec, idx, property],
        DatasetPath::VerificationBin(p) | DatasetPath::Safetensors(p) => vec![p],
    };
    for f in files {
        ensure!(
            !f.exists(),
            "destination {} already exists; choose a new name",
            f.display()
        );
    }
    Ok(())
}

fn load(input: &DatasetPath, warnings: &mut Vec<String>) -> Result<Loaded> {
    match input {
        DatasetPath::ImageFolder(dir) => {
            let source = FolderSource::open(dir)?;
            use super::source::ImageSource;
            let ranks: BTreeMap<usize, i64> = source
                .images()
                .iter()
                .map(|id| id.identity)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .enumerate()
                .map(|(rank, id)| (id, rank as i64))
                .collect();
            let labels = source
                .images()
                .iter()
                .map(|id| ranks[&id.identity])
                .collect();
            Ok(Loaded::Labelled(Box::new(FolderSet { source, labels })))
        }
        DatasetPath::RecordIo { rec, idx, .. } => {
            let reader = RecordReader::open(rec, idx)?;
            if let Some(w) = reader.check_labels()?.warning {
                warnings.push(w);
            }
            let labels = reader.labels()?;
            Ok(Loaded::Labelled(Box::new(RecordSet { reader, labels })))
        }
        DatasetPath::VerificationBin(path) => {
            let p = VerificationPairs::read(path)?;
            Ok(Loaded::Pairs(Pairs {
                images: p.encoded.into_iter().map(ImageData::Encoded).collect(),
                issame: p.issame,
            }))
        }
        DatasetPath::Safetensors(path) => {
            read_safetensors(path).map_err(|e| anyhow!("{}: {e:#}", path.display()))
        }
    }
}

fn read_safetensors(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("not a safetensors file: {e}"))?;
    let view = st
        .tensor(IMAGES_TENSOR)
        .map_err(|_| anyhow!("has no '{IMAGES_TENSOR}' tensor"))?;
    let &[n, h, w, 3] = view.shape() else {
        bail!(
            "'{IMAGES_TENSOR}' has shape {:?}, expected [N, H, W, 3]",
            view.shape()
        );
    };
    ensure!(
        view.dtype() == Dtype::U8,
        "'{IMAGES_TENSOR}' must be uint8, got {:?}",
        view.dtype()
    );
    let per = h * w * 3;
    let images: Vec<RgbImage> = view
        .data()
        .chunks_exact(per.max(1))
        .take(n)
        .map(|px| {
            RgbImage::from_raw(w as u32, h as u32, px.to_vec())
                .ok_or_else(|| anyhow!("'{IMAGES_TENSOR}' is truncated"))
        })
        .collect::<Result<_>>()?;
    ensure!(images.len() == n, "'{IMAGES_TENSOR}' is truncated");
    if let Ok(labels) = st.tensor(LABELS_TENSOR) {
        let labels: Vec<i64> = match labels.dtype() {
            Dtype::I64 => labels
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::I32 => labels
                .data()
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
                .collect(),
            other => bail!("'{LABELS_TENSOR}' must be int64, got {other:?}"),
        };
        ensure!(labels.len() == n, "{} labels for {n} images", labels.len());
        return Ok(Loaded::Labelled(Box::new(PixelSet { images, labels })));
    }
    if let Ok(issame) = st.tensor(ISSAME_TENSOR) {
        ensure!(
            matches!(issame.dtype(), Dtype::U8 | Dtype::BOOL),
            "'{ISSAME_TENSOR}' must be uint8 or bool, got {:?}",
            issame.dtype()
        );
        let issame: Vec<bool> = issame.data().iter().map(|&b| b != 0).collect();
        ensure!(
            2 * issame.len() == n,
            "{n} images for {} pairs; expected two per pair",
            issame.len()
        );
        return Ok(Loaded::Pairs(Pairs {
            images: images.into_iter().map(ImageData::Pixels).collect(),
            issame,
        }));
    }
    bail!("has neither '{LABELS_TENSOR}' nor '{ISSAME_TENSOR}'")
}

fn label_of(set: &dyn Labelled, i: usize) -> Result<usize> {
    let l = set.label(i);
    usize::try_from(l).map_err(|_| anyhow!("image {i} has negative label {l}"))
}

fn extension(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        "jpg"
    } else {
        "png"
    }
}

fn write_folder(set: &dyn Labelled, dir: &Path, encoding: ImageEncoding) -> Result<(usize, usize)> {
    let staged = StagedDir::create(dir)?;
    let mut next: BTreeMap<usize, usize> = BTreeMap::new();
    let mut jobs = Vec::with_capacity(set.len());
    for i in 0..set.len() {
        let label = label_of(set, i)?;
        let sample = next.entry(label).or_default();
        jobs.push((i, label, *sample));
        *sample += 1;
    }
    for label in next.keys() {
        let d = staged.path().join(format!("{label:06}"));
        std::fs::create_dir(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    jobs.par_iter()
        .try_for_each(|&(i, label, sample)| -> Result<()> {
            let item = set.item(i)?;
            let bytes = item.encoded(encoding)?;
            let path = staged
                .path()
                .join(format!("{label:06}"))
                .join(format!("{sample:04}.{}", extension(&bytes)));
            std::fs::write(&path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))
        })?;
    staged.commit()?;
    Ok((set.len(), next.len()))
}

fn write_record_io(
    set: &dyn Labelled,
    rec: &Path,
    idx: &Path,
    property: &Path,
    encoding: ImageEncoding,
) -> Result<(usize, usize)> {
    ensure!(set.len() > 0, "the input holds no images");
    let (w, h) = set.item(0)?.pixels()?.dimensions();
    let mut order = (0..set.len())
        .map(|i| Ok((label_of(set, i)?, i)))
        .collect::<Result<Vec<_>>>()?;
    order.sort();
    let mut writer = RecordWriter::create(rec, idx, property, h, w)?;
    for chunk in order.chunks(256) {
        let encoded = chunk
            .par_iter()
            .map(|&(_, i)| set.item(i)?.encoded(encoding).map(|b| b.into_owned()))
            .collect::<Result<Vec<_>>>()?;
        for (bytes, &(label, _)) in encoded.iter().zip(chunk) {
            writer.push_encoded(bytes, label)?;
        }
    }
    let summary = writer.finish()?;
    Ok((summary.num_images, summary.num_classes))
}

fn decode_all(items: &[ImageData]) -> Result<Vec<RgbImage>> {
    items.par_iter().map(ImageData::pixels).collect()
}

fn pack_images(images: &[RgbImage]) -> Result<(Vec<u8>, Vec<usize>)> {
    let (w, h) = images.first().map_or((0, 0), RgbImage::dimensions);
    if let Some((i, img)) = images
        .iter()
        .enumerate()
        .find(|(_, im)| im.dimensions() != (w, h))
    {
        bail!(
            "image {i} is {}x{} but image 0 is {w}x{h}; the safetensors form needs one size",
            img.width(),
            img.height()
        );
    }
    let mut data = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for img in images {
        data.extend_from_slice(img.as_raw());
    }
    Ok((data, vec![images.len(), h as usize, w as usize, 3]))
}

fn save_safetensors(path: &Path, tensors: Vec<(&str, TensorView<'_>)>) -> Result<()> {
    let bytes = safetensors::serialize(tensors, None)
        .map_err(|e| anyhow!("cannot serialise {}: {e}", path.display()))?;
    write_atomic(path, &bytes)
}

fn write_labelled_safetensors(set: &dyn Labelled, path: &Path) -> Result<(usize, usize)> {
    let images = (0..set.len())
        .into_par_iter()
        .map(|i| set.item(i)?.pixels())
        .collect::<Result<Vec<_>>>()?;
    let (data, shape) = pack_images(&images)?;
    let labels: Vec<i64> = (0..set.len()).map(|i| set.label(i)).collect();
    let raw_labels: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    save_safetensors(
        path,
        vec![
            (IMAGES_TENSOR, TensorView::new(Dtype::U8, shape, &data)?),
            (
                LABELS_TENSOR,
                TensorView::new(Dtype::I64, vec![labels.len()], &raw_labels)?,
            ),
        ],
    )?;
    let groups = labels
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    Ok((set.len(), groups))
}

fn write_pairs_safetensors(pairs: &Pairs, path: &Path) -> Result<(usize, usize)> {
    let images = decode_all(&pairs.images)?;
    let (data, shape) = pack_images(&images)?;
    let flags: Vec<u8> = pairs.issame.iter().map(|&b| u8::from(b)).collect();
    save_safetensors(
        path,
        vec![
            (IMAGES_TENSOR, TensorView::new(Dtype::U8, shape, &data)?),
            (
                ISSAME_TENSOR,
                TensorView::new(Dtype::U8, vec![flags.len()], &flags)?,
            ),
        ],
    )?;
    Ok((images.len(), flags.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled_rec(dir: &Path) -> PathBuf {
        let items: Vec<(RgbImage, usize)> = (0..5u64)
            .map(|i| {
                (
                    crate::procface::render_sample(i / 2, i, 32),
                    (i / 2) as usize,
                )
            })
            .collect();
        crate::dataset::recordio::write_dataset(dir, &items, ImageEncoding::Png).unwrap();
        dir.join("train.rec")
    }

    #[test]
    fn rec_folder_rec_and_safetensors_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let src_dir = tmp.path().join("src");
        std::fs::create_dir(&src_dir).unwrap();
        let rec = labelled_rec(&src_dir);
        let folder = tmp.path().join("folder");
        let s = convert(&rec, &folder, None).unwrap();
        assert_eq!((s.images, s.groups), (5, 3));
        assert!(folder.join("000002/0000.png").is_file());
        let back = tmp.path().join("back.rec");
        convert(&folder, &back, None).unwrap();
        let a = RecordReader::open_dir(&src_dir).unwrap();
        let b = RecordReader::open(&back, tmp.path().join("back.idx")).unwrap();
        assert!(tmp.path().join("property").is_file());
        assert_eq!(a.labels().unwrap(), b.labels().unwrap());
        for i in 0..5 {
            assert_eq!(a.get(i).unwrap(), b.get(i).unwrap());
        }
        // Byte-identical records: the encoded images are copied.
        assert_eq!(std::fs::read(&rec).unwrap(), std::fs::read(&back).unwrap());

        let st = tmp.path().join("set.safetensors");
        convert(&src_dir, &st, None).unwrap();
        let again = tmp.path().join("again");
        convert(&st, &again, None).unwrap();
        let c = FolderSource::open(&again).unwrap();
        use crate::dataset::source::ImageSource;
        for i in 0..5 {
            assert_eq!(*c.load(i).unwrap(), a.get(i).unwrap().0);
        }

        // Existing destinations and kind mismatches are refused.
        assert!(convert(&rec, &folder, None)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        let err = convert(&rec, &tmp.path().join("x.bin"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("verification pairs"), "{err}");
    }

    #[test]
    fn all_equal_labels_warn() {
        let tmp = tempfile::tempdir().unwrap();
        let items: Vec<(RgbImage, usize)> = (0..3)
            .map(|i| (crate::procface::render_sample(1, i, 16), 0))
            .collect();
        crate::dataset::recordio::write_dataset(tmp.path(), &items, ImageEncoding::Png).unwrap();
        let s = convert(tmp.path(), &tmp.path().join("out.safetensors"), None).unwrap();
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("same label"));
    }

    #[test]
    fn pairs_bin_safetensors_bin() {
        let tmp = tempfile::tempdir().unwrap();
        let images: Vec<RgbImage> = (0..4)
            .map(|i| crate::procface::render_sample(i, 0, 112))
            .collect();
        let bin = tmp.path().join("p.bin");
        VerificationPairs::from_images(&images, vec![true, false], ImageEncoding::Png)
            .unwrap()
            .save(&bin)
            .unwrap();
        let st = tmp.path().join("p.safetensors");
        let s = convert(&bin, &st, None).unwrap();
        assert_eq!((s.images, s.groups), (4, 2));
        let back = tmp.path().join("back.bin");
        convert(&st, &back, None).unwrap();
        let p = VerificationPairs::read(&back).unwrap();
        assert_eq!(p.issame, vec![true, false]);
        assert_eq!(p.decode_all().unwrap(), images);
        let err = convert(&bin, &tmp.path().join("dir"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("verification pairs"), "{err}");
    }
}
