//! The Train tab: a face-recognition model trained on an exported dataset (or on ProcFace
//! faces) with the built-in candle trainer, or by an external command (for example
//! arcface_torch under torchrun). Live plots of loss, learning rate and accuracy, an ETA,
//! the run's log, and Stop (the built-in run checkpoints and resumes; an external one is
//! terminated). The work runs in [`crate::worker::train`], never on the UI thread.

use super::{widgets, ViewCtx};
use crate::app::messages::PickTarget;
use crate::app::state::{format_duration, AppState};
use crate::app::style;
use crate::train::config::{BackboneSpec, TrainConfig};
use crate::train::margin::LossKind;
use crate::train::metrics::EpochRecord;
use crate::train::run::{RunInfo, StepEvent, TrainEvent};
use crate::worker::train::{spawn, LogStream, ProcFaceData, TrainJob, TrainOutcome, TrainRequest};
use crate::worker::{Event, Worker};
use egui::{Color32, RichText, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Log lines kept in the tab.
const MAX_LOG: usize = 5000;
/// Points drawn per curve (longer series are thinned).
const MAX_PLOT_POINTS: usize = 3000;

/// Default external trainer command.
pub const DEFAULT_COMMAND: &str =
    "torchrun --nproc_per_node=1 train.py --data {dataset} --output {output}";

/// Which trainer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum TrainerKind {
    /// The built-in candle trainer.
    #[default]
    BuiltIn,
    /// A user-given command.
    External,
}

/// Where the built-in trainer's images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DataChoice {
    /// An ImageFolder or RecordIO dataset on disk.
    Path,
    /// ProcFace faces rendered on the fly.
    ProcFace,
}

/// A run in progress.
#[derive(Debug, Clone)]
pub struct RunningTrain {
    /// Request id.
    pub id: u64,
    /// Its trainer.
    pub kind: TrainerKind,
    /// Its stop flag.
    pub cancel: Arc<AtomicBool>,
    /// Stop was pressed.
    pub stopping: bool,
    /// When Start was pressed.
    pub started: Instant,
}

/// The Train tab's fields: what sessions keep.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainForm {
    /// Built-in or external trainer.
    pub trainer: TrainerKind,
    /// Dataset on disk or ProcFace.
    pub data: DataChoice,
    /// Dataset path (ImageFolder, `*.rec`, or a folder holding `train.rec`).
    pub dataset: String,
    /// ProcFace identities.
    pub procface_identities: usize,
    /// ProcFace images per identity.
    pub procface_per_identity: usize,
    /// `iresnet18|34|50|100` or four block counts like `1,1,1,1`.
    pub backbone: String,
    /// Stem width (64 = IResNet).
    pub width: usize,
    /// Input side (112 = IResNet).
    pub input_size: usize,
    /// Embedding size.
    pub num_features: usize,
    /// Dropout before the FC layer.
    pub dropout: f64,
    /// Margin loss.
    pub loss: LossKind,
    /// Epochs.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Multiply the learning rate by batch/512.
    pub scale_lr: bool,
    /// Epochs of warm-up.
    pub warmup_epochs: f64,
    /// RandAugment operations per image (0 = flip only).
    pub rand_ops: usize,
    /// Seed of data order and augmentation.
    pub seed: u64,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Validation `.bin` (empty: none).
    pub val: String,
    /// With ProcFace data and no `.bin`: validate on held-out ProcFace identities.
    pub procface_val: bool,
    /// Held-out ProcFace identities (6 pairs each).
    pub procface_val_identities: usize,
    /// Output folder.
    pub out: String,
    /// Continue the checkpoint in the output folder.
    pub resume: bool,
    /// External trainer command template.
    pub command: String,
}

impl Default for TrainForm {
    fn default() -> Self {
        let cfg = TrainConfig::new("", "");
        Self {
            trainer: TrainerKind::BuiltIn,
            data: DataChoice::Path,
            dataset: String::new(),
            procface_identities: 200,
            procface_per_identity: 12,
            backbone: "iresnet50".into(),
            width: cfg.backbone.width,
            input_size: cfg.backbone.input_size,
            num_features: cfg.backbone.num_features,
            dropout: cfg.backbone.dropout,
            loss: cfg.loss,
            epochs: cfg.epochs,
            batch_size: cfg.batch_size,
            lr: cfg.lr,
            scale_lr: cfg.scale_lr,
            warmup_epochs: cfg.warmup_epochs,
            rand_ops: cfg.augment.num_ops,
            seed: cfg.seed,
            device: cfg.device,
            val: String::new(),
            procface_val: true,
            procface_val_identities: 100,
            out: "fr_runs/run1".into(),
            resume: false,
            command: DEFAULT_COMMAND.into(),
        }
    }
}

