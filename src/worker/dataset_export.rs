//! Curation previews and dataset exports for the studio's Export tab. Both run on their own
//! background threads (never the UI thread, and without queueing behind a sampling job) and
//! report through the worker's event queue: [`Event::CurationPreview`],
//! [`Event::DatasetExportProgress`] and [`Event::DatasetExportFinished`].

use super::protocol::Event;
use super::EventSender;
use crate::dataset::curate::{
    curate, CurationOutcome, CurationRules, ImageId, LeakageRule, ManualRejects,
};
use crate::dataset::embeddings::{load_for_files, load_reference, Embeddings};
use crate::dataset::export::{export, ExportFormat, ExportOutcome, ExportRequest};
use crate::dataset::source::{FolderSource, ImageSource, MemorySource};
use crate::dataset::ImageEncoding;
use crate::errors::one_line;
use anyhow::{anyhow, Result};
use image::RgbImage;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Where the images come from.
#[derive(Debug, Clone)]
pub enum DatasetSource {
    /// A `generate` output (or any ImageFolder) on disk.
    Folder(PathBuf),
    /// The studio's grid: finished images with their ids, and a manifest describing them.
    Grid {
        /// `(identity, sample)` and image.
        items: Vec<(ImageId, Arc<RgbImage>)>,
        /// Provenance recorded in the export manifest.
        manifest: serde_json::Value,
        /// Weights files `(key, path)` whose name and SHA-256 are added to the manifest's
        /// `generation` on export (hashed on the export thread).
        weights: Vec<(String, PathBuf)>,
    },
}

/// Everything a curation needs besides the rules.
#[derive(Debug, Clone)]
pub struct CurationRequest {
    /// Request id, echoed in the events.
    pub id: u64,
    /// The images.
    pub source: DatasetSource,
    /// Embeddings file (rows matched by file name for folders, in order otherwise).
    pub embeddings: Option<PathBuf>,
    /// A rejects file merged into `rules.rejects` (folder sources).
    pub rejects_file: Option<PathBuf>,
    /// The rules.
    pub rules: CurationRules,
    /// Cache of the last prepared folder source, shared between requests.
    pub cache: PreparedCache,
}

/// A dataset export request.
#[derive(Debug, Clone)]
pub struct DatasetExportRequest {
    /// Curation to apply first.
    pub curation: CurationRequest,
    /// Output format.
    pub format: ExportFormat,
    /// PNG or JPEG.
    pub encoding: ImageEncoding,
    /// Destination folder.
    pub out: PathBuf,
    /// Set by the UI to stop between chunks.
    pub cancel: Arc<AtomicBool>,
}

/// A loaded source with its embeddings.
pub struct Prepared {
    source: Box<dyn ImageSource + Send>,
    embeddings: Option<Embeddings>,
    reference: Option<Embeddings>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("source", &self.source.describe())
            .field("images", &self.source.images().len())
            .finish()
    }
}

/// The last prepared folder source, keyed by (folder, embeddings, reference).
pub type PreparedCache = Arc<Mutex<Option<(String, Arc<Prepared>)>>>;

fn reference_path(rules: &CurationRules) -> Option<PathBuf> {
    match &rules.leakage {
        Some(LeakageRule::Reference { path, .. }) => Some(path.clone()),
        _ => None,
    }
}

