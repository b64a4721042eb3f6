//! The studio's state and the actions on it. Views read the state and call actions;
//! actions send commands to the worker; worker events update the state in [`AppState::apply`].
//! Nothing here touches egui or a model.

use super::forms::{
    IdentityForm, IdentitySourceKind, ModelForm, RunMode, SamplingForm, SweepParam,
};
use super::grid::{Grid, GridSpec, RowLabel};
use super::messages::{AppMessage, PickTarget};
use crate::diffusion::rng::ImageKey;
use crate::identity::DEFAULT_CONTEXT_DIM;
use crate::worker::identities::{file_identities, interpolate, random_identities, IdentityEntry};
use crate::worker::protocol::LoadedContexts;
use crate::worker::{io, Command, Event, Job, JobCell, LoadRequest, ModelInfo, Progress, Worker};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Workspace tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub enum Tab {
    /// Sample and curate.
    #[default]
    Generate,
    /// Measure.
    Analyze,
    /// Curate and write datasets.
    Export,
    /// Train FR models.
    Train,
}

impl Tab {
    /// All tabs in display order.
    pub const ALL: [Tab; 4] = [Tab::Generate, Tab::Analyze, Tab::Export, Tab::Train];

    /// Tab title.
    pub fn title(self) -> &'static str {
        match self {
            Tab::Generate => "Generate",
            Tab::Analyze => "Analyze",
            Tab::Export => "Export",
            Tab::Train => "Train",
        }
    }
}

/// What the worker is doing, as far as the UI knows.
#[derive(Debug, Clone, Default)]
pub enum Busy {
    /// Free.
    #[default]
    Idle,
    /// Loading a model.
    Loading,
    /// Running job `job`.
    Running {
        /// Job id.
        job: u64,
        /// Its cancel flag.
        cancel: Arc<AtomicBool>,
        /// Cancel was requested.
        cancelling: bool,
    },
}

/// The model as the UI knows it.
#[derive(Debug, Clone, Default)]
pub enum ModelStatus {
    /// Nothing loaded yet.
    #[default]
    Empty,
    /// Loaded.
    Loaded(ModelInfo),
}

/// How the last job ended (for the status bar).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All images made.
    Finished {
        /// Images.
        images: usize,
        /// Seconds.
        seconds: f64,
    },
    /// Stopped by Cancel.
    Cancelled {
        /// Images made before the stop.
        images: usize,
    },
    /// Failed.
    Failed(String),
}

/// Everything the studio shows.
#[derive(Debug)]
pub struct AppState {
    /// Model panel fields.
    pub model: ModelForm,
    /// Identities panel fields.
    pub identity_form: IdentityForm,
    /// Sampling panel fields.
    pub sampling: SamplingForm,
    /// The identity list.
    pub identities: Vec<IdentityEntry>,
    /// Result grid of the current or last run.
    pub grid: Option<Grid>,
    /// Loaded model.
    pub model_status: ModelStatus,
    /// Last model-load error (shown in the Model panel).
    pub model_error: Option<String>,
    /// Worker activity.
    pub busy: Busy,
    /// Progress of the running job.
    pub progress: Option<Progress>,
    /// Step of the last live preview `(step, steps)`.
    pub preview_step: Option<(usize, usize)>,
    /// How the last job ended.
    pub outcome: Option<Outcome>,
    /// Error banner text (dismissable).
    pub error: Option<String>,
    /// Informational message (e.g. "exported to …").
    pub notice: Option<String>,
    /// Selected image `(row, col)`.
    pub selection: Option<(usize, usize)>,
    /// Row shown in the zoom view.
    pub zoom: Option<usize>,
    /// Workspace tab.
    pub tab: Tab,
    /// PNG export path.
    pub export_path: String,
    /// Skip rejected images when exporting.
    pub export_skip_rejected: bool,
    /// Session file path.
    pub session_path: String,
    /// A session file is being read or written in the background.
    pub session_io: bool,
    /// Channel for background file I/O results (the worker's event channel); `None` does
    /// the I/O inline (unit tests).
    pub io: Option<crate::worker::EventSender>,
    /// A context file is being read.
    pub contexts_loading: bool,
    /// An export is being written.
    pub exporting: bool,
    /// The Analyze tab's settings and result.
    pub analyze: super::views::analyze_tab::AnalyzeState,
    /// The Export tab's rules, preview and export progress.
    pub export_tab: super::views::export_tab::ExportTabState,
    /// The Train tab's settings, curves and run.
    pub train_tab: super::views::train_tab::TrainTabState,
    /// The Identities panel's face picker ("identity from a photo").
    pub photo_faces: super::photo_faces::PhotoFacesState,
    next_job: u64,
}

