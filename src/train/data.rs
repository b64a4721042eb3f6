//! Labelled training images: the [`ImageSource`] trait and its ImageFolder, RecordIO and
//! ProcFace implementations.

use crate::dataset::recordio::RecordReader;
use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Random access to labelled face images (labels are `0..num_classes`).
pub trait ImageSource: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// True when there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of identities.
    fn num_classes(&self) -> usize;
    /// Label of image `i` (no decoding).
    fn label(&self, i: usize) -> u32;
    /// Decodes image `i`.
    fn image(&self, i: usize) -> Result<RgbImage>;
    /// A short description for logs (path and counts).
    fn describe(&self) -> String;
}

/// Opens `path` as a RecordIO file (`*.rec` with its `.idx`, or a folder holding
/// `train.rec`) or as an ImageFolder.
pub fn open_source(path: &Path) -> Result<Box<dyn ImageSource>> {
    if path.extension().is_some_and(|e| e == "rec") {
        return Ok(Box::new(RecordSource::open(path)?));
    }
    if path.join("train.rec").is_file() {
        return Ok(Box::new(RecordSource::open(&path.join("train.rec"))?));
    }
    if path.is_dir() {
        return Ok(Box::new(ImageFolder::open(path)?));
    }
    bail!(
        "{}: not an ImageFolder directory or a .rec file",
        path.display()
    )
}

/// `DIR/<identity>/<image>.png|jpg|jpeg`; label = index of the identity folder in sorted
/// order, images sorted by name within a folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    items: Vec<(PathBuf, u32)>,
    classes: Vec<String>,
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort();
    Ok(entries)
}

impl ImageFolder {
    /// Scans `root`; errors when it holds no identity folder with an image.
    pub fn open(root: &Path) -> Result<Self> {
        let mut items = Vec::new();
        let mut classes = Vec::new();
        for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let images: Vec<PathBuf> = sorted_entries(&dir)?
                .into_iter()
                .filter(|p| p.is_file() && crate::files::is_image_name(p))
                .collect();
            if images.is_empty() {
                continue;
            }
            let label = classes.len() as u32;
            classes.push(
                dir.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
            items.extend(images.into_iter().map(|p| (p, label)));
        }
        if items.is_empty() {
            bail!(
                "{}: no images found in <identity>/<image>.png|jpg subfolders",
                root.display()
            );
        }
        Ok(Self {
            root: root.to_path_buf(),
            items,
            classes,
        })
    }

    /// Identity folder names, in label order.
    pub fn class_names(&self) -> &[String] {
        &self.classes
    }
}

impl ImageSource for ImageFolder {
    fn len(&self) -> usize {
        self.items.len()
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn label(&self, i: usize) -> u32 {
        self.items[i].1
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        let (path, _) = self
            .items
            .get(i)
            .ok_or_else(|| anyhow!("image index {i} out of range"))?;
        let img =
            image::open(path).map_err(|e| anyhow!("cannot decode {}: {e}", path.display()))?;
        Ok(img.to_rgb8())
    }
    fn describe(&self) -> String {
        format!(
            "ImageFolder {}: {} images of {} identities",
            self.root.display(),
            self.items.len(),
            self.classes.len()
        )
    }
}

/// An InsightFace RecordIO training set; labels are remapped to `0..C` in sorted order of
/// the stored identities (unchanged when they already are `0..C`).
#[derive(Debug)]
pub struct RecordSource {
    reader: RecordReader,
    labels: Vec<u32>,
    num_classes: usize,
    path: PathBuf,
}

impl RecordSource {
    /// Opens `x.rec` with `x.idx` beside it.
    pub fn open(rec: &Path) -> Result<Self> {
        let idx = rec.with_extension("idx");
        let reader = RecordReader::open(rec, &idx)?;
        let raw = reader.labels()?;
        if raw.is_empty() {
            bail!("{}: no image records", rec.display());
        }
        let mut map = BTreeMap::new();
        for &l in &raw {
            map.entry(l).or_insert(0u32);
        }
        for (i, v) in map.values_mut().enumerate() {
            *v = i as u32;
        }
        let labels = raw.iter().map(|l| map[l]).collect();
        Ok(Self {
            reader,
            labels,
            num_classes: map.len(),
            path: rec.to_path_buf(),
        })
    }
}

impl ImageSource for RecordSource {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        Ok(self.reader.get(i)?.0)
    }
    fn describe(&self) -> String {
        format!(
            "RecordIO {}: {} images of {} identities",
            self.path.display(),
            self.labels.len(),
            self.num_classes
        )
    }
}

