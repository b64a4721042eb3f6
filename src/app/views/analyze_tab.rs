//! The Analyze tab: embeds the current grid (or an ImageFolder) with the FR model on the
//! worker and shows the report: metrics, genuine/impostor densities, ROC and DET (log
//! axes), the identity-centroid similarity heatmap and a sortable per-identity table.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use egui::{Color32, RichText, Ui};
use egui_plot::{Heatmap, Legend, Line, Plot, PlotPoints, VLine};

use super::ViewCtx;
use crate::analysis::metrics::roc_curve;
use crate::analysis::output::{write_plots, write_report_dir};
use crate::analysis::plots::densities;
use crate::analysis::report::{HistogramBackend, IdentityStats, ReportOptions};
use crate::app::state::{AppState, Tab};
use crate::worker::analyze::{AnalysisResult, AnalyzeIdentity, AnalyzeRequest, AnalyzeSource};
use crate::worker::{Command, Event, Worker};

/// Largest number of identities shown in the centroid heatmap.
const HEATMAP_MAX: usize = 48;
/// Points per ROC / DET line drawn.
const CURVE_POINTS: usize = 1500;

/// Columns of the per-identity table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// Identity name.
    Identity,
    /// Sample count.
    Samples,
    /// Mean similarity to the centroid.
    CentroidMean,
    /// Std of the similarity to the centroid.
    CentroidStd,
    /// Similarity of the nearest other centroid.
    Nearest,
    /// Outlier count.
    Outliers,
    /// Best reference similarity.
    Leak,
    /// Mean similarity to the identity's context.
    Context,
}

impl Column {
    const ALL: [Column; 8] = [
        Column::Identity,
        Column::Samples,
        Column::CentroidMean,
        Column::CentroidStd,
        Column::Context,
        Column::Nearest,
        Column::Outliers,
        Column::Leak,
    ];

    fn title(self) -> &'static str {
        match self {
            Column::Identity => "Identity",
            Column::Samples => "Samples",
            Column::CentroidMean => "Centroid sim",
            Column::CentroidStd => "Std",
            Column::Nearest => "Nearest (sim)",
            Column::Outliers => "Outliers",
            Column::Leak => "Leak sim",
            Column::Context => "Context sim",
        }
    }

    fn key(self, s: &IdentityStats) -> f64 {
        match self {
            Column::Identity => f64::from(s.label),
            Column::Samples => s.samples as f64,
            Column::CentroidMean => s.centroid_mean,
            Column::CentroidStd => s.centroid_std,
            Column::Nearest => s.nearest_similarity.unwrap_or(f64::NEG_INFINITY),
            Column::Outliers => s.outliers.len() as f64,
            Column::Leak => s.leak_similarity.unwrap_or(f64::NEG_INFINITY),
            Column::Context => s.context_mean.unwrap_or(f64::NEG_INFINITY),
        }
    }
}

/// The Analyze tab's settings, progress and result.
#[derive(Debug, Clone)]
pub struct AnalyzeState {
    /// Analyse an ImageFolder instead of the current grid.
    pub use_folder: bool,
    /// ImageFolder path.
    pub folder: String,
    /// Flip-sum embeddings.
    pub flip: bool,
    /// Detect and align faces (model cache's detector and landmarks) before embedding.
    pub align: bool,
    /// Histogram on the GPU (wgpu).
    pub gpu: bool,
    /// Most impostor scores kept.
    pub impostor_samples: usize,
    /// Reference embeddings for the leakage check (empty: none).
    pub reference: String,
    /// Leakage threshold.
    pub leak_threshold: f64,
    /// Report export folder.
    pub export_dir: String,
    /// Running request id and its cancel flag.
    pub running: Option<(u64, Arc<AtomicBool>)>,
    /// Embedding progress `(done, total)`.
    pub progress: Option<(usize, usize)>,
    /// The last result.
    pub result: Option<Arc<AnalysisResult>>,
    /// The last error.
    pub error: Option<String>,
    /// Table sort column and direction (true = descending).
    pub sort: (Column, bool),
    next_id: u64,
}