/// The Train tab: its fields, and the live run, curves and log.
#[derive(Debug, Clone)]
pub struct TrainTabState {
    /// The fields (kept in sessions).
    pub form: TrainForm,
    /// The run in progress.
    pub running: Option<RunningTrain>,
    /// Facts about the current (or last) built-in run.
    pub info: Option<RunInfo>,
    /// The latest step.
    pub last_step: Option<StepEvent>,
    /// What the run is doing besides steps (e.g. evaluating).
    pub phase: Option<String>,
    /// Loss per step.
    pub loss_points: Vec<[f64; 2]>,
    /// Learning rate per step.
    pub lr_points: Vec<[f64; 2]>,
    /// Training accuracy per step, at fractional epochs.
    pub train_acc_points: Vec<[f64; 2]>,
    /// Validation accuracy per epoch.
    pub val_points: Vec<[f64; 2]>,
    /// Finished epochs of the current run.
    pub epochs_done: Vec<EpochRecord>,
    /// The run's log (events of the built-in trainer, output of an external one).
    pub log: VecDeque<(LogStream, String)>,
    /// How the last run ended, or why it did not start.
    pub last: Option<Result<TrainOutcome, String>>,
    /// Trainer of the last run.
    pub last_kind: TrainerKind,
    run_started: Option<(Instant, usize)>,
    export_seen: Option<String>,
    next_id: u64,
}

impl Default for TrainTabState {
    fn default() -> Self {
        Self {
            form: TrainForm::default(),
            running: None,
            info: None,
            last_step: None,
            phase: None,
            loss_points: Vec::new(),
            lr_points: Vec::new(),
            train_acc_points: Vec::new(),
            val_points: Vec::new(),
            epochs_done: Vec::new(),
            log: VecDeque::new(),
            last: None,
            last_kind: TrainerKind::BuiltIn,
            run_started: None,
            export_seen: None,
            next_id: 1,
        }
    }
}

fn path(s: &str) -> Option<PathBuf> {
    let t = s.trim();
    (!t.is_empty()).then(|| PathBuf::from(t))
}

