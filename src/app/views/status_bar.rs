//! The status bar: what the worker does, the model, curation counts, frame time.

use super::ViewCtx;
use crate::app::state::{format_count, format_duration, AppState, Busy, Outcome};
use crate::app::style;
use egui::{Color32, RichText, Ui};

/// Draws the status bar.
pub fn show(ui: &mut Ui, state: &AppState, cx: &ViewCtx) {
    ui.horizontal(|ui| {
        let (color, text) = status_text(state, cx.show_timings);
        let (rect, _) = ui.allocate_exact_size(egui::vec2(10.0, 10.0), egui::Sense::hover());
        ui.painter().circle_filled(rect.center(), 4.5, color);
        ui.label(RichText::new(text).color(color));
        if let Some(n) = &state.notice {
            if state.error.is_none() && state.is_idle() && cx.show_timings {
                ui.separator();
                ui.label(RichText::new(n).color(style::MUTED));
            }
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if let Some(p99) = cx.frame_p99_ms {
                ui.label(
                    RichText::new(format!("UI p99 {p99:.1} ms"))
                        .small()
                        .color(style::MUTED),
                )
                .on_hover_text(
                    "99th percentile of the UI thread's frame time over the last frames",
                );
                ui.separator();
            }
            match state.model_info() {
                Some(m) => ui.label(
                    RichText::new(format!(
                        "{} · {} params · {} · {}",
                        m.unet_file,
                        format_count(m.parameters()),
                        m.device,
                        m.dtype
                    ))
                    .small(),
                ),
                None => ui.label(RichText::new("no model").small().color(style::WARN)),
            };
            if let Some(t) = super::train_tab::badge(&state.train_tab) {
                ui.separator();
                ui.label(RichText::new(t).small().color(style::ACCENT));
            }
            if let Some(g) = &state.grid {
                ui.separator();
                ui.label(
                    RichText::new(format!("{} rejected", g.rejects.count(g.rows(), g.cols())))
                        .small()
                        .color(style::MUTED),
                );
                if let Some((r, c)) = state.selection {
                    ui.separator();
                    ui.label(
                        RichText::new(format!("selected {r}/{c}"))
                            .small()
                            .color(style::MUTED),
                    );
                }
            }
        });
    });
}

/// The colour and text of the worker state.
pub fn status_text(state: &AppState, timings: bool) -> (Color32, String) {
    match &state.busy {
        Busy::Loading => (style::WARN, "Loading model…".into()),
        Busy::Running {
            cancelling: true, ..
        } => (style::WARN, "Cancelling…".into()),
        Busy::Running { .. } => match &state.progress {
            Some(p) => {
                let preview = state
                    .preview_step
                    .map(|(s, n)| format!(" · preview at step {s}/{n}"))
                    .unwrap_or_default();
                (
                    style::ACCENT,
                    format!(
                        "Sampling {}/{} images · {:.0}% · {:.2} img/s · ETA {}{preview}",
                        p.images_done,
                        p.images_total,
                        p.fraction() * 100.0,
                        p.images_per_second,
                        format_duration(p.eta_seconds)
                    ),
                )
            }
            None => (style::ACCENT, "Starting…".into()),
        },
        Busy::Idle => match &state.outcome {
            Some(Outcome::Finished { images, seconds }) => (
                style::OK,
                if timings {
                    format!("Done: {images} images in {}", format_duration(*seconds))
                } else {
                    format!("Done: {images} images")
                },
            ),
            Some(Outcome::Cancelled { images }) => {
                (style::WARN, format!("Cancelled after {images} images"))
            }
            Some(Outcome::Failed(_)) => (style::DANGER, "Failed (see the message above)".into()),
            None if state.error.is_some() => {
                (style::DANGER, "Error (see the message above)".into())
            }
            None if state.model_info().is_some() => (style::OK, "Ready".into()),
            None => (style::MUTED, "Idle: load a model to start".into()),
        },
    }
}