impl Default for AnalyzeState {
    fn default() -> Self {
        Self {
            use_folder: false,
            folder: String::new(),
            flip: true,
            align: false,
            gpu: false,
            impostor_samples: ReportOptions::default().impostor_samples,
            reference: String::new(),
            leak_threshold: ReportOptions::default().leak_threshold,
            export_dir: "idiff_report".into(),
            running: None,
            progress: None,
            result: None,
            error: None,
            sort: (Column::Identity, false),
            next_id: 1,
        }
    }
}

impl AnalyzeState {
    /// Applies an analysis event (others are ignored).
    pub fn apply(&mut self, event: Event) {
        let current = self.running.as_ref().map(|(id, _)| *id);
        match event {
            Event::AnalysisProgress { id, done, total } if Some(id) == current => {
                self.progress = Some((done, total));
            }
            Event::AnalysisFinished { id, result } if Some(id) == current => {
                self.running = None;
                self.progress = None;
                match result {
                    Ok(r) => {
                        self.result = Some(r);
                        self.error = None;
                    }
                    Err(e) => self.error = Some(e),
                }
            }
            _ => {}
        }
    }

    /// Per-identity rows in the current sort order.
    pub fn sorted_rows(&self) -> Vec<usize> {
        let Some(r) = &self.result else {
            return Vec::new();
        };
        let stats = &r.report.per_identity;
        let mut idx: Vec<usize> = (0..stats.len()).collect();
        let (col, desc) = self.sort;
        idx.sort_by(|&a, &b| {
            let o = col.key(&stats[a]).total_cmp(&col.key(&stats[b]));
            if desc {
                o.reverse()
            } else {
                o
            }
        });
        idx
    }
}

/// Starts an analysis of the current grid (finished, non-rejected images) or folder.
pub fn start(state: &mut AppState, worker: &Worker) {
    if state.analyze.running.is_some() {
        return;
    }
    let a = &state.analyze;
    let source = if a.use_folder {
        AnalyzeSource::Folder(PathBuf::from(a.folder.trim()))
    } else {
        let Some(grid) = &state.grid else {
            state.analyze.error = Some("no grid yet: generate images first".into());
            return;
        };
        let groups = (0..grid.rows())
            .filter(|r| !grid.rejects.identities.contains(r))
            .map(|r| AnalyzeIdentity {
                row: r,
                name: grid
                    .spec
                    .rows
                    .get(r)
                    .map_or(r.to_string(), |l| l.name.clone()),
                images: (0..grid.cols())
                    .filter(|&c| !grid.rejects.is_rejected(r, c))
                    .filter_map(|c| grid.cell(r, c).filter(|i| !i.preview))
                    .map(|i| i.image.clone())
                    .collect(),
                context: grid.contexts.get(r).cloned(),
            })
            .filter(|g| !g.images.is_empty())
            .collect();
        AnalyzeSource::Images(groups)
    };
    let id = a.next_id;
    let cancel = Arc::new(AtomicBool::new(false));
    let path = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
    let req = AnalyzeRequest {
        id,
        source,
        fr_model: PathBuf::from(state.model.fr_model.trim()),
        fr_config: None,
        device: "cpu".into(),
        flip: a.flip,
        align: a.align.then(crate::onnx::models_dir),
        reference: path(&a.reference),
        options: ReportOptions {
            impostor_samples: a.impostor_samples.max(1),
            leak_threshold: a.leak_threshold,
            backend: if a.gpu {
                HistogramBackend::Gpu
            } else {
                HistogramBackend::Cpu
            },
            ..ReportOptions::default()
        },
        cancel: cancel.clone(),
    };
    let a = &mut state.analyze;
    a.next_id += 1;
    a.running = Some((id, cancel));
    a.progress = None;
    a.error = None;
    worker.send(Command::Analyze(req));
}

