//! The Export tab: curation rules with live counts (computed off the UI thread whenever a
//! rule, the source or the grid's rejects change), output format, destination, and the
//! export itself with progress, rate, ETA and Cancel. The work runs in
//! [`crate::worker::dataset_export`].

use super::{widgets, ViewCtx};
use crate::app::messages::PickTarget;
use crate::app::state::{format_duration, AppState};
use crate::app::style;
use crate::dataset::curate::{CurationCounts, CurationRules, ImageId, LeakageRule, RuleCount};
use crate::dataset::export::{ExportFormat, ExportProgress, ExportSummary, RESIZE_METHOD};
use crate::dataset::ImageEncoding;
use crate::worker::dataset_export::{
    spawn_export, spawn_preview, CurationRequest, DatasetExportRequest, DatasetSource,
    PreparedCache,
};
use crate::worker::{Event, Worker};
use egui::{RichText, Ui};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A threshold rule: enabled flag and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// Apply the rule.
    pub on: bool,
    /// Its threshold.
    pub value: f32,
}

impl Threshold {
    fn get(self) -> Option<f32> {
        self.on.then_some(self.value)
    }
}

/// The Export tab's fields, preview and export progress.
#[derive(Debug, Clone)]
pub struct ExportTabState {
    /// Export a generated folder instead of the current grid.
    pub use_folder: bool,
    /// The generated folder.
    pub folder: String,
    /// Embeddings file (empty: none).
    pub embeddings: String,
    /// Rejects file for folder sources (empty: none).
    pub rejects_file: String,
    /// τ_img.
    pub tau_img: Threshold,
    /// τ_gen.
    pub tau_gen: Threshold,
    /// τ_uniq.
    pub tau_uniq: Threshold,
    /// Leakage check against `reference`.
    pub leak: Threshold,
    /// Reference embeddings of the leakage check.
    pub reference: String,
    /// Output format.
    pub format: ExportFormat,
    /// JPEG instead of PNG.
    pub jpeg: bool,
    /// JPEG quality.
    pub jpeg_quality: u8,
    /// Destination folder.
    pub out: String,
    /// The latest preview (counts or error).
    pub preview: Option<Result<CurationCounts, String>>,
    /// Id of the preview being computed.
    pub preview_running: Option<u64>,
    /// Running export id and its cancel flag.
    pub running: Option<(u64, Arc<AtomicBool>)>,
    /// Progress of the running export.
    pub progress: Option<ExportProgress>,
    /// How the last export ended (`Ok(None)`: cancelled).
    pub last: Option<Result<Option<ExportSummary>, String>>,
    preview_key: Option<String>,
    cache: PreparedCache,
    next_id: u64,
}

impl Default for ExportTabState {
    fn default() -> Self {
        Self {
            use_folder: false,
            folder: String::new(),
            embeddings: String::new(),
            rejects_file: String::new(),
            tau_img: Threshold {
                on: false,
                value: 0.3,
            },
            tau_gen: Threshold {
                on: false,
                value: 0.5,
            },
            tau_uniq: Threshold {
                on: false,
                value: 0.35,
            },
            leak: Threshold {
                on: false,
                value: 0.5,
            },
            reference: String::new(),
            format: ExportFormat::ImageFolder,
            jpeg: false,
            jpeg_quality: 95,
            out: "idiff_dataset".into(),
            preview: None,
            preview_running: None,
            running: None,
            progress: None,
            last: None,
            preview_key: None,
            cache: PreparedCache::default(),
            next_id: 1,
        }
    }
}

fn path(s: &str) -> Option<PathBuf> {
    let t = s.trim();
    (!t.is_empty()).then(|| PathBuf::from(t))
}