impl TrainTabState {
    /// True while a run is in progress.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    fn is_current(&self, id: u64) -> bool {
        self.running.as_ref().is_some_and(|r| r.id == id)
    }

    /// Asks the running training to stop (the built-in trainer checkpoints first).
    pub fn stop(&mut self) {
        if let Some(r) = &mut self.running {
            r.cancel.store(true, Ordering::SeqCst);
            r.stopping = true;
        }
    }

    /// Puts a path chosen in a file dialog into its field.
    pub fn fill_path(&mut self, target: PickTarget, path: PathBuf) {
        let text = path.display().to_string();
        match target {
            PickTarget::TrainData => self.form.dataset = text,
            PickTarget::TrainVal => self.form.val = text,
            PickTarget::TrainOut => self.form.out = text,
            _ => {}
        }
    }

    /// Uses a finished export's destination as the dataset when the field is empty or
    /// still holds the previous export's destination.
    pub fn follow_export(&mut self, destination: Option<String>) {
        let Some(dest) = destination else { return };
        if self.export_seen.as_ref() == Some(&dest) {
            return;
        }
        let untouched = self.form.dataset.trim().is_empty()
            || self.export_seen.as_deref() == Some(self.form.dataset.trim());
        if untouched {
            self.form.dataset = dest.clone();
        }
        self.export_seen = Some(dest);
    }

    /// The built-in trainer's configuration from the fields.
    pub fn config(&self) -> Result<TrainConfig, String> {
        let data = match self.form.data {
            DataChoice::Path => path(&self.form.dataset).ok_or(
                "choose a dataset (ImageFolder or RecordIO folder), or ProcFace (built-in)",
            )?,
            DataChoice::ProcFace => PathBuf::from("procface"),
        };
        let out = path(&self.form.out).ok_or("choose an output folder")?;
        let err = |e: anyhow::Error| format!("{e:#}");
        let mut backbone = BackboneSpec::parse(
            self.form.backbone.trim(),
            self.form.num_features,
            self.form.dropout,
        )
        .map_err(err)?;
        backbone.width = self.form.width;
        backbone.input_size = self.form.input_size;
        let mut cfg = TrainConfig::new(data, out).with_loss(self.form.loss);
        cfg.backbone = backbone;
        cfg.epochs = self.form.epochs;
        cfg.batch_size = self.form.batch_size;
        cfg.lr = self.form.lr;
        cfg.scale_lr = self.form.scale_lr;
        cfg.warmup_epochs = self.form.warmup_epochs;
        cfg.augment.num_ops = self.form.rand_ops;
        cfg.seed = self.form.seed;
        cfg.device = self.form.device.trim().to_string();
        cfg.val = path(&self.form.val);
        cfg.resume = self.form.resume;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// The job the fields describe.
    pub fn job(&self) -> Result<TrainJob, String> {
        match self.form.trainer {
            TrainerKind::BuiltIn => {
                let procface = (self.form.data == DataChoice::ProcFace).then_some(ProcFaceData {
                    identities: self.form.procface_identities,
                    per_identity: self.form.procface_per_identity,
                });
                let procface_val = (procface.is_some()
                    && self.form.procface_val
                    && path(&self.form.val).is_none())
                .then_some(self.form.procface_val_identities);
                Ok(TrainJob::BuiltIn {
                    config: Box::new(self.config()?),
                    procface,
                    procface_val,
                })
            }
            TrainerKind::External => {
                if self.form.command.trim().is_empty() {
                    return Err("enter the external trainer's command".into());
                }
                let dataset = path(&self.form.dataset).ok_or("choose a dataset folder")?;
                Ok(TrainJob::External {
                    template: self.form.command.trim().to_string(),
                    dataset: dataset.display().to_string(),
                    output: path(&self.form.out).ok_or("choose an output folder")?,
                })
            }
        }
    }

    fn clear_curves(&mut self) {
        self.info = None;
        self.last_step = None;
        self.phase = None;
        self.loss_points.clear();
        self.lr_points.clear();
        self.train_acc_points.clear();
        self.val_points.clear();
        self.epochs_done.clear();
    }

    fn push_log(&mut self, stream: LogStream, text: String) {
        if self.log.len() >= MAX_LOG {
            self.log.pop_front();
        }
        self.log.push_back((stream, text));
    }

    /// Starts a run from the fields on its own thread (never queued behind a sampling job);
    /// problems with the fields become [`Self::last`]'s error.
    pub fn start(&mut self, worker: &Worker) {
        if self.running.is_some() {
            return;
        }
        let job = match self.job() {
            Ok(j) => j,
            Err(msg) => {
                self.last = Some(Err(msg));
                return;
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        let resuming = self.form.trainer == TrainerKind::BuiltIn && self.form.resume;
        if !resuming {
            self.clear_curves();
        }
        self.log.clear();
        self.last = None;
        self.last_kind = self.form.trainer;
        self.run_started = None;
        self.phase = Some(match self.form.trainer {
            TrainerKind::BuiltIn => "preparing the data and the model…".into(),
            TrainerKind::External => "starting the external trainer…".into(),
        });
        let cancel = Arc::new(AtomicBool::new(false));
        self.running = Some(RunningTrain {
            id,
            kind: self.form.trainer,
            cancel: cancel.clone(),
            stopping: false,
            started: Instant::now(),
        });
        spawn(TrainRequest { id, job, cancel }, worker.event_sender());
    }

    /// Applies a Train-tab event (others, and those of older runs, are ignored).
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::TrainProgress { id, event } if self.is_current(id) => self.on_train(event),
            Event::TrainLog { id, line } if self.is_current(id) => {
                self.phase = None;
                self.push_log(line.stream, line.text);
            }
            Event::TrainFinished { id, result } if self.is_current(id) => {
                self.running = None;
                self.phase = None;
                match &result {
                    Ok(TrainOutcome::BuiltIn(s)) => {
                        self.push_log(
                            LogStream::Stdout,
                            if s.completed {
                                format!("finished: {} epochs, {} steps", s.epochs_done, s.steps)
                            } else {
                                format!("stopped at step {}", s.steps)
                            },
                        );
                        if !s.completed && s.steps > 0 {
                            // Start continues from the checkpoint.
                            self.form.resume = true;
                        }
                    }
                    Ok(TrainOutcome::External(e)) => self.push_log(
                        LogStream::Stdout,
                        match (e.stopped, e.code) {
                            (true, _) => "stopped".into(),
                            (false, Some(c)) => format!("exited with code {c}"),
                            (false, None) => "killed by a signal".into(),
                        },
                    ),
                    Err(msg) => self.push_log(LogStream::Stderr, format!("error: {msg}")),
                }
                self.last = Some(result);
            }
            _ => {}
        }
    }

    fn on_train(&mut self, event: TrainEvent) {
        match event {
            TrainEvent::Started(info) => {
                let start = info.start_step as f64;
                let epoch = info.start_step as f64 / info.steps_per_epoch.max(1) as f64;
                self.loss_points.retain(|p| p[0] <= start);
                self.lr_points.retain(|p| p[0] <= start);
                self.train_acc_points.retain(|p| p[0] <= epoch);
                self.val_points.retain(|p| p[0] <= epoch.floor());
                self.epochs_done.retain(|r| r.step <= info.start_step);
                self.push_log(
                    LogStream::Stdout,
                    format!(
                        "{}: {} images of {} identities, {} steps/epoch, {} steps, peak lr {:.5}{}",
                        info.source,
                        info.num_images,
                        info.num_classes,
                        info.steps_per_epoch,
                        info.total_steps,
                        info.peak_lr,
                        info.resumed_from
                            .as_ref()
                            .map(|d| format!(
                                ", resumed at step {} from {}",
                                info.start_step,
                                d.display()
                            ))
                            .unwrap_or_default()
                    ),
                );
                self.run_started = Some((Instant::now(), info.start_step));
                self.phase = None;
                self.info = Some(info);
            }
            TrainEvent::Step(s) => {
                let x = s.step as f64;
                self.loss_points.push([x, s.loss]);
                self.lr_points.push([x, s.lr]);
                let epoch = (s.epoch - 1) as f64 + s.batch as f64 / s.batches.max(1) as f64;
                self.train_acc_points.push([epoch, s.train_accuracy]);
                self.phase = None;
                self.last_step = Some(s);
            }
            TrainEvent::Evaluating { epoch } => {
                self.phase = Some(format!("evaluating epoch {epoch} on the validation set…"));
            }
            TrainEvent::EpochEnd(r) => {
                let val = r.val.as_ref().map(|v| {
                    self.val_points.push([r.epoch as f64, v.accuracy_mean]);
                    format!(
                        ", {} {:.2}% ± {:.2}%{}",
                        v.name,
                        100.0 * v.accuracy_mean,
                        100.0 * v.accuracy_std,
                        if r.best { " (best)" } else { "" }
                    )
                });
                self.push_log(
                    LogStream::Stdout,
                    format!(
                        "epoch {}: loss {:.4}, train acc {:.2}%, {:.1} images/s{}",
                        r.epoch,
                        r.mean_loss,
                        100.0 * r.train_accuracy,
                        r.images_per_sec,
                        val.unwrap_or_default()
                    ),
                );
                self.phase = None;
                self.epochs_done.push(r);
            }
            TrainEvent::CheckpointSaved { step, path } => {
                self.push_log(
                    LogStream::Stdout,
                    format!("checkpoint at step {step}: {}", path.display()),
                );
            }
        }
    }

    /// Estimated seconds left in the running built-in run (from this session's step rate).
    pub fn eta_seconds(&self) -> Option<f64> {
        let s = self.last_step.as_ref()?;
        let (t0, step0) = self.run_started?;
        let done = s.step.checked_sub(step0).filter(|&d| d > 0)?;
        let per_step = t0.elapsed().as_secs_f64() / done as f64;
        Some(per_step * s.total_steps.saturating_sub(s.step) as f64)
    }
}

