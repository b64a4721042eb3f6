//! The worker's analysis command: embed the current grid (or an ImageFolder) with an FR
//! model, then run [`crate::analysis::report::analyze`]. Never runs on the UI thread.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use image::RgbImage;

use super::protocol::Event;
use super::EventSender;
use crate::analysis::embed::{
    default_cache_dir, embed_folder, embed_images, EmbedOptions, Embeddings, FrModel,
};
use crate::analysis::report::{analyze, ReferenceSet, Report, ReportOptions};

/// One identity of the images held by the UI.
#[derive(Debug, Clone)]
pub struct AnalyzeIdentity {
    /// Its grid row.
    pub row: usize,
    /// Its name.
    pub name: String,
    /// Its images.
    pub images: Vec<Arc<RgbImage>>,
    /// The context it was generated from (scored against its images when every identity
    /// has one of the FR model's width).
    pub context: Option<Arc<Vec<f32>>>,
}

/// Where the images to analyse come from.
#[derive(Debug, Clone)]
pub enum AnalyzeSource {
    /// Images held by the UI, one entry per identity (grid row).
    Images(Vec<AnalyzeIdentity>),
    /// An ImageFolder on disk (embeddings cached).
    Folder(PathBuf),
}

/// What to analyse and how.
#[derive(Debug, Clone)]
pub struct AnalyzeRequest {
    /// Request id, echoed in the events.
    pub id: u64,
    /// The images.
    pub source: AnalyzeSource,
    /// FR backbone weights.
    pub fr_model: PathBuf,
    /// Optional IResNet config.
    pub fr_config: Option<PathBuf>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Flip-sum embeddings.
    pub flip: bool,
    /// Detect and align faces first, with the detector and landmark models in this folder.
    pub align: Option<PathBuf>,
    /// Optional reference embeddings for the leakage check.
    pub reference: Option<PathBuf>,
    /// Report settings.
    pub options: ReportOptions,
    /// Set by the UI to stop between batches.
    pub cancel: Arc<AtomicBool>,
}

/// A finished analysis.
#[derive(Debug, Clone)]
pub struct AnalysisResult {
    /// The report.
    pub report: Report,
    /// Grid row of each identity label (`None` for folder sources).
    pub rows: Vec<Option<usize>>,
    /// Seconds the analysis took.
    pub seconds: f64,
    /// With alignment: images in which no face was found (embedded whole).
    pub unaligned: Option<usize>,
}

/// Runs a request and sends its terminal [`Event::AnalysisFinished`].
pub fn run(req: &AnalyzeRequest, events: &EventSender) {
    let start = std::time::Instant::now();
    let result = compute(req, events)
        .map(|(report, rows, unaligned)| {
            Arc::new(AnalysisResult {
                report,
                rows,
                seconds: start.elapsed().as_secs_f64(),
                unaligned,
            })
        })
        .map_err(|e| {
            format!("{e:#}")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        });
    events.send(Event::AnalysisFinished { id: req.id, result });
}

/// The report, the grid row of each identity, and (with alignment) the images without a face.
type Computed = (Report, Vec<Option<usize>>, Option<usize>);

fn compute(req: &AnalyzeRequest, events: &EventSender) -> Result<Computed> {
    if req.fr_model.as_os_str().is_empty() {
        bail!("set the face-recognition model (FR model) in the Model panel first");
    }
    let device = crate::pipeline::parse_device(&req.device)?;
    let mut model = FrModel::load(&req.fr_model, req.fr_config.as_deref(), &device)?;
    if let Some(dir) = &req.align {
        model = model.with_alignment(crate::onnx::detect::FaceDetector::from_dir(dir)?);
    }
    let id = req.id;
    let progress = |done: usize, total: usize| {
        events.send(Event::AnalysisProgress { id, done, total });
    };
    let (emb, rows, contexts) = match &req.source {
        AnalyzeSource::Folder(dir) => {
            let opts = EmbedOptions {
                flip: req.flip,
                batch_size: 32,
                cache_dir: default_cache_dir(),
            };
            let emb = embed_folder(
                dir,
                &model,
                &opts,
                &mut |p| progress(p.done, p.total),
                Some(&req.cancel),
            )?;
            let n = emb.identities.len();
            (emb, vec![None; n], None)
        }
        AnalyzeSource::Images(groups) => {
            let images: Vec<&RgbImage> = groups
                .iter()
                .flat_map(|g| g.images.iter().map(|i| i.as_ref()))
                .collect();
            if images.is_empty() {
                bail!("no finished images to analyse");
            }
            let total = images.len();
            let data = embed_images(
                &model,
                &images,
                req.flip,
                16,
                &mut |done| progress(done, total),
                Some(&req.cancel),
            )?;
            let mut labels = Vec::new();
            let mut files = Vec::new();
            for (k, g) in groups.iter().enumerate() {
                for s in 0..g.images.len() {
                    labels.push(k as u32);
                    files.push(format!("{}/{s:04}", g.name));
                }
            }
            let emb = Embeddings {
                dim: model.dim(),
                data,
                labels,
                identities: groups.iter().map(|g| g.name.clone()).collect(),
                files,
            };
            let contexts: Option<Vec<Vec<f32>>> = groups
                .iter()
                .map(|g| g.context.as_ref().map(|c| c.to_vec()))
                .collect();
            (emb, groups.iter().map(|g| Some(g.row)).collect(), contexts)
        }
    };
    let reference = req
        .reference
        .as_deref()
        .map(|p| ReferenceSet::load(p, emb.dim))
        .transpose()
        .map_err(|e| anyhow!("{e:#}"))?;
    let unaligned = model.aligns().then(|| model.unaligned_count());
    let mut report = analyze(&emb, reference.as_ref(), &req.options)?;
    // Contexts of another width come from another FR model: nothing to compare them with,
    // so the report simply has no context cosine.
    if let Some(c) = contexts {
        report.score_contexts(&emb, &c).ok();
    }
    Ok((report, rows, unaligned))
}