/// Draws the tab.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    controls(ui, state, cx);
    if let Some(e) = &state.analyze.error {
        ui.colored_label(crate::app::style::WARN, e);
    }
    ui.separator();
    let Some(result) = state.analyze.result.clone() else {
        ui.add_space(30.0);
        ui.vertical_centered(|ui| {
            ui.label(
                "Set the FR model in the Model panel, then press Run analysis to embed the grid \
                      and measure identity consistency and separability.",
            );
        });
        return;
    };
    egui::ScrollArea::vertical()
        .id_salt("analyze_scroll")
        .auto_shrink([false, false])
        .show(ui, |ui| report_view(ui, state, &result, cx));
}

fn controls(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let a = &mut state.analyze;
    ui.horizontal_wrapped(|ui| {
        ui.radio_value(&mut a.use_folder, false, "Current grid");
        let l = ui.radio_value(&mut a.use_folder, true, "Folder");
        if a.use_folder {
            ui.add(
                egui::TextEdit::singleline(&mut a.folder)
                    .hint_text("ImageFolder")
                    .desired_width(180.0),
            )
            .labelled_by(l.id);
        }
        ui.checkbox(&mut a.flip, "Flip-sum");
        ui.checkbox(&mut a.align, "Align faces").on_hover_text(
            "Detect each face and align it to the InsightFace 112×112 template before \
             embedding, with fr_detect.onnx and fr_landmark.onnx from the model cache \
             (scripts/fetch-models.sh)",
        );
        ui.checkbox(&mut a.gpu, "GPU histogram");
        let l = ui.label("Impostors");
        ui.add(
            egui::DragValue::new(&mut a.impostor_samples)
                .range(1..=100_000_000)
                .speed(1000),
        )
        .labelled_by(l.id);
        let l = ui.label("Reference");
        ui.add(
            egui::TextEdit::singleline(&mut a.reference)
                .hint_text(".npy / safetensors")
                .desired_width(140.0),
        )
        .labelled_by(l.id);
        let l = ui.label("Leak >");
        ui.add(
            egui::DragValue::new(&mut a.leak_threshold)
                .range(-1.0..=1.0)
                .speed(0.01),
        )
        .labelled_by(l.id);
    });
    ui.horizontal(|ui| {
        let running = state.analyze.running.is_some();
        if running {
            if ui.button("Cancel").clicked() {
                if let Some((_, c)) = &state.analyze.running {
                    c.store(true, Ordering::Relaxed);
                }
            }
            let text = match state.analyze.progress {
                Some((d, t)) => format!("embedding {d}/{t} images..."),
                None => "loading the FR model...".into(),
            };
            ui.spinner();
            ui.label(text);
        } else if ui.button(RichText::new("Run analysis").strong()).clicked() {
            start(state, cx.worker);
        }
        if state.model.fr_model.trim().is_empty() {
            ui.label(RichText::new("FR model not set").color(crate::app::style::MUTED));
        }
    });
}

fn report_view(ui: &mut Ui, state: &mut AppState, result: &Arc<AnalysisResult>, cx: &mut ViewCtx) {
    let r = &result.report;
    if let Some(n) = result.unaligned {
        let text = format!(
            "Aligned to the 112×112 template; {n} of {} images had no detected face and were \
             embedded whole",
            r.images
        );
        if n > 0 {
            ui.colored_label(crate::app::style::WARN, text);
        } else {
            ui.label(text);
        }
    }
    ui.horizontal(|ui| {
        metrics_table(ui, result);
        ui.add_space(20.0);
        ui.vertical(|ui| export_buttons(ui, state, result, cx));
    });
    ui.add_space(6.0);
    let w = (ui.available_width() / 3.0 - 8.0).max(160.0);
    ui.horizontal(|ui| {
        ui.vertical(|ui| {
            ui.set_width(w);
            histogram_plot(ui, result);
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            roc_plots(ui, result, false);
        });
        ui.vertical(|ui| {
            ui.set_width(w);
            roc_plots(ui, result, true);
        });
    });
    ui.add_space(6.0);
    ui.horizontal_top(|ui| {
        ui.vertical(|ui| {
            ui.set_width(w);
            heatmap(ui, result);
        });
        ui.vertical(|ui| identity_table(ui, state, result));
    });
    if r.per_identity.is_empty() {
        ui.label("no identities");
    }
}