/// Starts a run from the Train tab's fields.
pub fn start(state: &mut AppState, worker: &Worker) {
    state.train_tab.start(worker);
}

fn last_export(state: &AppState) -> Option<String> {
    match &state.export_tab.last {
        Some(Ok(Some(s))) => Some(s.out.display().to_string()),
        _ => None,
    }
}

/// Draws the tab.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let export = last_export(state);
    state.train_tab.follow_export(export);
    egui::ScrollArea::vertical()
        .id_salt("train_scroll")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            ui.heading("Train a face-recognition model");
            ui.add_space(4.0);
            let running = state.train_tab.is_running();
            ui.add_enabled_ui(!running, |ui| {
                ui.set_max_width(ui.available_width().min(900.0));
                settings(ui, &mut state.train_tab, cx);
            });
            ui.separator();
            run_section(ui, state, cx);
            ui.separator();
            if state.train_tab.last_kind == TrainerKind::BuiltIn
                || state.train_tab.form.trainer == TrainerKind::BuiltIn
            {
                plots(ui, &state.train_tab);
            }
            log_view(ui, &state.train_tab);
        });
    if state.train_tab.is_running() {
        ui.ctx()
            .request_repaint_after(std::time::Duration::from_millis(250));
    }
}

fn pick_field(
    ui: &mut Ui,
    cx: &mut ViewCtx,
    label: &str,
    value: &mut String,
    hint: &str,
    target: PickTarget,
) {
    if let Some(t) = widgets::path_field(ui, label, value, hint, target, cx.dialogs_ok) {
        let start = path(value);
        cx.pick(t, start);
    }
}

fn settings(ui: &mut Ui, t: &mut TrainTabState, cx: &mut ViewCtx) {
    ui.horizontal(|ui| {
        ui.label(RichText::new("Trainer").strong());
        ui.radio_value(
            &mut t.form.trainer,
            TrainerKind::BuiltIn,
            "Built-in (candle)",
        );
        ui.radio_value(
            &mut t.form.trainer,
            TrainerKind::External,
            "External command",
        );
    });
    match t.form.trainer {
        TrainerKind::BuiltIn => builtin_settings(ui, t, cx),
        TrainerKind::External => external_settings(ui, t, cx),
    }
}