impl Default for AppState {
    fn default() -> Self {
        let form = IdentityForm::default();
        let identities = random_identities(form.seed, form.first, form.count, DEFAULT_CONTEXT_DIM)
            .unwrap_or_default();
        Self {
            model: ModelForm::default(),
            identity_form: form,
            sampling: SamplingForm::default(),
            identities,
            grid: None,
            model_status: ModelStatus::Empty,
            model_error: None,
            busy: Busy::Idle,
            progress: None,
            preview_step: None,
            outcome: None,
            error: None,
            notice: None,
            selection: None,
            zoom: None,
            tab: Tab::Generate,
            export_path: "idiff_grid.png".into(),
            export_skip_rejected: false,
            session_path: "idiff_session.json".into(),
            session_io: false,
            io: None,
            contexts_loading: false,
            exporting: false,
            analyze: Default::default(),
            export_tab: Default::default(),
            train_tab: Default::default(),
            photo_faces: Default::default(),
            next_job: 1,
        }
    }
}

impl AppState {
    /// True while a job runs.
    pub fn is_running(&self) -> bool {
        matches!(self.busy, Busy::Running { .. })
    }

    /// True when the worker is free.
    pub fn is_idle(&self) -> bool {
        matches!(self.busy, Busy::Idle)
    }

    /// The loaded model, if any.
    pub fn model_info(&self) -> Option<&ModelInfo> {
        match &self.model_status {
            ModelStatus::Loaded(i) => Some(i),
            ModelStatus::Empty => None,
        }
    }

    /// Width of identity contexts: the model's, else 512.
    pub fn context_dim(&self) -> usize {
        self.model_info()
            .map_or(DEFAULT_CONTEXT_DIM, |m| m.context_dim)
    }

    /// Asks the worker to load the model in the Model panel.
    pub fn load_model(&mut self, worker: &Worker) {
        if !self.is_idle() {
            return;
        }
        self.model_error = None;
        self.busy = Busy::Loading;
        worker.send(Command::LoadModel(LoadRequest {
            weights: self.model.weight_paths(),
            device: self.model.device.clone(),
            dtype: self.model.dtype.clone(),
        }));
    }