fn metrics_table(ui: &mut Ui, result: &AnalysisResult) {
    let r = &result.report;
    egui::Grid::new("analyze_metrics")
        .striped(true)
        .show(ui, |ui| {
            let mut row = |k: &str, v: String| {
                ui.label(k);
                ui.label(RichText::new(v).monospace());
                ui.end_row();
            };
            row(
                "Images / identities",
                format!("{} / {}", r.images, r.identities),
            );
            row(
                "Genuine / impostor pairs",
                format!(
                    "{} / {}{}",
                    r.genuine_pairs,
                    r.impostor_scored,
                    if r.impostor_sampled { " (sampled)" } else { "" }
                ),
            );
            if let Some(m) = &r.metrics {
                row(
                    "EER",
                    format!("{:.3} % @ {:.4}", m.eer * 100.0, m.eer_threshold),
                );
                row(
                    "FNMR @ FMR 1% / 0.1%",
                    format!("{:.4} / {:.4}", m.fmr100, m.fmr1000),
                );
                row("AUC", format!("{:.5}", m.auc));
                row(
                    "Genuine mean / std",
                    format!("{:.4} / {:.4}", m.gmean, m.gstd),
                );
                row(
                    "Impostor mean / std",
                    format!("{:.4} / {:.4}", m.imean, m.istd),
                );
                row("d' / FDR", format!("{:.3} / {:.3}", m.decidability, m.fdr));
            } else {
                row("Metrics", "need genuine and impostor pairs".into());
            }
            if let Some(c) = r.context_cosine {
                row("Context cosine", format!("{c:.4}"));
            }
            row("Outliers", r.outlier_count().to_string());
            if let Some(l) = &r.leakage {
                row(
                    "Leaked identities",
                    format!("{} (max {:.3})", l.flagged, l.max_similarity),
                );
            }
            row("Histogram", r.histogram_device.clone());
        });
}

fn export_buttons(
    ui: &mut Ui,
    state: &mut AppState,
    result: &Arc<AnalysisResult>,
    cx: &mut ViewCtx,
) {
    ui.horizontal(|ui| {
        let l = ui.label("Export to");
        ui.add(egui::TextEdit::singleline(&mut state.analyze.export_dir).desired_width(160.0))
            .labelled_by(l.id);
    });
    let dir = PathBuf::from(state.analyze.export_dir.trim());
    ui.horizontal(|ui| {
        let spawn = |plots_only: bool| {
            let (dir, result, sender) = (dir.clone(), result.clone(), cx.worker.event_sender());
            std::thread::spawn(move || {
                let r = if plots_only {
                    write_plots(&result.report, &dir).map(|_| dir.clone())
                } else {
                    write_report_dir(&result.report, &dir).map(|_| dir.clone())
                };
                sender.send(Event::Exported(r.map_err(|e| format!("{e:#}"))));
            });
        };
        if ui.button("Report (JSON, CSV, scores, PNG)").clicked() {
            spawn(false);
        }
        if ui.button("Plots (PNG)").clicked() {
            spawn(true);
        }
    });
}

fn plot_height(ui: &Ui) -> f32 {
    (ui.available_width() * 0.7).clamp(140.0, 260.0)
}