fn builtin_settings(ui: &mut Ui, t: &mut TrainTabState, cx: &mut ViewCtx) {
    ui.horizontal(|ui| {
        ui.label(RichText::new("Data").strong());
        ui.radio_value(&mut t.form.data, DataChoice::Path, "Dataset folder");
        ui.radio_value(
            &mut t.form.data,
            DataChoice::ProcFace,
            "ProcFace (built-in)",
        );
    });
    match t.form.data {
        DataChoice::Path => pick_field(
            ui,
            cx,
            "Dataset: ImageFolder, or RecordIO (folder with train.rec, or X.rec)",
            &mut t.form.dataset,
            "the Export tab's destination",
            PickTarget::TrainData,
        ),
        DataChoice::ProcFace => {
            ui.horizontal(|ui| {
                let l = ui.label("identities");
                ui.add(egui::DragValue::new(&mut t.form.procface_identities).range(2..=100_000))
                    .labelled_by(l.id);
                let l = ui.label("images per identity");
                ui.add(egui::DragValue::new(&mut t.form.procface_per_identity).range(1..=1000))
                    .labelled_by(l.id);
            });
            widgets::caption(
                ui,
                "Procedural faces rendered on the fly at the input size (identity seeds from 0).",
            );
        }
    }
    ui.add_space(4.0);
    egui::Grid::new("train_settings")
        .num_columns(4)
        .spacing([14.0, 6.0])
        .show(ui, |ui| {
            let l = ui.label("Backbone");
            ui.horizontal(|ui| {
                egui::ComboBox::from_id_salt("train_backbone_preset")
                    .selected_text("preset")
                    .width(70.0)
                    .show_ui(ui, |ui| {
                        for p in ["iresnet18", "iresnet34", "iresnet50", "1,1,1,1"] {
                            ui.selectable_value(&mut t.form.backbone, p.to_string(), p);
                        }
                    })
                    .response
                    .labelled_by(l.id);
                ui.add(
                    egui::TextEdit::singleline(&mut t.form.backbone)
                        .desired_width(100.0)
                        .min_size(egui::vec2(100.0, 0.0)),
                )
                .labelled_by(l.id)
                .on_hover_text("iresnet18|34|50|100, or four block counts like 1,1,1,1");
            });
            let l = ui.label("Loss");
            ui.horizontal(|ui| {
                ui.radio_value(&mut t.form.loss, LossKind::CosFace, "CosFace")
                    .labelled_by(l.id)
                    .on_hover_text("s = 64, m = 0.35 (the paper's)");
                ui.radio_value(&mut t.form.loss, LossKind::ArcFace, "ArcFace")
                    .on_hover_text("s = 64, m = 0.5");
            });
            ui.end_row();
            drag(ui, "Width", &mut t.form.width, 4..=256, 1.0);
            drag(ui, "Input size", &mut t.form.input_size, 16..=224, 16.0);
            ui.end_row();
            drag(
                ui,
                "Embedding size",
                &mut t.form.num_features,
                2..=2048,
                1.0,
            );
            drag(ui, "Epochs", &mut t.form.epochs, 1..=1000, 1.0);
            ui.end_row();
            drag(ui, "Batch size", &mut t.form.batch_size, 2..=4096, 1.0);
            let l = ui.label("Learning rate");
            ui.horizontal(|ui| {
                ui.add(
                    egui::DragValue::new(&mut t.form.lr)
                        .range(1e-6..=10.0)
                        .speed(0.001)
                        .max_decimals(6),
                )
                .labelled_by(l.id);
                ui.checkbox(&mut t.form.scale_lr, "× batch/512");
            });
            ui.end_row();
        });
    let peak = if t.form.scale_lr {
        t.form.lr * t.form.batch_size as f64 / 512.0
    } else {
        t.form.lr
    };
    widgets::caption(
        ui,
        &format!(
            "Peak learning rate {peak:.5}; SGD momentum 0.9, weight decay 5e-4, warm-up then \
             cosine decay, gradient clip 5. Width 64 and input 112 give IResNet checkpoints."
        ),
    );
    egui::CollapsingHeader::new("Advanced")
        .id_salt("train_advanced")
        .show(ui, |ui| {
            egui::Grid::new("train_advanced_grid")
                .num_columns(4)
                .spacing([14.0, 6.0])
                .show(ui, |ui| {
                    let l = ui.label("Dropout");
                    ui.add(
                        egui::DragValue::new(&mut t.form.dropout)
                            .range(0.0..=0.95)
                            .speed(0.01),
                    )
                    .labelled_by(l.id);
                    let l = ui.label("Warm-up epochs");
                    ui.add(
                        egui::DragValue::new(&mut t.form.warmup_epochs)
                            .range(0.0..=100.0)
                            .speed(0.1),
                    )
                    .labelled_by(l.id);
                    ui.end_row();
                    drag(ui, "RandAugment ops", &mut t.form.rand_ops, 0..=12, 1.0);
                    let l = ui.label("Seed");
                    ui.add(egui::DragValue::new(&mut t.form.seed))
                        .labelled_by(l.id);
                    ui.end_row();
                    let l = ui.label("Device");
                    ui.add(egui::TextEdit::singleline(&mut t.form.device).desired_width(80.0))
                        .labelled_by(l.id)
                        .on_hover_text("cpu or cuda:N");
                    ui.end_row();
                });
        });
    pick_field(
        ui,
        cx,
        "Validation pairs (.bin, optional; evaluated after every epoch)",
        &mut t.form.val,
        "lfw.bin / agedb_30.bin / …",
        PickTarget::TrainVal,
    );
    if t.form.data == DataChoice::ProcFace && path(&t.form.val).is_none() {
        ui.horizontal(|ui| {
            ui.checkbox(
                &mut t.form.procface_val,
                "Validate on held-out ProcFace identities",
            );
            ui.add_enabled(
                t.form.procface_val,
                egui::DragValue::new(&mut t.form.procface_val_identities)
                    .range(2..=10_000)
                    .suffix(" identities"),
            );
        });
    }
    pick_field(
        ui,
        cx,
        "Output folder (checkpoints, metrics, backbone.safetensors)",
        &mut t.form.out,
        "fr_runs/run1",
        PickTarget::TrainOut,
    );
    ui.checkbox(
        &mut t.form.resume,
        "Resume from the checkpoint in the output folder",
    );
}

fn drag(
    ui: &mut Ui,
    label: &str,
    value: &mut usize,
    range: std::ops::RangeInclusive<usize>,
    speed: f64,
) {
    let l = ui.label(label);
    ui.add(egui::DragValue::new(value).range(range).speed(speed))
        .labelled_by(l.id);
}

