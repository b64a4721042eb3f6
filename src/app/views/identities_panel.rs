//! The Identities panel: random identities, a context file or an interpolation; the list.

use super::widgets::{caption, path_field};
use super::ViewCtx;
use crate::app::forms::IdentitySourceKind;
use crate::app::state::AppState;
use crate::app::style;
use crate::worker::PickTarget;
use egui::{RichText, Ui};

/// Draws the Identities panel.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let f = &mut state.identity_form;
    ui.horizontal(|ui| {
        ui.selectable_value(&mut f.kind, IdentitySourceKind::Random, "Random");
        ui.selectable_value(&mut f.kind, IdentitySourceKind::File, "File");
        ui.selectable_value(&mut f.kind, IdentitySourceKind::Interpolate, "Interpolate");
    });
    ui.add_space(2.0);
    match f.kind {
        IdentitySourceKind::Random => {
            egui::Grid::new("random_ids")
                .num_columns(2)
                .spacing([8.0, 4.0])
                .show(ui, |ui| {
                    let label = ui.label("Count");
                    ui.add(
                        egui::DragValue::new(&mut f.count)
                            .range(1..=10_000)
                            .speed(1.0),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("Seed");
                    ui.horizontal(|ui| {
                        ui.add(egui::DragValue::new(&mut f.seed).speed(1.0))
                            .labelled_by(label.id);
                        if ui
                            .small_button("new")
                            .on_hover_text("Draw a new identity seed")
                            .clicked()
                        {
                            f.seed = u64::from(rand::random::<u32>());
                        }
                    });
                    ui.end_row();
                    let label = ui.label("First index");
                    ui.add(
                        egui::DragValue::new(&mut f.first)
                            .range(0..=10_000_000)
                            .speed(1.0),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                });
            caption(ui, "uniform on the unit sphere, reproducible per index");
        }
        IdentitySourceKind::File => {
            if let Some(t) = path_field(
                ui,
                "Context file (.npy, torch pickle, safetensors)",
                &mut f.file,
                "contexts.npy",
                PickTarget::Contexts,
                cx.dialogs_ok,
            ) {
                let start = (!f.file.is_empty()).then(|| f.file.clone().into());
                cx.pick(t, start);
            }
        }
        IdentitySourceKind::Interpolate => {
            let n = state.identities.len().saturating_sub(1);
            egui::Grid::new("interp")
                .num_columns(2)
                .spacing([8.0, 4.0])
                .show(ui, |ui| {
                    let label = ui.label("From row");
                    ui.add(egui::DragValue::new(&mut f.from).range(0..=n))
                        .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("To row");
                    ui.add(egui::DragValue::new(&mut f.to).range(0..=n))
                        .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("Steps");
                    ui.add(egui::DragValue::new(&mut f.steps).range(2..=64))
                        .labelled_by(label.id);
                    ui.end_row();
                });
            ui.checkbox(&mut f.shared_noise, "Same noise along the path");
            caption(ui, "slerp between two rows of the current list");
        }
    }
    ui.add_space(2.0);
    ui.horizontal(|ui| {
        let busy = state.contexts_loading;
        if ui.add_enabled(!busy, egui::Button::new("Apply")).clicked() {
            state.apply_identity_form(cx.worker);
        }
        if busy {
            ui.spinner();
        }
        ui.label(
            RichText::new(format!("{} identities", state.identities.len())).color(style::MUTED),
        );
    });
    list(ui, state);
}

fn list(ui: &mut Ui, state: &AppState) {
    let row_h = ui.text_style_height(&egui::TextStyle::Body);
    egui::Frame::group(ui.style())
        .inner_margin(4.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("identity_list")
                .max_height(130.0)
                .auto_shrink([false, true])
                .show_rows(ui, row_h, state.identities.len(), |ui, range| {
                    for i in range {
                        let id = &state.identities[i];
                        ui.horizontal(|ui| {
                            ui.label(
                                RichText::new(format!("{i:>3}"))
                                    .monospace()
                                    .color(style::MUTED),
                            );
                            ui.label(&id.name);
                            ui.label(RichText::new(&id.origin).small().color(style::MUTED));
                        });
                    }
                });
        });
}