    /// Why Run is not possible right now, if it is not.
    pub fn run_blocker(&self) -> Option<&'static str> {
        if self.model_info().is_none() {
            Some("load a model first")
        } else if !self.is_idle() {
            Some("the worker is busy")
        } else if self.identities.is_empty() {
            Some("the identity list is empty")
        } else {
            None
        }
    }

    /// Starts a grid or sweep job from the current settings.
    pub fn run(&mut self, worker: &Worker) {
        if let Some(why) = self.run_blocker() {
            self.error = Some(format!("cannot run: {why}"));
            return;
        }
        let (spec, job_cells, contexts) = match self.sampling.mode {
            RunMode::Grid => self.grid_job(),
            RunMode::Sweep => self.sweep_job(),
        };
        for s in &spec.settings {
            if let Err(e) = s.validate() {
                self.error = Some(format!("cannot run: {e:#}"));
                return;
            }
        }
        let id = self.next_job;
        self.next_job += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let mut grid = Grid::new(id, spec);
        grid.contexts = contexts.iter().take(grid.rows()).cloned().collect();
        // Same identities and settings: the seed contract reproduces the images, so keep
        // the curation.
        if let Some(old) = self.grid.take() {
            if old.spec == grid.spec {
                grid.rejects = old.rejects;
            }
        }
        let job = Job {
            id,
            kind: grid.spec.kind(),
            contexts,
            settings: grid.spec.settings.clone(),
            cells: job_cells,
            batch_size: self.sampling.batch_size.max(1),
            preview_every: if self.sampling.live_preview {
                self.sampling.preview_every.max(1)
            } else {
                0
            },
            cancel: cancel.clone(),
        };
        self.grid = Some(grid);
        self.selection = self.selection.filter(|(r, c)| {
            self.grid
                .as_ref()
                .is_some_and(|g| *r < g.rows() && *c < g.cols())
        });
        self.progress = None;
        self.preview_step = None;
        self.outcome = None;
        self.error = None;
        self.busy = Busy::Running {
            job: id,
            cancel,
            cancelling: false,
        };
        worker.send(Command::Run(job));
    }

    fn grid_job(&self) -> (GridSpec, Vec<JobCell>, Vec<Arc<Vec<f32>>>) {
        let per = self.sampling.per_identity.max(1);
        let spec = GridSpec {
            sweep: false,
            settings: vec![self.sampling.settings()],
            rows: self.row_labels(self.identities.len()),
            columns: (0..per).map(|c| format!("sample {c}")).collect(),
        };
        let cells = self
            .identities
            .iter()
            .enumerate()
            .flat_map(|(r, id)| {
                (0..per).map(move |c| JobCell {
                    row: r,
                    col: c,
                    key: ImageKey {
                        identity: id.key,
                        sample: c as u64,
                    },
                    settings: 0,
                })
            })
            .collect();
        let contexts = self.identities.iter().map(|i| i.context.clone()).collect();
        (spec, cells, contexts)
    }

    fn sweep_job(&self) -> (GridSpec, Vec<JobCell>, Vec<Arc<Vec<f32>>>) {
        let rows = self.sampling.sweep_rows.clamp(1, self.identities.len());
        let values = self.sampling.sweep_values();
        let param = self.sampling.sweep_param;
        let spec = GridSpec {
            sweep: true,
            settings: self.sampling.sweep_settings(),
            rows: self.row_labels(rows),
            columns: values
                .iter()
                .map(|v| match param {
                    SweepParam::Guidance => format!("w = {v:.2}"),
                    SweepParam::ContextDropout => format!("p = {v:.2}"),
                })
                .collect(),
        };
        let sample = self.sampling.sweep_sample;
        let ids = &self.identities[..rows];
        // Column-major: one batch per swept value.
        let cells = (0..values.len())
            .flat_map(|c| {
                ids.iter().enumerate().map(move |(r, id)| JobCell {
                    row: r,
                    col: c,
                    key: ImageKey {
                        identity: id.key,
                        sample,
                    },
                    settings: c,
                })
            })
            .collect();
        let contexts = ids.iter().map(|i| i.context.clone()).collect();
        (spec, cells, contexts)
    }

    fn row_labels(&self, n: usize) -> Vec<RowLabel> {
        self.identities[..n]
            .iter()
            .map(|i| RowLabel {
                name: i.name.clone(),
                origin: i.origin.clone(),
                key: i.key,
                reference: i.reference.clone(),
            })
            .collect()
    }

    /// Requests the running job to stop (it stops within one denoising step).
    pub fn cancel(&mut self) {
        if let Busy::Running {
            cancel, cancelling, ..
        } = &mut self.busy
        {
            cancel.store(true, Ordering::Relaxed);
            *cancelling = true;
        }
    }

    /// Space: cancel a running job, else run.
    pub fn run_or_cancel(&mut self, worker: &Worker) {
        if self.is_running() {
            self.cancel();
        } else {
            self.run(worker);
        }
    }

    /// R: a fresh sampling seed.
    pub fn new_seed(&mut self) {
        self.sampling.seed = u64::from(rand::random::<u32>());
    }

    /// Rebuilds the identity list from the Identities panel (a context file is read in the
    /// background and arrives as [`Event::ContextsLoaded`]).
    pub fn apply_identity_form(&mut self, worker: &Worker) {
        let f = self.identity_form.clone();
        let result = match f.kind {
            IdentitySourceKind::Random => random_identities(
                f.seed,
                f.first,
                f.count.clamp(1, 100_000),
                self.context_dim(),
            ),
            IdentitySourceKind::File => {
                let path = f.file.trim();
                if path.is_empty() {
                    self.error = Some("choose a context file first".into());
                    return;
                }
                self.contexts_loading = true;
                io::spawn_load_contexts(
                    PathBuf::from(path),
                    self.context_dim(),
                    worker.event_sender(),
                );
                return;
            }
            IdentitySourceKind::Photo => {
                self.detect_faces(worker);
                return;
            }
            IdentitySourceKind::Procface => {
                self.contexts_loading = true;
                io::spawn_procface_identities(
                    f.first,
                    f.count.clamp(1, 10_000),
                    worker.event_sender(),
                );
                return;
            }
            IdentitySourceKind::Interpolate => {
                match (self.identities.get(f.from), self.identities.get(f.to)) {
                    (Some(a), Some(b)) => interpolate(a, b, f.steps, f.shared_noise),
                    _ => Err(anyhow::anyhow!(
                        "interpolation endpoints must be rows of the current list (0..{})",
                        self.identities.len()
                    )),
                }
            }
        };
        match result {
            Ok(ids) => self.set_identities(ids),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Random identities drawn for another context width (e.g. 512 before a 64-d model was
    /// loaded) are redrawn from the same seed for the loaded model's width.
    fn fit_random_identities_to_model(&mut self) {
        let dim = self.context_dim();
        let f = &self.identity_form;
        if f.kind != IdentitySourceKind::Random
            || self.identities.iter().all(|i| i.context.len() == dim)
        {
            return;
        }
        if let Ok(ids) = random_identities(f.seed, f.first, self.identities.len().max(1), dim) {
            self.identities = ids;
        }
    }

    fn set_identities(&mut self, ids: Vec<IdentityEntry>) {
        self.identities = ids;
        self.notice = Some(format!("{} identities in the list", self.identities.len()));
    }

    /// Writes the grid as PNG in the background.
    pub fn export_png(&mut self, worker: &Worker) {
        let Some(grid) = &self.grid else {
            self.error = Some("nothing to export yet: run first".into());
            return;
        };
        let rows = grid.export_rows(self.export_skip_rejected);
        if rows.is_empty() {
            self.error = Some("nothing to export yet: no finished images".into());
            return;
        }
        self.exporting = true;
        io::spawn_export_png(
            rows,
            PathBuf::from(self.export_path.trim()),
            worker.event_sender(),
        );
    }

    /// Moves the selection by `(dr, dc)` within the grid (starting at the top-left).
    pub fn move_selection(&mut self, dr: isize, dc: isize) {
        let Some(g) = &self.grid else { return };
        if g.rows() == 0 || g.cols() == 0 {
            return;
        }
        let (r, c) = match self.selection {
            None => (0, 0),
            Some((r, c)) => (
                (r as isize + dr).clamp(0, g.rows() as isize - 1) as usize,
                (c as isize + dc).clamp(0, g.cols() as isize - 1) as usize,
            ),
        };
        self.selection = Some((r, c));
        if self.zoom.is_some() {
            self.zoom = Some(r);
        }
    }

    /// Delete: toggles the reject mark of the selected image.
    pub fn toggle_reject_selected(&mut self) {
        if let (Some((r, c)), Some(g)) = (self.selection, self.grid.as_mut()) {
            g.rejects.toggle_image(r, c);
        }
    }

    /// Updates the state from a worker or background event.
    pub fn apply(&mut self, event: Event) {
        let current_job = match &self.busy {
            Busy::Running { job, .. } => Some(*job),
            _ => None,
        };
        let is_current = |job: u64| current_job == Some(job);
        match event {
            e @ (Event::AnalysisProgress { .. } | Event::AnalysisFinished { .. }) => {
                self.analyze.apply(e);
            }
            e @ (Event::CurationPreview { .. }
            | Event::DatasetExportProgress { .. }
            | Event::DatasetExportFinished { .. }) => self.export_tab.apply(e),
            e @ (Event::TrainProgress { .. }
            | Event::TrainLog { .. }
            | Event::TrainFinished { .. }) => self.train_tab.apply(e),
            e @ Event::FacesDetected { .. } => self.photo_faces.apply(e),
            Event::ModelLoaded(info) => {
                self.busy = Busy::Idle;
                self.model_error = None;
                self.notice = Some(format!(
                    "model loaded: {} parameters on {} in {:.1} s",
                    format_count(info.parameters()),
                    info.device,
                    info.load_seconds
                ));
                self.model_status = ModelStatus::Loaded(info);
                self.fit_random_identities_to_model();
            }
            Event::JobStarted { .. } => {}
            Event::Progress(p) if is_current(p.job) => self.progress = Some(p),
            Event::ImageReady {
                job,
                identity,
                sample,
                image,
            } => {
                if let Some(g) = self.grid.as_mut().filter(|g| g.job == job) {
                    g.put(identity, sample, image, false);
                }
            }
            Event::IdentityFinished { job, identity } => {
                if let Some(g) = self.grid.as_mut().filter(|g| g.job == job) {
                    g.finished_rows.insert(identity);
                }
            }
            Event::Preview {
                job,
                step,
                steps,
                images,
            } if is_current(job) => {
                if let Some(g) = self.grid.as_mut().filter(|g| g.job == job) {
                    for (r, c, im) in images {
                        g.put(r, c, im, true);
                    }
                }
                self.preview_step = Some((step, steps));
            }
            Event::JobFinished { job, seconds } => {
                if is_current(job) {
                    let images = self.grid.as_ref().map_or(0, Grid::final_images);
                    self.finish(Outcome::Finished { images, seconds });
                }
            }
            Event::Cancelled { job, images_done } => {
                if is_current(job) {
                    self.finish(Outcome::Cancelled {
                        images: images_done,
                    });
                }
            }
            Event::Error(msg) => {
                match self.busy {
                    Busy::Loading => self.model_error = Some(msg.clone()),
                    Busy::Running { .. } => self.outcome = Some(Outcome::Failed(msg.clone())),
                    Busy::Idle => {}
                }
                self.busy = Busy::Idle;
                self.progress = None;
                self.drop_previews();
                self.error = Some(msg);
            }
            Event::Exported(r) => {
                self.exporting = false;
                match r {
                    Ok(p) => self.notice = Some(format!("exported {}", p.display())),
                    Err(e) => self.error = Some(format!("export failed: {e}")),
                }
            }
            Event::SessionSaved(r) => self.session_saved(r),
            Event::ContextsLoaded(r) => {
                self.contexts_loading = false;
                match r {
                    Ok(LoadedContexts { path, names, rows }) => {
                        let label = path.file_name().map_or_else(
                            || path.display().to_string(),
                            |n| n.to_string_lossy().into_owned(),
                        );
                        self.set_identities(file_identities(&label, &names, rows));
                    }
                    Err(e) => self.error = Some(e),
                }
            }
            Event::ProcfaceIdentities(result) => {
                self.contexts_loading = false;
                match result {
                    Ok(ids) => self.set_identities(ids),
                    Err(e) => self.error = Some(e),
                }
            }
            Event::App(message) => match message.downcast_ref::<AppMessage>() {
                Some(AppMessage::FilePicked {
                    target,
                    path: Some(p),
                }) => self.fill_path(*target, p.clone()),
                Some(AppMessage::SessionOpened(r)) => self.session_opened(r.clone()),
                Some(AppMessage::FilePicked { path: None, .. }) | None => {}
            },
            Event::Progress(_) | Event::Preview { .. } => {}
        }
    }

    /// Puts a path chosen in a file dialog into its field (and opens or saves a session).
    pub fn fill_path(&mut self, target: PickTarget, path: PathBuf) {
        let text = path.display().to_string();
        match target {
            PickTarget::Unet => self.model.unet = text,
            PickTarget::UnetConfig => self.model.unet_config = text,
            PickTarget::Decoder => self.model.decoder = text,
            PickTarget::DecoderConfig => self.model.decoder_config = text,
            PickTarget::FrModel => self.model.fr_model = text,
            PickTarget::Contexts => self.identity_form.file = text,
            PickTarget::Photo => self.identity_form.photo = text,
            PickTarget::ModelsDir => self.identity_form.models_dir = text,
            PickTarget::ExportPng => self.export_path = text,
            t @ (PickTarget::DatasetSource
            | PickTarget::DatasetEmbeddings
            | PickTarget::DatasetRejects
            | PickTarget::DatasetReference
            | PickTarget::DatasetOut) => self.export_tab.fill_path(t, path),
            t @ (PickTarget::TrainData | PickTarget::TrainVal | PickTarget::TrainOut) => {
                self.train_tab.fill_path(t, path)
            }
            PickTarget::OpenSession => {
                self.session_path = text;
                self.open_session();
            }
            PickTarget::SaveSession => {
                self.session_path = text;
                self.save_session();
            }
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.busy = Busy::Idle;
        self.progress = None;
        self.preview_step = None;
        self.outcome = Some(outcome);
        self.drop_previews();
    }

    /// Removes leftover x̂0 previews (after a cancel or error) so only real images remain.
    fn drop_previews(&mut self) {
        if let Some(g) = self.grid.as_mut() {
            for c in &mut g.cells {
                if c.as_ref().is_some_and(|x| x.preview) {
                    *c = None;
                }
            }
        }
    }
}

/// `12345678` → `12.3 M`.
pub fn format_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Seconds as `m:ss` (or `h:mm:ss`).
pub fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "–".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(format_count(12_345_678), "12.3 M");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_duration(75.0), "1:15");
        assert_eq!(format_duration(3725.0), "1:02:05");
        assert_eq!(format_duration(f64::INFINITY), "–");
    }

    #[test]
    fn run_without_a_model_explains_why() {
        let worker = Worker::spawn();
        let mut s = AppState::default();
        s.run(&worker);
        assert!(s.error.as_deref().unwrap().contains("load a model"));
        assert!(s.is_idle());
    }
}