fn histogram_plot(ui: &mut Ui, result: &AnalysisResult) {
    let r = &result.report;
    ui.label(RichText::new("Score density").strong());
    let (g, i) = densities(&r.histogram);
    let edges = r.histogram.bin_edges();
    let steps = |d: &[f64]| -> Vec<[f64; 2]> {
        d.iter()
            .enumerate()
            .flat_map(|(k, &v)| [[edges[k], v], [edges[k + 1], v]])
            .collect()
    };
    Plot::new("analyze_hist")
        .height(plot_height(ui))
        .legend(Legend::default())
        .allow_scroll(false)
        .include_x(-1.0)
        .include_x(1.0)
        .include_y(0.0)
        .show(ui, |p| {
            p.line(
                Line::new("impostor", PlotPoints::from(steps(&i)))
                    .color(Color32::from_rgb(200, 50, 50))
                    .fill(0.0),
            );
            p.line(
                Line::new("genuine", PlotPoints::from(steps(&g)))
                    .color(Color32::from_rgb(30, 140, 70))
                    .fill(0.0),
            );
            if let Some(m) = &r.metrics {
                p.vline(VLine::new("EER threshold", m.eer_threshold).color(Color32::GRAY));
            }
        });
}

/// `log10` clamped to the plot floor.
fn lg(v: f64) -> f64 {
    v.max(1e-6).log10()
}

fn roc_plots(ui: &mut Ui, result: &AnalysisResult, det: bool) {
    let r = &result.report;
    ui.label(
        RichText::new(if det {
            "DET (log-log)"
        } else {
            "ROC (log FMR)"
        })
        .strong(),
    );
    let pts: Vec<[f64; 2]> = if r.genuine.is_empty() || r.impostor.is_empty() {
        Vec::new()
    } else {
        let roc = roc_curve(&r.genuine, &r.impostor);
        let stride = (roc.fmr.len() / CURVE_POINTS).max(1);
        (0..roc.fmr.len())
            .step_by(stride)
            .chain(std::iter::once(roc.fmr.len() - 1))
            .map(|k| {
                let y = if det {
                    lg(roc.fnmr[k])
                } else {
                    1.0 - roc.fnmr[k]
                };
                [lg(roc.fmr[k]), y]
            })
            .collect()
    };
    let decade = |m: egui_plot::GridMark, _: &std::ops::RangeInclusive<f64>| {
        if (m.value - m.value.round()).abs() < 1e-9 {
            format!("1e{}", m.value.round())
        } else {
            String::new()
        }
    };
    let mut plot = Plot::new(if det { "analyze_det" } else { "analyze_roc" })
        .height(plot_height(ui))
        .allow_scroll(false)
        .x_axis_label("FMR")
        .x_axis_formatter(decade)
        .include_x(0.0);
    plot = if det {
        plot.y_axis_label("FNMR")
            .y_axis_formatter(decade)
            .include_y(0.0)
    } else {
        plot.y_axis_label("TAR").include_y(0.0).include_y(1.0)
    };
    plot.show(ui, |p| {
        p.line(
            Line::new(if det { "DET" } else { "ROC" }, PlotPoints::from(pts))
                .color(Color32::from_rgb(40, 80, 190)),
        );
    });
}

fn heatmap(ui: &mut Ui, result: &AnalysisResult) {
    let r = &result.report;
    let k = r.identities.min(HEATMAP_MAX);
    ui.label(
        RichText::new(format!(
            "Centroid similarity ({k} of {} identities)",
            r.identities
        ))
        .strong(),
    );
    if k == 0 {
        return;
    }
    // Rows top to bottom as identities 0..k (the heatmap's first row is drawn on top).
    let values: Vec<f64> = (0..k)
        .flat_map(|a| (0..k).map(move |b| (a, b)))
        .map(|(a, b)| f64::from(r.centroid_similarity(a, b)))
        .collect();
    Plot::new("analyze_heatmap")
        .height(plot_height(ui))
        .data_aspect(1.0)
        .allow_scroll(false)
        .show_axes(false)
        .show(ui, |p| {
            p.add(Heatmap::new(values, k).range(-1.0, 1.0).show_labels(false));
        });
}

