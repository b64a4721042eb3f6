//! The Generate tab: Run/Cancel toolbar, messages, and the grid, zoom view or welcome card.

use super::{grid_view, zoom_view, ViewCtx};
use crate::app::forms::RunMode;
use crate::app::messages::PickTarget;
use crate::app::state::{format_duration, AppState, Busy};
use crate::app::style;
use egui::{Color32, RichText, Ui};

/// Draws the Generate tab.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    toolbar(ui, state, cx);
    ui.add_space(4.0);
    messages(ui, state);
    if state.grid.is_none() {
        welcome(ui, state);
    } else if state.zoom.is_some() {
        zoom_view::show(ui, state, cx);
    } else {
        grid_view::show(ui, state, cx);
    }
}

/// Width of the export and size controls on the right of the toolbar.
const RIGHT_CONTROLS_W: f32 = 620.0;

fn toolbar(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    ui.horizontal(|ui| {
        match &state.busy {
            Busy::Running { cancelling, .. } => {
                let text = if *cancelling {
                    "Cancelling…"
                } else {
                    "Cancel"
                };
                let b = egui::Button::new(RichText::new(text).strong().color(Color32::WHITE))
                    .fill(style::DANGER.gamma_multiply(0.8))
                    .min_size(egui::vec2(110.0, 28.0));
                if ui
                    .add_enabled(!cancelling, b)
                    .on_hover_text("Stop after the current step (Space)")
                    .clicked()
                {
                    state.cancel();
                }
            }
            _ => {
                let what = match state.sampling.mode {
                    RunMode::Grid => "Run",
                    RunMode::Sweep => "Run sweep",
                };
                let b = egui::Button::new(RichText::new(what).strong().color(Color32::WHITE))
                    .fill(style::ACCENT.gamma_multiply(0.85))
                    .min_size(egui::vec2(110.0, 28.0));
                let blocker = state.run_blocker();
                let r = ui
                    .add_enabled(blocker.is_none(), b)
                    .on_hover_text("Generate with the current settings (Space)");
                let r = match blocker {
                    Some(why) => r.on_disabled_hover_text(format!("Cannot run: {why}")),
                    None => r,
                };
                if r.clicked() {
                    state.run(cx.worker);
                }
            }
        }
        // Leave room for the right-hand controls so nothing overlaps.
        let left_w = (ui.available_width() - RIGHT_CONTROLS_W).max(80.0);
        if let Some(p) = &state.progress {
            let text = format!(
                "{}/{} images · step {}/{} · ETA {}",
                p.images_done,
                p.images_total,
                p.batch_step,
                p.batch_steps,
                format_duration(p.eta_seconds)
            );
            ui.add(
                egui::ProgressBar::new(p.fraction())
                    .desired_width(left_w.min(480.0))
                    .text(text),
            );
        } else if let Some(g) = &state.grid {
            let summary = format!(
                "{} images · {} rejected",
                g.final_images(),
                g.rejects.count(g.rows(), g.cols())
            );
            ui.add_sized(
                [left_w.min(360.0), 20.0],
                egui::Label::new(RichText::new(summary).color(style::MUTED)).truncate(),
            );
        }
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            let can_export =
                state.grid.as_ref().is_some_and(|g| g.final_images() > 0) && !state.exporting;
            let export = ui.add_enabled(can_export, egui::Button::new("Export PNG"));
            if export.clicked() {
                state.export_png(cx.worker);
            }
            if ui
                .add_enabled(cx.dialogs_ok, egui::Button::new("…"))
                .on_hover_text("Choose where to save the PNG")
                .clicked()
            {
                cx.pick(
                    PickTarget::ExportPng,
                    Some(state.export_path.clone().into()),
                );
            }
            ui.add(
                egui::TextEdit::singleline(&mut state.export_path)
                    .desired_width(150.0)
                    .id_salt("export_path"),
            )
            .labelled_by(export.id);
            ui.checkbox(&mut state.export_skip_rejected, "skip rejected")
                .on_hover_text("Leave rejected images out of the PNG");
            ui.separator();
            ui.add(egui::Slider::new(&mut cx.thumb_size, 48.0..=192.0).show_value(false))
                .on_hover_text("Thumbnail size");
            ui.label(RichText::new("size").small().color(style::MUTED));
        });
    });
}

fn messages(ui: &mut Ui, state: &mut AppState) {
    let mut dismiss_error = false;
    if let Some(e) = &state.error {
        egui::Frame::new()
            .fill(style::DANGER.gamma_multiply(0.18))
            .stroke(egui::Stroke::new(1.0, style::DANGER))
            .corner_radius(4)
            .inner_margin(egui::Margin::symmetric(8, 6))
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    ui.label(RichText::new("Error").strong().color(style::DANGER));
                    ui.add(egui::Label::new(e.as_str()).wrap());
                    ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                        if ui.small_button("Dismiss").clicked() {
                            dismiss_error = true;
                        }
                    });
                });
            });
        ui.add_space(4.0);
    }
    if dismiss_error {
        state.error = None;
    }
}

fn welcome(ui: &mut Ui, state: &AppState) {
    ui.add_space(40.0);
    ui.vertical_centered(|ui| {
        ui.set_max_width(560.0);
        egui::Frame::group(ui.style())
            .inner_margin(egui::Margin::same(18))
            .show(ui, |ui| {
                ui.heading("IDiff Studio");
                ui.add_space(6.0);
                if state.model_info().is_none() {
                    ui.label("No model is loaded yet. In the Model panel on the left, choose:");
                    ui.add_space(4.0);
                    ui.label("• the U-Net checkpoint of IDiff-Face (ema_averaged_model.ckpt),");
                    ui.label("• the VQ-f4 first-stage decoder (first_stage_decoder_state_dict.pt),");
                    ui.label("• optionally their configs (else the released architecture is assumed),");
                    ui.add_space(4.0);
                    ui.label("then press Load model. Loading runs on the worker thread.");
                } else {
                    ui.label(format!(
                        "Model ready. {} identities are in the list: press Run (Space) to sample them.",
                        state.identities.len()
                    ));
                }
                ui.add_space(8.0);
                ui.label(
                    RichText::new("Keys: Space run/cancel · R new seed · arrows move · Delete reject · Enter zoom · Esc back")
                        .small()
                        .color(style::MUTED),
                );
            });
    });
}
