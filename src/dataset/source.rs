//! Where curation and export read images from: a generated (or any) ImageFolder on disk,
//! or images held in memory (the studio's grid, benchmarks, tests).

use super::curate::ImageId;
use crate::generate::Manifest;
use crate::imageops::decode_rgb;
use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A dataset of images addressed by [`ImageId`], sorted by identity then sample.
pub trait ImageSource: Sync {
    /// The images, sorted by `(identity, sample)`.
    fn images(&self) -> &[ImageId];
    /// Decodes image `i` (an index into [`ImageSource::images`]).
    fn load(&self, i: usize) -> Result<Arc<RgbImage>>;
    /// The source's own `manifest.json`, when it has one (recorded by exports).
    fn manifest(&self) -> Option<&serde_json::Value>;
    /// A short description for messages and manifests (a path, or "studio grid").
    fn describe(&self) -> String;
}

/// An ImageFolder: `DIR/<identity>/<sample>.png|jpg`, optionally with a `generate`
/// `manifest.json`.
///
/// Folder names that are all integers give the identity indices (as `generate` writes
/// them); otherwise identities are numbered by sorted folder name. Likewise for file stems
/// and sample indices. Hidden entries (e.g. `.partial-*` leftovers) and top-level files
/// (`grid.png`, `manifest.json`) are ignored.
#[derive(Debug, Clone)]
pub struct FolderSource {
    dir: PathBuf,
    ids: Vec<ImageId>,
    paths: Vec<PathBuf>,
    manifest: Option<serde_json::Value>,
}

