//! The messages between the studio's UI and its worker thread.
//!
//! The UI only ever sends [`Command`]s and reads [`Event`]s; the worker owns the models.
//! Every command ends with exactly one *terminal* event ([`Event::is_terminal`]), so the UI
//! knows when the worker is free again.

use crate::diffusion::rng::ImageKey;
use crate::diffusion::sampler::SamplingSettings;
use crate::pipeline::WeightPaths;
use image::RgbImage;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What to load and where.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRequest {
    /// U-Net and decoder checkpoints and optional configs.
    pub weights: WeightPaths,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32`, `bf16` or `f16` for the U-Net.
    pub dtype: String,
}

/// Facts about a loaded pipeline, shown in the Model panel.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// File name of the U-Net checkpoint.
    pub unet_file: String,
    /// File name of the decoder checkpoint.
    pub decoder_file: String,
    /// U-Net parameters.
    pub unet_parameters: usize,
    /// Decoder parameters.
    pub decoder_parameters: usize,
    /// Device the pipeline runs on, e.g. `cpu`.
    pub device: String,
    /// U-Net dtype, e.g. `f32`.
    pub dtype: String,
    /// Width of the identity contexts the U-Net expects.
    pub context_dim: usize,
    /// Side of the generated images in pixels.
    pub image_size: usize,
    /// Where the U-Net architecture came from.
    pub config_source: String,
    /// Seconds the load took.
    pub load_seconds: f64,
}

impl ModelInfo {
    /// Total parameters of both networks.
    pub fn parameters(&self) -> usize {
        self.unet_parameters + self.decoder_parameters
    }
}

/// Kind of a sampling job (the layout of its grid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Rows are identities, columns are samples.
    Generate,
    /// Rows are identities, columns are values of a swept setting.
    Sweep,
}

/// One image of a job: its grid position, seed-contract key and settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobCell {
    /// Row in the job's grid (index into [`Job::contexts`]).
    pub row: usize,
    /// Column in the job's grid (sample index, or sweep value index).
    pub col: usize,
    /// Seed-contract key of the image.
    pub key: ImageKey,
    /// Index into [`Job::settings`].
    pub settings: usize,
}

/// A sampling job: a grid of images, batched by the worker.
#[derive(Debug, Clone)]
pub struct Job {
    /// Job id chosen by the UI; echoed in every event of the job.
    pub id: u64,
    /// Grid layout.
    pub kind: JobKind,
    /// One identity context per row.
    pub contexts: Vec<Arc<Vec<f32>>>,
    /// Distinct settings used by the cells (one for a plain run, K for a sweep).
    pub settings: Vec<SamplingSettings>,
    /// The images, in the order they should be generated.
    pub cells: Vec<JobCell>,
    /// Images per batch (at least 1).
    pub batch_size: usize,
    /// Decode and send the predicted x0 every this many steps; 0 = no live preview.
    pub preview_every: usize,
    /// Set by the UI to stop the job; polled after every denoising step.
    pub cancel: Arc<AtomicBool>,
}

/// Commands the UI sends to the worker.
#[derive(Debug, Clone)]
pub enum Command {
    /// Load (replace) the sampling pipeline.
    LoadModel(LoadRequest),
    /// Run a sampling job with the loaded pipeline.
    Run(Job),
    /// Embed images with an FR model and analyse them (see [`super::analyze`]).
    Analyze(super::analyze::AnalyzeRequest),
    /// Train a face-recognition model (built-in or external trainer) on a thread of its
    /// own (see [`super::train`]); the worker stays free for other commands.
    Train(super::train::TrainRequest),
    /// Panic on the worker thread (used by tests of the panic guard).
    #[doc(hidden)]
    Panic,
    /// Stop the worker thread.
    Shutdown,
}

/// Progress of a running job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Job id.
    pub job: u64,
    /// Denoising steps done over the whole job.
    pub steps_done: usize,
    /// Denoising steps of the whole job.
    pub steps_total: usize,
    /// Step within the current batch.
    pub batch_step: usize,
    /// Steps of the current batch.
    pub batch_steps: usize,
    /// Images finished.
    pub images_done: usize,
    /// Images of the job.
    pub images_total: usize,
    /// Throughput so far, in images per second (fractional batches included).
    pub images_per_second: f64,
    /// Estimated seconds left.
    pub eta_seconds: f64,
}

impl Progress {
    /// Fraction of the job done, in [0, 1].
    pub fn fraction(&self) -> f32 {
        if self.steps_total == 0 {
            0.0
        } else {
            (self.steps_done as f64 / self.steps_total as f64) as f32
        }
    }
}

/// Events the worker (and background I/O threads) send to the UI.
#[derive(Debug, Clone)]
pub enum Event {
    /// The pipeline is loaded (terminal).
    ModelLoaded(ModelInfo),
    /// A job started.
    JobStarted {
        /// Job id.
        job: u64,
        /// Images the job will make.
        images: usize,
        /// Batches it is split into.
        batches: usize,
    },
    /// Progress after a denoising step.
    Progress(Progress),
    /// An image is finished.
    ImageReady {
        /// Job id.
        job: u64,
        /// Grid row (identity).
        identity: usize,
        /// Grid column (sample, or sweep value).
        sample: usize,
        /// The image.
        image: Arc<RgbImage>,
    },
    /// Every image of an identity (grid row) is finished.
    IdentityFinished {
        /// Job id.
        job: u64,
        /// Grid row.
        identity: usize,
    },
    /// Predicted clean images of the running batch (live preview).
    Preview {
        /// Job id.
        job: u64,
        /// Step within the batch.
        step: usize,
        /// Steps of the batch.
        steps: usize,
        /// `(row, col, x̂0 decoded)` for each image of the batch.
        images: Vec<(usize, usize, Arc<RgbImage>)>,
    },
    /// A job finished every image (terminal).
    JobFinished {
        /// Job id.
        job: u64,
        /// Wall-clock seconds.
        seconds: f64,
    },
    /// A job stopped because it was cancelled (terminal).
    Cancelled {
        /// Job id.
        job: u64,
        /// Images finished before the stop.
        images_done: usize,
    },
    /// Embedding progress of analysis `id`.
    AnalysisProgress {
        /// Request id.
        id: u64,
        /// Images embedded (or cached).
        done: usize,
        /// Images to embed.
        total: usize,
    },
    /// Analysis `id` finished: the report or a one-line error (terminal).
    AnalysisFinished {
        /// Request id.
        id: u64,
        /// The result.
        result: Result<std::sync::Arc<super::analyze::AnalysisResult>, String>,
    },
    /// A command failed or the worker panicked (terminal); one line.
    Error(String),
    /// A background export finished: the written file or the error.
    Exported(Result<PathBuf, String>),
    /// A background context-file load finished.
    ContextsLoaded(Result<LoadedContexts, String>),
    /// Background ProcFace identities (Identities panel) are ready, or a one-line error.
    ProcfaceIdentities(Result<Vec<crate::worker::identities::IdentityEntry>, String>),
    /// A background session save finished: the file written or a one-line error.
    SessionSaved(Result<PathBuf, String>),
    /// Face detection `id` on a photo (Identities panel) finished: the faces or a one-line
    /// error.
    FacesDetected {
        /// Request id.
        id: u64,
        /// The detected faces.
        result: Result<DetectedPhoto, String>,
    },
    /// Curation preview `id` of the Export tab: counts per rule, or a one-line error.
    CurationPreview {
        /// Request id.
        id: u64,
        /// The counts.
        result: Result<crate::dataset::curate::CurationCounts, String>,
    },
    /// Progress of dataset export `id` (Export tab).
    DatasetExportProgress {
        /// Request id.
        id: u64,
        /// Images written, rate and ETA.
        progress: crate::dataset::export::ExportProgress,
    },
    /// Dataset export `id` ended: its summary, `None` when cancelled, or a one-line error.
    DatasetExportFinished {
        /// Request id.
        id: u64,
        /// The result.
        result: Result<Option<crate::dataset::export::ExportSummary>, String>,
    },
    /// A built-in training run `id` reported progress.
    TrainProgress {
        /// Request id.
        id: u64,
        /// What happened.
        event: crate::train::run::TrainEvent,
    },
    /// A line of an external trainer's output (run `id`).
    TrainLog {
        /// Request id.
        id: u64,
        /// The line.
        line: super::train::LogLine,
    },
    /// Training run `id` ended: how, or a one-line error (terminal).
    TrainFinished {
        /// Request id.
        id: u64,
        /// The result.
        result: Result<super::train::TrainOutcome, String>,
    },
    /// A message of the studio's own background threads (file dialogs, session reads),
    /// passed through to the UI unchanged: the worker does not know its type.
    App(std::sync::Arc<dyn std::any::Any + Send + Sync>),
}

impl Event {
    /// True for the events that end a worker command.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::ModelLoaded(_)
                | Self::JobFinished { .. }
                | Self::Cancelled { .. }
                | Self::Error(_)
                | Self::AnalysisFinished { .. }
                | Self::TrainFinished { .. }
        )
    }
}

/// Identity contexts read from a file by a background thread.
#[derive(Debug, Clone)]
pub struct LoadedContexts {
    /// The file.
    pub path: PathBuf,
    /// Row names.
    pub names: Vec<String>,
    /// One context per row.
    pub rows: Vec<Vec<f32>>,
}

/// One face of a photo, detected, aligned and embedded by a background thread.
#[derive(Debug, Clone)]
pub struct PhotoFaceInfo {
    /// The aligned 112 × 112 crop (the thumbnail of the face picker).
    pub crop: Arc<RgbImage>,
    /// L2-normalised face-recognition embedding of the crop.
    pub embedding: Arc<Vec<f32>>,
    /// Detector score in `[0, 1]`.
    pub score: f32,
    /// RMS 5-point alignment residual, template pixels.
    pub residual: f64,
}

/// The faces of one photo, best detector score first.
#[derive(Debug, Clone)]
pub struct DetectedPhoto {
    /// The photo.
    pub path: PathBuf,
    /// Its faces (never empty).
    pub faces: Vec<PhotoFaceInfo>,
}