impl ExportTabState {
    /// Applies an Export-tab event (others are ignored).
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::CurationPreview { id, result } if self.preview_running == Some(id) => {
                self.preview_running = None;
                self.preview = Some(result);
            }
            Event::DatasetExportProgress { id, progress } if self.is_running(id) => {
                self.progress = Some(progress);
            }
            Event::DatasetExportFinished { id, result } if self.is_running(id) => {
                self.running = None;
                self.progress = None;
                self.last = Some(result);
            }
            _ => {}
        }
    }

    fn is_running(&self, id: u64) -> bool {
        self.running.as_ref().is_some_and(|(r, _)| *r == id)
    }

    /// Puts a path chosen in a file dialog into its field.
    pub fn fill_path(&mut self, target: PickTarget, path: PathBuf) {
        let text = path.display().to_string();
        match target {
            PickTarget::DatasetSource => self.folder = text,
            PickTarget::DatasetEmbeddings => self.embeddings = text,
            PickTarget::DatasetRejects => self.rejects_file = text,
            PickTarget::DatasetReference => self.reference = text,
            PickTarget::DatasetOut => self.out = text,
            _ => {}
        }
    }

    /// The rules the fields describe (manual rejects are added by the source).
    pub fn rules(&self) -> CurationRules {
        CurationRules {
            tau_img: self.tau_img.get(),
            tau_gen: self.tau_gen.get(),
            tau_uniq: self.tau_uniq.get(),
            leakage: match (self.leak.on, path(&self.reference)) {
                (true, Some(p)) => Some(LeakageRule::Reference {
                    path: p,
                    threshold: self.leak.value,
                }),
                _ => None,
            },
            rejects: Default::default(),
        }
    }

    fn encoding(&self) -> ImageEncoding {
        if self.jpeg {
            ImageEncoding::Jpeg {
                quality: self.jpeg_quality.clamp(1, 100),
            }
        } else {
            ImageEncoding::Png
        }
    }
}

/// Everything that changes the preview, as text.
fn preview_key(state: &AppState) -> String {
    let e = &state.export_tab;
    let grid = match (&state.grid, e.use_folder) {
        (Some(g), false) => format!("{} {} {:?}", g.job, g.final_images(), g.rejects),
        _ => String::new(),
    };
    format!(
        "{} {:?} {:?} {:?} {:?} {:?} {grid}",
        e.use_folder,
        e.folder.trim(),
        e.embeddings.trim(),
        e.rejects_file.trim(),
        e.rules(),
        state.model.unet.trim(),
    )
}

/// The curation request of the current fields, or why there is none.
fn request(state: &AppState, id: u64) -> Result<CurationRequest, String> {
    let e = &state.export_tab;
    let mut rules = e.rules();
    let source = if e.use_folder {
        DatasetSource::Folder(path(&e.folder).ok_or("choose the generated folder to export")?)
    } else {
        let grid = state
            .grid
            .as_ref()
            .ok_or("no grid yet: generate images first, or export a folder")?;
        let mut items = Vec::new();
        for r in 0..grid.rows() {
            for c in 0..grid.cols() {
                if let Some(cell) = grid.cell(r, c).filter(|c| !c.preview) {
                    let id = ImageId {
                        identity: r,
                        sample: c,
                    };
                    items.push((id, cell.image.clone()));
                }
            }
        }
        if items.is_empty() {
            return Err("the grid has no finished images yet".into());
        }
        rules.rejects.images = grid.rejects.images.clone();
        rules.rejects.identities = grid.rejects.identities.clone();
        let manifest = serde_json::json!({
            "tool": format!("idiff-studio {}", env!("CARGO_PKG_VERSION")),
            "seed_contract": crate::diffusion::rng::SEED_CONTRACT_VERSION,
            "generation": {
                "source": "studio grid (identity = grid row)",
                "unet_config_source": state.model_info().map(|m| m.config_source.clone()),
                "identities": grid.spec.rows,
                "columns": grid.spec.columns,
                "sweep": grid.spec.sweep,
                "settings": grid.spec.settings,
            },
        });
        let weights = [
            ("unet", &state.model.unet),
            ("decoder", &state.model.decoder),
        ]
        .into_iter()
        .filter_map(|(k, p)| path(p).map(|p| (k.to_string(), p)))
        .collect();
        DatasetSource::Grid {
            items,
            manifest,
            weights,
        }
    };
    Ok(CurationRequest {
        id,
        source,
        embeddings: path(&e.embeddings),
        rejects_file: if e.use_folder {
            path(&e.rejects_file)
        } else {
            None
        },
        rules,
        cache: e.cache.clone(),
    })
}

/// Starts a preview when the inputs changed and none is running.
pub fn refresh_preview(state: &mut AppState, worker: &Worker) {
    if state.export_tab.preview_running.is_some() {
        return;
    }
    let key = preview_key(state);
    if state.export_tab.preview_key.as_ref() == Some(&key) {
        return;
    }
    let id = state.export_tab.next_id;
    state.export_tab.next_id += 1;
    state.export_tab.preview_key = Some(key);
    match request(state, id) {
        Ok(req) => {
            state.export_tab.preview_running = Some(id);
            spawn_preview(req, worker.event_sender());
        }
        Err(msg) => state.export_tab.preview = Some(Err(msg)),
    }
}

