//! The zoom view: every image of one identity, large, with the settings that made them.

use super::thumb::{reference_tile, tile};
use super::ViewCtx;
use crate::app::state::AppState;
use crate::app::style;
use crate::diffusion::sampler::{SamplerKind, SamplingSettings};
use egui::{RichText, Ui};

/// One-line description of sampling settings.
pub fn describe(s: &SamplingSettings) -> String {
    let sampler = match s.sampler {
        SamplerKind::Ddpm => "DDPM 1000 steps".to_string(),
        SamplerKind::Ddim { steps, eta } => format!("DDIM {steps} steps, η={eta:.2}"),
    };
    format!(
        "{sampler} · guidance {:.2} · context dropout {:.2} · seed {}",
        s.guidance, s.context_dropout, s.seed
    )
}

/// Draws the zoom view of row `state.zoom`.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let (Some(row), Some(grid)) = (state.zoom, state.grid.as_ref()) else {
        return;
    };
    let row = row.min(grid.rows().saturating_sub(1));
    let label = grid.spec.rows[row].clone();
    let rows = grid.rows();
    let mut action = None;
    ui.horizontal(|ui| {
        if ui
            .button("Back to grid")
            .on_hover_text("Back to the grid (Esc)")
            .clicked()
        {
            action = Some(Action::Close);
        }
        if ui
            .add_enabled(row > 0, egui::Button::new("Prev"))
            .on_hover_text("Previous identity")
            .clicked()
        {
            action = Some(Action::Go(row - 1));
        }
        if ui
            .add_enabled(row + 1 < rows, egui::Button::new("Next"))
            .on_hover_text("Next identity")
            .clicked()
        {
            action = Some(Action::Go(row + 1));
        }
        ui.heading(format!("Identity {row} · {}", label.name));
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            let rejected = grid.rejects.identities.contains(&row);
            let text = if rejected {
                "Restore identity"
            } else {
                "Reject identity"
            };
            if ui.button(text).clicked() {
                action = Some(Action::RejectRow);
            }
        });
    });
    ui.label(
        RichText::new(format!(
            "{} · noise key {} · {}",
            label.origin,
            label.key,
            describe(grid.spec.settings_for(0))
        ))
        .color(style::MUTED),
    );
    ui.separator();
    let gap = 14.0;
    let avail = ui.available_width() - 16.0;
    // The reference picture (when the identity has one) comes first, then every image.
    let slots: Vec<Option<usize>> = label
        .reference
        .as_ref()
        .map(|_| None)
        .into_iter()
        .chain((0..grid.cols()).map(Some))
        .collect();
    let cols = slots.len().max(1);
    // As large as wanted, but at least two per row when there are several.
    let size = cx
        .zoom_size
        .min((avail - gap) / cols.min(2) as f32)
        .max(64.0);
    let per_row = (((avail + gap) / (size + gap)).floor() as usize).clamp(1, cols);
    let mut clicked = None;
    egui::ScrollArea::vertical()
        .id_salt("zoom")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            ui.spacing_mut().item_spacing = egui::vec2(gap, gap);
            for line in slots.chunks(per_row) {
                ui.horizontal_top(|ui| {
                    for slot in line {
                        ui.vertical(|ui| {
                            ui.set_width(size);
                            ui.spacing_mut().item_spacing.y = 4.0;
                            let Some(c) = *slot else {
                                reference_tile(ui, grid, cx.thumbs, row, size);
                                ui.label(RichText::new("reference").small().color(style::OK));
                                return;
                            };
                            let selected = state.selection == Some((row, c));
                            let t = tile(ui, grid, cx.thumbs, (row, c), size, selected);
                            if t.clicked {
                                clicked = Some(Action::Select(c));
                            }
                            if t.secondary {
                                clicked = Some(Action::Reject(c));
                            }
                            ui.horizontal(|ui| {
                                let mut caption = grid.spec.columns[c].clone();
                                if grid.spec.sweep {
                                    caption =
                                        format!("{caption} ({})", short(grid.spec.settings_for(c)));
                                }
                                ui.label(RichText::new(caption).small());
                                ui.with_layout(
                                    egui::Layout::right_to_left(egui::Align::Center),
                                    |ui| {
                                        let rejected = grid.rejects.is_rejected(row, c);
                                        let text = if rejected { "Rejected" } else { "Reject" };
                                        let b = egui::Button::new(text).selected(rejected).small();
                                        if ui
                                            .add(b)
                                            .on_hover_text("Reject or restore this image (Delete)")
                                            .clicked()
                                        {
                                            clicked = Some(Action::Reject(c));
                                        }
                                    },
                                );
                            });
                        });
                    }
                });
            }
        });
    match action.or(clicked) {
        Some(Action::Close) => state.zoom = None,
        Some(Action::Go(r)) => {
            state.zoom = Some(r);
            state.selection = Some((r, state.selection.map_or(0, |s| s.1)));
        }
        Some(Action::RejectRow) => {
            if let Some(g) = state.grid.as_mut() {
                g.rejects.toggle_identity(row);
            }
        }
        Some(Action::Select(c)) => state.selection = Some((row, c)),
        Some(Action::Reject(c)) => {
            state.selection = Some((row, c));
            if let Some(g) = state.grid.as_mut() {
                g.rejects.toggle_image(row, c);
            }
        }
        None => {}
    }
}

fn short(s: &SamplingSettings) -> String {
    format!("w {:.2}, p {:.2}", s.guidance, s.context_dropout)
}

enum Action {
    Close,
    Go(usize),
    RejectRow,
    Select(usize),
    Reject(usize),
}
