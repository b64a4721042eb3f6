//! The Sampling panel: sampler, guidance, context dropout, seed, batch, sweep, preview.

use super::widgets::caption;
use crate::app::forms::{RunMode, SamplerChoice, SweepParam};
use crate::app::state::AppState;
use egui::{Slider, Ui};

/// Draws the Sampling panel.
pub fn show(ui: &mut Ui, state: &mut AppState) {
    let s = &mut state.sampling;
    ui.horizontal(|ui| {
        ui.label("Mode");
        ui.selectable_value(&mut s.mode, RunMode::Grid, "Identity grid");
        ui.selectable_value(&mut s.mode, RunMode::Sweep, "Sweep");
    });
    ui.add_space(2.0);
    egui::Grid::new("sampling")
        .num_columns(2)
        .spacing([8.0, 5.0])
        .show(ui, |ui| {
            let label = ui.label("Sampler");
            egui::ComboBox::from_id_salt("sampler")
                .selected_text(match s.sampler {
                    SamplerChoice::Ddpm => "DDPM-1000 (reference)",
                    SamplerChoice::Ddim => "DDIM",
                })
                .show_ui(ui, |ui| {
                    ui.selectable_value(
                        &mut s.sampler,
                        SamplerChoice::Ddpm,
                        "DDPM-1000 (reference)",
                    );
                    ui.selectable_value(&mut s.sampler, SamplerChoice::Ddim, "DDIM");
                })
                .response
                .labelled_by(label.id);
            ui.end_row();
            let ddim = s.sampler == SamplerChoice::Ddim;
            ui.label("Steps");
            ui.add_enabled(
                ddim,
                Slider::new(&mut s.steps, 1..=1000)
                    .logarithmic(true)
                    .text("steps"),
            );
            ui.end_row();
            ui.label("Eta");
            ui.add_enabled(ddim, Slider::new(&mut s.eta, 0.0..=1.0).text("eta"));
            ui.end_row();
            ui.label("Guidance");
            ui.add(Slider::new(&mut s.guidance, 0.0..=5.0).text("guidance"));
            ui.end_row();
            ui.label("Dropout");
            ui.add(Slider::new(&mut s.context_dropout, 0.0..=0.9).text("context dropout"));
            ui.end_row();
            let label = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add(egui::DragValue::new(&mut s.seed).speed(1.0))
                    .labelled_by(label.id);
                if super::widgets::dice_button(ui)
                    .on_hover_text("New random seed (R)")
                    .clicked()
                {
                    s.seed = u64::from(rand::random::<u32>());
                }
            });
            ui.end_row();
            match s.mode {
                RunMode::Grid => {
                    let label = ui.label("Per identity");
                    ui.add(
                        egui::DragValue::new(&mut s.per_identity)
                            .range(1..=64)
                            .suffix(" samples"),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                }
                RunMode::Sweep => {
                    let label = ui.label("Vary");
                    egui::ComboBox::from_id_salt("sweep_param")
                        .selected_text(s.sweep_param.label())
                        .show_ui(ui, |ui| {
                            for p in [SweepParam::Guidance, SweepParam::ContextDropout] {
                                ui.selectable_value(&mut s.sweep_param, p, p.label());
                            }
                        })
                        .response
                        .labelled_by(label.id);
                    ui.end_row();
                    let range = s.sweep_param.range();
                    let label = ui.label("From / to");
                    ui.horizontal(|ui| {
                        ui.add(
                            egui::DragValue::new(&mut s.sweep_from)
                                .range(range.clone())
                                .speed(0.05)
                                .max_decimals(2),
                        )
                        .labelled_by(label.id);
                        ui.add(
                            egui::DragValue::new(&mut s.sweep_to)
                                .range(range)
                                .speed(0.05)
                                .max_decimals(2),
                        )
                        .labelled_by(label.id);
                    });
                    ui.end_row();
                    let label = ui.label("Columns");
                    ui.add(egui::DragValue::new(&mut s.sweep_columns).range(2..=16))
                        .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("Identities");
                    ui.add(
                        egui::DragValue::new(&mut s.sweep_rows)
                            .range(1..=64)
                            .suffix(" rows"),
                    )
                    .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("Noise of");
                    ui.add(egui::DragValue::new(&mut s.sweep_sample).prefix("sample "))
                        .labelled_by(label.id);
                    ui.end_row();
                }
            }
            let label = ui.label("Batch size");
            ui.add(
                egui::DragValue::new(&mut s.batch_size)
                    .range(1..=256)
                    .suffix(" images"),
            )
            .labelled_by(label.id);
            ui.end_row();
        });
    ui.horizontal(|ui| {
        let check = ui.checkbox(&mut s.live_preview, "Live preview");
        ui.add_enabled(
            s.live_preview,
            egui::DragValue::new(&mut s.preview_every)
                .range(1..=200)
                .prefix("every ")
                .suffix(" steps"),
        )
        .labelled_by(check.id);
    });
    if s.mode == RunMode::Sweep {
        caption(
            ui,
            "rows: the first identities of the list; one noise per row, shared by its columns",
        );
    }
}