/// Starts the export of the current fields.
pub fn start_export(state: &mut AppState, worker: &Worker) {
    if state.export_tab.running.is_some() {
        return;
    }
    let id = state.export_tab.next_id;
    state.export_tab.next_id += 1;
    let e = &state.export_tab;
    let Some(out) = path(&e.out) else {
        state.export_tab.last = Some(Err("choose a destination folder".into()));
        return;
    };
    let req = match request(state, id) {
        Ok(req) => req,
        Err(msg) => {
            state.export_tab.last = Some(Err(msg));
            return;
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let e = &mut state.export_tab;
    let job = DatasetExportRequest {
        curation: req,
        format: e.format,
        encoding: e.encoding(),
        out,
        cancel: cancel.clone(),
    };
    e.running = Some((id, cancel));
    e.progress = None;
    e.last = None;
    spawn_export(job, worker.event_sender());
}

/// Draws the tab.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    refresh_preview(state, cx.worker);
    egui::ScrollArea::vertical()
        .id_salt("export_scroll")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            ui.set_max_width(760.0);
            ui.heading("Curate and export a dataset");
            ui.add_space(4.0);
            source_section(ui, state, cx);
            ui.separator();
            rules_section(ui, state, cx);
            ui.separator();
            output_section(ui, state, cx);
            ui.separator();
            run_section(ui, state, cx);
        });
    if state.export_tab.running.is_some() || state.export_tab.preview_running.is_some() {
        ui.ctx()
            .request_repaint_after(std::time::Duration::from_millis(100));
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

fn source_section(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let e = &mut state.export_tab;
    ui.horizontal(|ui| {
        ui.label(RichText::new("Source").strong());
        ui.radio_value(&mut e.use_folder, false, "Current grid");
        ui.radio_value(&mut e.use_folder, true, "Generated folder");
    });
    if e.use_folder {
        pick_field(
            ui,
            cx,
            "Generated folder",
            &mut e.folder,
            "out/run (generate --out)",
            PickTarget::DatasetSource,
        );
        pick_field(
            ui,
            cx,
            "Rejects file (optional)",
            &mut e.rejects_file,
            "rejects.json or a session",
            PickTarget::DatasetRejects,
        );
    } else {
        let text = match &state.grid {
            Some(g) => format!(
                "{} identities × {} columns; {} finished images, {} rejected (Generate tab)",
                g.rows(),
                g.cols(),
                g.final_images(),
                g.rejects.count(g.rows(), g.cols())
            ),
            None => "No grid yet: run a generation first.".into(),
        };
        widgets::caption(ui, &text);
    }
    let e = &mut state.export_tab;
    pick_field(
        ui,
        cx,
        "Embeddings (for τ and leakage rules)",
        &mut e.embeddings,
        "analyze output: embeddings.safetensors",
        PickTarget::DatasetEmbeddings,
    );
}

fn rules_section(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let counts = match &state.export_tab.preview {
        Some(Ok(c)) => Some(*c),
        _ => None,
    };
    let updating = state.export_tab.preview_running.is_some();
    ui.horizontal(|ui| {
        ui.label(RichText::new("Curation").strong());
        if updating {
            ui.spinner();
            ui.label(RichText::new("counting…").color(style::MUTED));
        }
    });
    let dropped = |c: Option<RuleCount>| match c {
        Some(c) => format!("−{} images, −{} identities", c.images, c.identities),
        None => "–".into(),
    };
    let e = &mut state.export_tab;
    egui::Grid::new("curation_rules")
        .num_columns(3)
        .spacing([16.0, 6.0])
        .show(ui, |ui| {
            ui.label("Manual rejects");
            ui.label(if e.use_folder {
                "rejects file"
            } else {
                "grid rejects"
            });
            ui.label(dropped(counts.map(|c| c.manual)));
            ui.end_row();
            for (name, t, c) in [
                (
                    "τ_img: image–centroid ≥",
                    &mut e.tau_img,
                    counts.map(|c| c.tau_img),
                ),
                (
                    "τ_gen: mean genuine ≥",
                    &mut e.tau_gen,
                    counts.map(|c| c.tau_gen),
                ),
            ] {
                let text = if t.on { dropped(c) } else { "off".into() };
                threshold_row(ui, name, t, text);
            }
            let l = ui.checkbox(&mut e.leak.on, "Leakage: reference sim >");
            ui.horizontal(|ui| {
                ui.add_enabled(
                    e.leak.on,
                    egui::Slider::new(&mut e.leak.value, -1.0..=1.0).fixed_decimals(2),
                )
                .labelled_by(l.id);
            });
            ui.label(if e.leak.on {
                dropped(counts.map(|c| c.leakage))
            } else {
                "off".into()
            });
            ui.end_row();
            let text = if e.tau_uniq.on {
                dropped(counts.map(|c| c.tau_uniq))
            } else {
                "off".into()
            };
            threshold_row(ui, "τ_uniq: centroid sim ≤", &mut e.tau_uniq, text);
        });
    if state.export_tab.leak.on {
        let e = &mut state.export_tab;
        pick_field(
            ui,
            cx,
            "Reference embeddings (leakage)",
            &mut e.reference,
            ".npy / safetensors / context pickle",
            PickTarget::DatasetReference,
        );
    }
    match &state.export_tab.preview {
        Some(Ok(c)) => {
            ui.label(
                RichText::new(format!(
                    "{} of {} images and {} of {} identities kept",
                    c.kept_images, c.input_images, c.kept_identities, c.input_identities
                ))
                .strong(),
            );
        }
        Some(Err(msg)) => {
            ui.colored_label(style::WARN, msg);
        }
        None => {}
    }
    widgets::caption(
        ui,
        "Rules apply in this order: rejects, τ_img, τ_gen, leakage, τ_uniq (greedy, lower \
         identity index kept). Identities are renumbered 0..K in the export.",
    );
}

fn threshold_row(ui: &mut Ui, name: &str, t: &mut Threshold, counts: String) {
    let l = ui.checkbox(&mut t.on, name);
    ui.add_enabled(
        t.on,
        egui::Slider::new(&mut t.value, -1.0..=1.0).fixed_decimals(2),
    )
    .labelled_by(l.id);
    ui.label(counts);
    ui.end_row();
}

fn output_section(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let e = &mut state.export_tab;
    ui.horizontal(|ui| {
        ui.label(RichText::new("Format").strong());
        ui.radio_value(&mut e.format, ExportFormat::ImageFolder, "ImageFolder");
        ui.radio_value(&mut e.format, ExportFormat::RecordIo, "RecordIO (112×112)");
    });
    ui.horizontal(|ui| {
        ui.label("Encoding");
        ui.radio_value(&mut e.jpeg, false, "PNG");
        ui.radio_value(&mut e.jpeg, true, "JPEG");
        let l = ui.label("quality");
        ui.add_enabled(e.jpeg, egui::Slider::new(&mut e.jpeg_quality, 1..=100))
            .labelled_by(l.id);
    });
    if e.format == ExportFormat::RecordIo {
        widgets::caption(ui, &format!("RecordIO resize: {RESIZE_METHOD}"));
    }
    pick_field(
        ui,
        cx,
        "Destination folder (must not exist)",
        &mut e.out,
        "datasets/idiff",
        PickTarget::DatasetOut,
    );
}

fn run_section(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let running = state.export_tab.running.is_some();
    ui.horizontal(|ui| {
        if running {
            if ui.button("Cancel export").clicked() {
                if let Some((_, c)) = &state.export_tab.running {
                    c.store(true, Ordering::SeqCst);
                }
            }
        } else if ui
            .button(RichText::new("Export dataset").strong())
            .clicked()
        {
            start_export(state, cx.worker);
        }
    });
    let e = &state.export_tab;
    if let Some(p) = e.progress.filter(|_| running) {
        let fraction = if p.total == 0 {
            0.0
        } else {
            p.done as f32 / p.total as f32
        };
        let eta = p.eta_s.map_or("–".into(), format_duration);
        ui.add(egui::ProgressBar::new(fraction).text(format!(
            "{}/{} images · {:.0} images/s · ETA {eta}",
            p.done, p.total, p.images_per_s
        )));
    } else if running {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label("preparing…");
        });
    }
    match &e.last {
        Some(Ok(Some(s))) => {
            ui.colored_label(
                style::OK,
                format!(
                    "Exported {} images of {} identities to {} ({:.0} images/s).",
                    s.images,
                    s.identities,
                    s.out.display(),
                    s.images_per_s
                ),
            );
        }
        Some(Ok(None)) => {
            ui.colored_label(style::WARN, "Export cancelled; nothing was written.");
        }
        Some(Err(msg)) => {
            ui.colored_label(style::DANGER, format!("Export failed: {msg}"));
        }
        None => {}
    }
}