impl FolderSource {
    /// Scans `dir`. A `generate` manifest must say `complete` and list every folder.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let manifest = read_manifest(dir)?;
        let identities = sorted_entries(dir, true)?;
        let identity_numbers = numbering(&identities);
        let mut items = Vec::new();
        for ((_, path), identity) in identities.iter().zip(identity_numbers) {
            let files: Vec<(String, PathBuf)> = sorted_entries(path, false)?
                .into_iter()
                .filter(|(n, _)| crate::files::is_image_name(n))
                .collect();
            let stems: Vec<(String, PathBuf)> = files
                .iter()
                .map(|(n, p)| {
                    (
                        n.rsplit_once('.').map_or(n.as_str(), |s| s.0).to_string(),
                        p.clone(),
                    )
                })
                .collect();
            let mut samples = numbering(&stems);
            if samples
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                != samples.len()
            {
                // e.g. 0000.png and 0000.jpg: fall back to positions.
                samples = (0..files.len()).collect();
            }
            for ((_, p), sample) in files.into_iter().zip(samples) {
                items.push((ImageId { identity, sample }, p));
            }
        }
        items.sort_by_key(|(id, _)| *id);
        if items.is_empty() {
            bail!(
                "{} holds no images (expected <identity>/<sample>.png folders)",
                dir.display()
            );
        }
        if let Some(m) = manifest
            .as_ref()
            .and_then(|v| serde_json::from_value::<Manifest>(v.clone()).ok())
        {
            if m.status != "complete" {
                bail!(
                    "{}: generation is {} ({} of {} identities); finish it with the same \
                     generate command, or merge its shards, before exporting",
                    dir.display(),
                    m.status,
                    m.completed.len(),
                    m.total_identities
                );
            }
            let on_disk = items
                .iter()
                .map(|(id, _)| id.identity)
                .collect::<std::collections::BTreeSet<_>>();
            if on_disk.iter().ne(m.completed.iter()) {
                bail!(
                    "{}: identity folders do not match the manifest's completed list",
                    dir.display()
                );
            }
        }
        let (ids, paths) = items.into_iter().unzip();
        Ok(Self {
            dir: dir.to_path_buf(),
            ids,
            paths,
            manifest,
        })
    }

    /// Path of image `i`.
    pub fn path(&self, i: usize) -> &Path {
        &self.paths[i]
    }

    /// `<identity folder>/<file>` of every image, relative to the folder, in order (the
    /// names `analyze` gives embedding rows).
    pub fn relative_files(&self) -> Vec<String> {
        self.paths
            .iter()
            .map(|p| {
                let rel = p.strip_prefix(&self.dir).unwrap_or(p);
                rel.components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect()
    }
}

impl ImageSource for FolderSource {
    fn images(&self) -> &[ImageId] {
        &self.ids
    }

    fn load(&self, i: usize) -> Result<Arc<RgbImage>> {
        let path = self
            .paths
            .get(i)
            .ok_or_else(|| anyhow!("image {i} out of range"))?;
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let img = decode_rgb(&bytes).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        Ok(Arc::new(img))
    }

    fn manifest(&self) -> Option<&serde_json::Value> {
        self.manifest.as_ref()
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Images held in memory.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    ids: Vec<ImageId>,
    images: Vec<Arc<RgbImage>>,
    manifest: Option<serde_json::Value>,
    name: String,
}

impl MemorySource {
    /// A source named `name` over `(id, image)` pairs (sorted here by id).
    pub fn new(
        name: impl Into<String>,
        mut items: Vec<(ImageId, Arc<RgbImage>)>,
        manifest: Option<serde_json::Value>,
    ) -> Self {
        items.sort_by_key(|(id, _)| *id);
        let (ids, images) = items.into_iter().unzip();
        Self {
            ids,
            images,
            manifest,
            name: name.into(),
        }
    }
}

impl ImageSource for MemorySource {
    fn images(&self) -> &[ImageId] {
        &self.ids
    }

    fn load(&self, i: usize) -> Result<Arc<RgbImage>> {
        self.images
            .get(i)
            .cloned()
            .ok_or_else(|| anyhow!("image {i} out of range"))
    }

    fn manifest(&self) -> Option<&serde_json::Value> {
        self.manifest.as_ref()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

fn read_manifest(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("manifest.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
    Ok(Some(value))
}

/// Non-hidden entries of `dir` that are folders (`dirs`) or files, sorted by name.
fn sorted_entries(dir: &Path, dirs: bool) -> Result<Vec<(String, PathBuf)>> {
    let rd =
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || path.is_dir() != dirs {
            continue;
        }
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

/// The integers the names spell when all of them are integers, else their positions.
fn numbering(names: &[(String, PathBuf)]) -> Vec<usize> {
    let parsed: Option<Vec<usize>> = names.iter().map(|(n, _)| n.parse().ok()).collect();
    parsed.unwrap_or_else(|| (0..names.len()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_source_numbers_identities_and_samples() {
        let dir = tempfile::tempdir().unwrap();
        for (id, s) in [
            ("000003", "0001.png"),
            ("000003", "0000.png"),
            ("000010", "0000.jpg"),
        ] {
            std::fs::create_dir_all(dir.path().join(id)).unwrap();
            RgbImage::new(4, 4)
                .save(dir.path().join(id).join(s))
                .unwrap();
        }
        std::fs::create_dir_all(dir.path().join(".partial-000011")).unwrap();
        std::fs::write(dir.path().join("000003/notes.txt"), "x").unwrap();
        RgbImage::new(4, 4)
            .save(dir.path().join("grid.png"))
            .unwrap();
        let src = FolderSource::open(dir.path()).unwrap();
        let ids: Vec<(usize, usize)> = src
            .images()
            .iter()
            .map(|i| (i.identity, i.sample))
            .collect();
        assert_eq!(ids, vec![(3, 0), (3, 1), (10, 0)]);
        assert_eq!(src.load(2).unwrap().dimensions(), (4, 4));
        assert!(src.manifest().is_none());

        // Named folders are numbered by position.
        let named = tempfile::tempdir().unwrap();
        for id in ["bob", "alice"] {
            std::fs::create_dir_all(named.path().join(id)).unwrap();
            RgbImage::new(2, 2)
                .save(named.path().join(id).join("a.png"))
                .unwrap();
        }
        let src = FolderSource::open(named.path()).unwrap();
        assert_eq!(src.images().len(), 2);
        assert!(src.path(0).to_string_lossy().contains("alice"));

        let empty = tempfile::tempdir().unwrap();
        assert!(FolderSource::open(empty.path()).is_err());
    }
}