fn external_settings(ui: &mut Ui, t: &mut TrainTabState, cx: &mut ViewCtx) {
    let cap = widgets::caption(
        ui,
        "Command template, run through the shell; {dataset} and {output} are replaced by \
         the (quoted) paths below. Its output is streamed into the log; Stop terminates it.",
    );
    ui.add(
        egui::TextEdit::multiline(&mut t.form.command)
            .desired_rows(2)
            .desired_width(f32::INFINITY)
            .code_editor()
            .hint_text(DEFAULT_COMMAND),
    )
    .labelled_by(cap.id);
    pick_field(
        ui,
        cx,
        "Dataset ({dataset})",
        &mut t.form.dataset,
        "the Export tab's destination",
        PickTarget::TrainData,
    );
    pick_field(
        ui,
        cx,
        "Output folder ({output}, created if missing)",
        &mut t.form.out,
        "fr_runs/run1",
        PickTarget::TrainOut,
    );
}

fn run_section(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let t = &mut state.train_tab;
    ui.horizontal(|ui| {
        match &t.running {
            Some(r) => {
                let stop = ui.add_enabled(!r.stopping, egui::Button::new("Stop training"));
                if stop.clicked() {
                    t.stop();
                }
            }
            None => {
                let start = ui.button(RichText::new("Start training").strong());
                if start.clicked() {
                    t.start(cx.worker);
                }
            }
        }
        if let Some(text) = status_text(t) {
            ui.label(text);
        }
    });
    if let (Some(r), Some(s)) = (&t.running, &t.last_step) {
        if r.kind == TrainerKind::BuiltIn {
            let fraction = s.step as f32 / s.total_steps.max(1) as f32;
            let eta = t.eta_seconds().map_or("–".into(), format_duration);
            ui.add(egui::ProgressBar::new(fraction).text(format!(
                "step {}/{} · {:.1} images/s · ETA {eta}",
                s.step, s.total_steps, s.images_per_sec
            )));
        }
    }
    if let Some(text) = outcome_text(t) {
        ui.colored_label(text.1, text.0);
    }
}

/// The one-line status of the running run.
fn status_text(t: &TrainTabState) -> Option<String> {
    let r = t.running.as_ref()?;
    if r.stopping {
        return Some(match r.kind {
            TrainerKind::BuiltIn => "Stopping: finishing the step and saving a checkpoint…".into(),
            TrainerKind::External => "Stopping the external trainer…".into(),
        });
    }
    if let Some(p) = &t.phase {
        return Some(p.clone());
    }
    match r.kind {
        TrainerKind::External => Some(format!(
            "External trainer running for {}.",
            format_duration(r.started.elapsed().as_secs_f64())
        )),
        TrainerKind::BuiltIn => t.last_step.as_ref().map(|s| {
            format!(
                "Epoch {}/{} · batch {}/{} · loss {:.4} · lr {:.5} · train acc {:.1}%",
                s.epoch,
                t.info
                    .as_ref()
                    .map_or(0, |i| i.total_steps / i.steps_per_epoch.max(1)),
                s.batch,
                s.batches,
                s.loss,
                s.lr,
                100.0 * s.train_accuracy
            )
        }),
    }
}

/// A short note for the status bar while a run is in progress.
pub fn badge(t: &TrainTabState) -> Option<String> {
    let r = t.running.as_ref()?;
    Some(match (r.kind, &t.last_step) {
        (TrainerKind::External, _) => "external trainer running".into(),
        (TrainerKind::BuiltIn, Some(s)) => format!("training: step {}/{}", s.step, s.total_steps),
        (TrainerKind::BuiltIn, None) => "training: starting".into(),
    })
}

/// How the last run ended, with its colour.
fn outcome_text(t: &TrainTabState) -> Option<(String, Color32)> {
    Some(match t.last.as_ref()? {
        Ok(TrainOutcome::BuiltIn(s)) if s.completed => {
            let best = s
                .best
                .map(|(acc, e)| format!("; best validation {:.2}% (epoch {e})", 100.0 * acc))
                .unwrap_or_default();
            (
                format!(
                    "Finished {} epochs ({} steps){best}. Backbone: {}",
                    s.epochs_done,
                    s.steps,
                    s.out.join("backbone.safetensors").display()
                ),
                style::OK,
            )
        }
        Ok(TrainOutcome::BuiltIn(s)) if s.steps > 0 => (
            format!(
                "Stopped at step {} (epoch {} done); the checkpoint in {} resumes with Start.",
                s.steps,
                s.epochs_done,
                s.out.display()
            ),
            style::WARN,
        ),
        Ok(TrainOutcome::BuiltIn(_)) => ("Stopped before the first step.".into(), style::WARN),
        Ok(TrainOutcome::External(e)) if e.stopped => {
            ("Stopped the external trainer.".into(), style::WARN)
        }
        Ok(TrainOutcome::External(e)) if e.success() => {
            ("External trainer finished (exit code 0).".into(), style::OK)
        }
        Ok(TrainOutcome::External(e)) => (
            match e.code {
                Some(c) => format!("External trainer failed with exit code {c}."),
                None => "External trainer was killed by a signal.".into(),
            },
            style::DANGER,
        ),
        Err(msg) => (format!("Training failed: {msg}"), style::DANGER),
    })
}