fn prepare(req: &CurationRequest) -> Result<Arc<Prepared>> {
    let reference = reference_path(&req.rules);
    let load = |files: &[String], n: usize| -> Result<(Option<Embeddings>, Option<Embeddings>)> {
        let emb = match &req.embeddings {
            Some(p) if files.is_empty() => {
                let e = Embeddings::load(p)?;
                anyhow::ensure!(
                    e.len() == n,
                    "embeddings {} have {} rows but the grid has {n} finished images",
                    p.display(),
                    e.len()
                );
                Some(e)
            }
            Some(p) => Some(load_for_files(p, files)?),
            None => None,
        };
        let reference = match (&reference, &emb) {
            (Some(r), Some(e)) => Some(load_reference(r, e.dim)?),
            _ => None,
        };
        Ok((emb, reference))
    };
    match &req.source {
        DatasetSource::Folder(dir) => {
            let key = format!("{}\n{:?}\n{:?}", dir.display(), req.embeddings, reference);
            if let Ok(cache) = req.cache.lock() {
                if let Some((k, p)) = cache.as_ref() {
                    if *k == key {
                        return Ok(p.clone());
                    }
                }
            }
            let source = FolderSource::open(dir)?;
            let (embeddings, reference) = load(&source.relative_files(), source.images().len())?;
            let prepared = Arc::new(Prepared {
                source: Box::new(source),
                embeddings,
                reference,
            });
            if let Ok(mut cache) = req.cache.lock() {
                *cache = Some((key, prepared.clone()));
            }
            Ok(prepared)
        }
        DatasetSource::Grid {
            items, manifest, ..
        } => {
            anyhow::ensure!(!items.is_empty(), "the grid has no finished images");
            let source = MemorySource::new("studio grid", items.clone(), Some(manifest.clone()));
            let (embeddings, reference) = load(&[], items.len())?;
            Ok(Arc::new(Prepared {
                source: Box::new(source),
                embeddings,
                reference,
            }))
        }
    }
}

fn run_curation(req: &CurationRequest) -> Result<(Arc<Prepared>, CurationRules, CurationOutcome)> {
    let prepared = prepare(req)?;
    let mut rules = req.rules.clone();
    if let Some(p) = &req.rejects_file {
        let extra = ManualRejects::load(p)?;
        rules.rejects.images.extend(extra.images);
        rules.rejects.identities.extend(extra.identities);
    }
    if rules.needs_embeddings() && prepared.embeddings.is_none() {
        return Err(anyhow!(
            "the τ and reference-leakage rules need an embeddings file"
        ));
    }
    let outcome = curate(
        prepared.source.images(),
        prepared.embeddings.as_ref(),
        prepared.reference.as_ref(),
        &rules,
    )?;
    Ok((prepared, rules, outcome))
}

/// Computes the curation counts on a background thread ([`Event::CurationPreview`]).
pub fn spawn_preview(req: CurationRequest, events: EventSender) {
    std::thread::spawn(move || {
        let result = run_curation(&req)
            .map(|(_, _, o)| o.counts)
            .map_err(|e| one_line(&e));
        events.send(Event::CurationPreview { id: req.id, result });
    });
}

/// Curates and exports on a background thread, reporting progress and the end.
pub fn spawn_export(req: DatasetExportRequest, events: EventSender) {
    std::thread::spawn(move || {
        let id = req.curation.id;
        let result = (|| {
            let mut curation = req.curation.clone();
            if let DatasetSource::Grid {
                manifest, weights, ..
            } = &mut curation.source
            {
                record_weights(manifest, weights)?;
            }
            let (prepared, rules, outcome) = run_curation(&curation)?;
            let request = ExportRequest {
                out: req.out.clone(),
                format: req.format,
                encoding: req.encoding,
                rules,
            };
            let mut last = std::time::Instant::now();
            let result = export(
                prepared.source.as_ref(),
                &outcome,
                prepared.embeddings.as_ref(),
                &request,
                &req.cancel,
                &mut |p| {
                    // At most ~20 progress events a second.
                    if last.elapsed().as_millis() >= 50 || p.done == p.total {
                        last = std::time::Instant::now();
                        events.send(Event::DatasetExportProgress { id, progress: *p });
                    }
                },
            )?;
            Ok(match result {
                ExportOutcome::Complete(s) => Some(s),
                ExportOutcome::Cancelled => None,
            })
        })()
        .map_err(|e: anyhow::Error| one_line(&e));
        events.send(Event::DatasetExportFinished { id, result });
    });
}

/// Adds `{name, sha256}` of each weights file to `manifest["generation"][key]`.
fn record_weights(manifest: &mut serde_json::Value, weights: &[(String, PathBuf)]) -> Result<()> {
    for (key, path) in weights {
        let record = serde_json::json!({
            "name": path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": crate::files::sha256_file(path)?,
        });
        if let Some(g) = manifest
            .get_mut("generation")
            .and_then(|g| g.as_object_mut())
        {
            g.insert(key.clone(), record);
        }
    }
    Ok(())
}