fn identity_table(ui: &mut Ui, state: &mut AppState, result: &AnalysisResult) {
    let r = &result.report;
    ui.label(RichText::new("Per identity (click a header to sort, a name to open it)").strong());
    let order = state.analyze.sorted_rows();
    let mut jump = None;
    egui::ScrollArea::vertical()
        .id_salt("analyze_table")
        .max_height(plot_height(ui) + 40.0)
        .show(ui, |ui| {
            egui::Grid::new("analyze_identities")
                .striped(true)
                .show(ui, |ui| {
                    let with_context = r.context_cosine.is_some();
                    for col in Column::ALL {
                        if col == Column::Context && !with_context {
                            continue;
                        }
                        let (cur, desc) = state.analyze.sort;
                        let arrow = if cur == col {
                            if desc {
                                " (desc)"
                            } else {
                                " (asc)"
                            }
                        } else {
                            ""
                        };
                        if ui.button(format!("{}{arrow}", col.title())).clicked() {
                            state.analyze.sort = (col, cur == col && !desc);
                        }
                    }
                    ui.end_row();
                    for &i in &order {
                        let s = &r.per_identity[i];
                        if ui.link(&s.name).clicked() {
                            jump = result.rows.get(i).copied().flatten();
                        }
                        ui.label(s.samples.to_string());
                        ui.label(format!("{:.4}", s.centroid_mean));
                        ui.label(format!("{:.4}", s.centroid_std));
                        if with_context {
                            ui.label(s.context_mean.map_or("-".into(), |v| format!("{v:.4}")));
                        }
                        ui.label(match (&s.nearest_name, s.nearest_similarity) {
                            (Some(n), Some(v)) => format!("{n} ({v:.3})"),
                            _ => "-".into(),
                        });
                        let outliers = s.outliers.len().to_string();
                        if s.outliers.is_empty() {
                            ui.label(outliers);
                        } else {
                            ui.colored_label(crate::app::style::WARN, outliers);
                        }
                        let leak = s.leak_similarity.map_or("-".into(), |v| format!("{v:.3}"));
                        if s.leaked {
                            ui.colored_label(crate::app::style::WARN, leak);
                        } else {
                            ui.label(leak);
                        }
                        ui.end_row();
                    }
                });
        });
    if let Some(row) = jump {
        state.tab = Tab::Generate;
        state.selection = Some((row, 0));
        state.zoom = Some(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::embed::Embeddings;
    use crate::analysis::report::analyze;

    #[test]
    fn sorting_and_events() {
        let emb = Embeddings {
            dim: 2,
            data: vec![1.0, 0.0, 0.8, 0.6, 0.0, 1.0, 0.6, 0.8, -1.0, 0.0],
            labels: vec![0, 0, 1, 1, 2],
            identities: vec!["a".into(), "b".into(), "c".into()],
            files: (0..5).map(|i| i.to_string()).collect(),
        };
        let report = analyze(&emb, None, &ReportOptions::default()).unwrap();
        let mut s = AnalyzeState::default();
        assert!(s.sorted_rows().is_empty());
        s.running = Some((4, Arc::new(AtomicBool::new(false))));
        s.apply(Event::AnalysisProgress {
            id: 3,
            done: 1,
            total: 2,
        });
        assert_eq!(s.progress, None);
        s.apply(Event::AnalysisProgress {
            id: 4,
            done: 1,
            total: 2,
        });
        assert_eq!(s.progress, Some((1, 2)));
        let result = Arc::new(AnalysisResult {
            report,
            rows: vec![Some(0), Some(1), Some(2)],
            seconds: 0.1,
            unaligned: None,
        });
        s.apply(Event::AnalysisFinished {
            id: 4,
            result: Ok(result),
        });
        assert!(s.running.is_none() && s.result.is_some());
        assert_eq!(s.sorted_rows(), vec![0, 1, 2]);
        s.sort = (Column::Samples, false);
        assert_eq!(s.sorted_rows(), vec![2, 0, 1]);
        s.sort = (Column::Identity, true);
        assert_eq!(s.sorted_rows(), vec![2, 1, 0]);
    }
}