/// At most `max` points of `p` (evenly strided, the last one kept).
fn thin(p: &[[f64; 2]], max: usize) -> Vec<[f64; 2]> {
    let stride = p.len().div_ceil(max.max(1)).max(1);
    let mut v: Vec<[f64; 2]> = p.iter().step_by(stride).copied().collect();
    if let Some(last) = p.last() {
        if v.last() != Some(last) {
            v.push(*last);
        }
    }
    v
}

/// One titled plot panel of the train tab, `width` wide.
fn plot_panel(
    ui: &mut Ui,
    width: f32,
    title: &str,
    plot: Plot<'_>,
    add: impl FnOnce(&mut egui_plot::PlotUi<'_>),
) {
    ui.vertical(|ui| {
        ui.set_width(width);
        ui.label(RichText::new(title).strong());
        plot.height(190.0)
            .allow_scroll(false)
            .include_y(0.0)
            .show(ui, add);
    });
}

fn plots(ui: &mut Ui, t: &TrainTabState) {
    let width = ((ui.available_width() - 24.0) / 3.0).max(160.0);
    let series = |p: &[[f64; 2]]| PlotPoints::from(thin(p, MAX_PLOT_POINTS));
    ui.horizontal_top(|ui| {
        let plot = Plot::new("train_loss").x_axis_label("step");
        plot_panel(ui, width, "Loss", plot, |p| {
            p.line(
                Line::new("loss", series(&t.loss_points)).color(Color32::from_rgb(224, 120, 80)),
            );
        });
        let plot = Plot::new("train_lr").x_axis_label("step");
        plot_panel(ui, width, "Learning rate", plot, |p| {
            p.line(Line::new("lr", series(&t.lr_points)).color(style::ACCENT));
        });
        let plot = Plot::new("train_acc")
            .x_axis_label("epoch")
            .legend(Legend::default())
            .include_y(1.0);
        plot_panel(ui, width, "Accuracy", plot, |p| {
            p.line(
                Line::new("train (batch)", series(&t.train_acc_points))
                    .color(Color32::from_rgb(150, 150, 200)),
            );
            if !t.val_points.is_empty() {
                p.line(
                    Line::new("validation", PlotPoints::from(t.val_points.clone()))
                        .color(style::OK),
                );
                p.points(
                    Points::new("validation", PlotPoints::from(t.val_points.clone()))
                        .radius(3.0)
                        .color(style::OK),
                );
            }
        });
    });
    if let Some(r) = t.epochs_done.last() {
        widgets::caption(
            ui,
            &format!(
                "{} epochs done; last: loss {:.4}, train acc {:.1}%{}",
                t.epochs_done.len(),
                r.mean_loss,
                100.0 * r.train_accuracy,
                r.val
                    .as_ref()
                    .map(|v| format!(", {} {:.2}%", v.name, 100.0 * v.accuracy_mean))
                    .unwrap_or_default()
            ),
        );
    }
}

fn log_view(ui: &mut Ui, t: &TrainTabState) {
    ui.label(RichText::new("Log").strong());
    if t.log.is_empty() {
        widgets::caption(ui, "Nothing yet: the run's events and output appear here.");
        return;
    }
    let row = ui.text_style_height(&egui::TextStyle::Monospace);
    egui::Frame::group(ui.style()).show(ui, |ui| {
        egui::ScrollArea::vertical()
            .id_salt("train_log")
            .max_height(220.0)
            .auto_shrink([false, true])
            .stick_to_bottom(true)
            .show_rows(ui, row, t.log.len(), |ui, range| {
                for (stream, text) in t.log.range(range) {
                    let rt = RichText::new(text).monospace();
                    let rt = match stream {
                        LogStream::Stdout => rt,
                        LogStream::Stderr => rt.color(style::WARN),
                    };
                    // One row per line (show_rows needs equal heights); hover for the rest.
                    ui.add(egui::Label::new(rt).truncate());
                }
            });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_become_a_config_or_a_message() {
        let mut t = TrainTabState::default();
        assert!(t.config().unwrap_err().contains("choose a dataset"));
        t.form.data = DataChoice::ProcFace;
        t.form.backbone = "1,1,1,1".into();
        t.form.width = 8;
        t.form.input_size = 32;
        t.form.num_features = 16;
        t.form.batch_size = 8;
        t.form.loss = LossKind::ArcFace;
        let cfg = t.config().unwrap();
        assert_eq!(cfg.backbone.layers, [1, 1, 1, 1]);
        assert_eq!((cfg.backbone.width, cfg.backbone.input_size), (8, 32));
        assert_eq!(cfg.margin, 0.5);
        match t.job().unwrap() {
            TrainJob::BuiltIn {
                procface,
                procface_val,
                ..
            } => {
                assert_eq!(procface.unwrap().identities, 200);
                assert_eq!(procface_val, Some(100));
            }
            other => panic!("{other:?}"),
        }
        t.form.input_size = 40;
        assert!(t.config().is_err(), "input size must be a multiple of 16");
        t.form.input_size = 32;
        t.form.backbone = "resnet9000".into();
        assert!(t.config().unwrap_err().contains("unknown backbone"));
        t.form.trainer = TrainerKind::External;
        assert!(t.job().unwrap_err().contains("dataset"));
        t.form.dataset = "/data/x".into();
        assert!(matches!(t.job().unwrap(), TrainJob::External { .. }));
    }

    #[test]
    fn dataset_follows_the_last_export_until_edited() {
        let mut t = TrainTabState::default();
        t.follow_export(None);
        assert_eq!(t.form.dataset, "");
        t.follow_export(Some("/exports/a".into()));
        assert_eq!(t.form.dataset, "/exports/a");
        t.follow_export(Some("/exports/b".into()));
        assert_eq!(t.form.dataset, "/exports/b");
        t.form.dataset = "/mine".into();
        t.follow_export(Some("/exports/c".into()));
        assert_eq!(t.form.dataset, "/mine");
    }

    fn step(epoch: usize, batch: usize, step: usize) -> TrainEvent {
        TrainEvent::Step(StepEvent {
            epoch,
            batch,
            batches: 2,
            step,
            total_steps: 10,
            loss: 10.0 - step as f64,
            lr: 0.01,
            train_accuracy: 0.5,
            images_per_sec: 100.0,
            grad_norm: 1.0,
        })
    }

    fn info(start_step: usize) -> TrainEvent {
        TrainEvent::Started(RunInfo {
            source: "test".into(),
            num_images: 16,
            num_classes: 4,
            steps_per_epoch: 2,
            total_steps: 10,
            start_step,
            peak_lr: 0.01,
            resumed_from: None,
        })
    }

    #[test]
    fn events_fill_the_curves_and_a_stop_arms_resume() {
        use crate::train::metrics::ValRecord;
        use crate::train::run::TrainSummary;
        let mut t = TrainTabState {
            running: Some(RunningTrain {
                id: 3,
                kind: TrainerKind::BuiltIn,
                cancel: Arc::default(),
                stopping: false,
                started: Instant::now(),
            }),
            ..Default::default()
        };
        let ev = |event| Event::TrainProgress { id: 3, event };
        t.apply(ev(info(0)));
        t.apply(ev(step(1, 1, 1)));
        t.apply(ev(step(1, 2, 2)));
        // Events of another run are ignored.
        t.apply(Event::TrainProgress {
            id: 2,
            event: step(1, 1, 99),
        });
        t.apply(ev(TrainEvent::Evaluating { epoch: 1 }));
        assert!(status_text(&t).unwrap().contains("evaluating epoch 1"));
        t.apply(ev(TrainEvent::EpochEnd(EpochRecord {
            epoch: 1,
            step: 2,
            mean_loss: 8.5,
            train_accuracy: 0.5,
            lr: 0.01,
            images_per_sec: 100.0,
            val: Some(ValRecord {
                name: "lfw".into(),
                accuracy_mean: 0.75,
                accuracy_std: 0.01,
                best_thresholds: vec![1.0; 10],
            }),
            best: true,
        })));
        t.apply(ev(step(2, 1, 3)));
        assert_eq!(t.loss_points, vec![[1.0, 9.0], [2.0, 8.0], [3.0, 7.0]]);
        assert_eq!(t.train_acc_points[2], [1.5, 0.5]);
        assert_eq!(t.val_points, vec![[1.0, 0.75]]);
        assert!(t.eta_seconds().is_some());
        assert!(t.log.iter().any(|(_, l)| l.contains("lfw 75.00%")));
        t.apply(Event::TrainFinished {
            id: 3,
            result: Ok(TrainOutcome::BuiltIn(TrainSummary {
                out: "run".into(),
                completed: false,
                epochs_done: 1,
                steps: 3,
                history: Vec::new(),
                best: Some((0.75, 1)),
                backbone: None,
            })),
        });
        assert!(!t.is_running() && t.form.resume);
        assert!(outcome_text(&t).unwrap().0.starts_with("Stopped at step 3"));
        // A resumed run keeps the curves up to its checkpoint.
        t.running = Some(RunningTrain {
            id: 4,
            kind: TrainerKind::BuiltIn,
            cancel: Arc::default(),
            stopping: false,
            started: Instant::now(),
        });
        t.apply(Event::TrainProgress {
            id: 4,
            event: info(2),
        });
        assert_eq!(t.loss_points.len(), 2);
        assert_eq!(t.val_points.len(), 1);
        assert_eq!(t.train_acc_points.len(), 2);
    }

    #[test]
    fn thinning_keeps_the_ends() {
        let p: Vec<[f64; 2]> = (0..10_001).map(|i| [i as f64, 0.0]).collect();
        let v = thin(&p, 1000);
        assert!(v.len() <= 1002);
        assert_eq!(v[0], [0.0, 0.0]);
        assert_eq!(*v.last().unwrap(), [10_000.0, 0.0]);
        assert_eq!(thin(&p[..5], 1000).len(), 5);
    }
}