/// Decoded images held in memory with their labels.
#[derive(Debug, Clone)]
pub struct InMemorySource {
    images: Vec<RgbImage>,
    labels: Vec<u32>,
    num_classes: usize,
    name: String,
}

impl InMemorySource {
    /// Wraps `images` and their `labels` (`0..num_classes`, every class used or not).
    pub fn new(name: impl Into<String>, images: Vec<RgbImage>, labels: Vec<u32>) -> Result<Self> {
        if images.len() != labels.len() {
            bail!("{} images but {} labels", images.len(), labels.len());
        }
        if images.is_empty() {
            bail!("no images");
        }
        let num_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
        Ok(Self {
            images,
            labels,
            num_classes,
            name: name.into(),
        })
    }

    /// Renders every image of `source` once (in parallel) into memory.
    pub fn cache(source: &dyn ImageSource) -> Result<Self> {
        use rayon::prelude::*;
        let images = (0..source.len())
            .into_par_iter()
            .map(|i| source.image(i))
            .collect::<Result<Vec<_>>>()?;
        let labels = (0..source.len()).map(|i| source.label(i)).collect();
        let mut cached = Self::new(source.describe(), images, labels)?;
        cached.num_classes = source.num_classes();
        Ok(cached)
    }
}

impl ImageSource for InMemorySource {
    fn len(&self) -> usize {
        self.images.len()
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        self.images.get(i).cloned().ok_or_else(|| {
            anyhow!(
                "image index {i} out of range ({} images)",
                self.images.len()
            )
        })
    }
    fn describe(&self) -> String {
        format!(
            "{} (in memory: {} images, {} identities)",
            self.name,
            self.images.len(),
            self.num_classes
        )
    }
}

/// ProcFace identities rendered on the fly: image `i` is sample `i % per_identity` of
/// identity seed `first_identity + i / per_identity` (label `i / per_identity`).
#[derive(Debug, Clone)]
pub struct ProcFaceSource {
    /// Seed of label 0.
    pub first_identity: u64,
    /// Number of identities.
    pub identities: usize,
    /// Images per identity (sample seeds `0..per_identity`).
    pub per_identity: usize,
    /// Rendered side length.
    pub size: u32,
}

impl ImageSource for ProcFaceSource {
    fn len(&self) -> usize {
        self.identities * self.per_identity
    }
    fn num_classes(&self) -> usize {
        self.identities
    }
    fn label(&self, i: usize) -> u32 {
        (i / self.per_identity) as u32
    }
    fn image(&self, i: usize) -> Result<RgbImage> {
        if i >= self.len() {
            bail!("image index {i} out of range ({} images)", self.len());
        }
        let id = self.first_identity + (i / self.per_identity) as u64;
        Ok(crate::procface::render_sample(
            id,
            (i % self.per_identity) as u64,
            self.size,
        ))
    }
    fn describe(&self) -> String {
        format!(
            "ProcFace identities {}..{}: {} images each at {}px",
            self.first_identity,
            self.first_identity + self.identities as u64,
            self.per_identity,
            self.size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_folder_labels_follow_sorted_folders() {
        let dir = tempfile::tempdir().unwrap();
        for (id, n) in [("b_second", 2), ("a_first", 1), ("c_empty", 0)] {
            let d = dir.path().join(id);
            std::fs::create_dir(&d).unwrap();
            for k in 0..n {
                RgbImage::from_pixel(4, 4, image::Rgb([k * 50, 0, 0]))
                    .save(d.join(format!("{k}.png")))
                    .unwrap();
            }
        }
        std::fs::write(dir.path().join("a_first/notes.txt"), "x").unwrap();
        let f = ImageFolder::open(dir.path()).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f.num_classes(), 2);
        assert_eq!(f.class_names(), ["a_first", "b_second"]);
        assert_eq!((f.label(0), f.label(1), f.label(2)), (0, 1, 1));
        assert_eq!(f.image(2).unwrap().get_pixel(0, 0).0[0], 50);
        let boxed = open_source(dir.path()).unwrap();
        assert_eq!(boxed.len(), 3);
        let empty = tempfile::tempdir().unwrap();
        let err = ImageFolder::open(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no images"), "{err}");
    }

    #[test]
    fn record_source_reads_fixture() {
        let Some(rec) = crate::testutil::fixture("tiny_train.rec") else {
            return;
        };
        let src = RecordSource::open(&rec).unwrap();
        assert!(src.len() > 0 && src.num_classes() > 0);
        assert!((0..src.len()).all(|i| (src.label(i) as usize) < src.num_classes()));
        let img = src.image(0).unwrap();
        assert!(img.width() > 0);
    }
}
