//! The identity grid: rows = identities, columns = samples (or sweep values), virtually
//! scrolled so only visible rows are laid out.

use super::thumb::{reference_tile, tile};
use super::ViewCtx;
use crate::app::state::AppState;
use crate::app::style;
use egui::{Align, Layout, RichText, Ui};

/// Width of the identity label column.
const LABEL_W: f32 = 132.0;

/// Thumbnail side for `cols` columns in `width`, at most `wanted`.
pub fn fit_thumb(width: f32, cols: usize, wanted: f32, gap: f32) -> f32 {
    let free = width - LABEL_W - gap * (cols as f32 + 1.0) - 16.0;
    (free / cols.max(1) as f32).clamp(28.0, wanted)
}

/// Draws the grid of `state.grid` (which must be present).
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let Some(grid) = state.grid.as_ref() else {
        return;
    };
    let gap = 4.0;
    let references = grid.spec.rows.iter().any(|r| r.reference.is_some());
    let thumb = fit_thumb(
        ui.available_width(),
        grid.cols() + usize::from(references),
        cx.thumb_size,
        gap,
    );
    // Column header.
    ui.horizontal(|ui| {
        ui.spacing_mut().item_spacing.x = gap;
        ui.add_sized(
            [LABEL_W, 16.0],
            egui::Label::new(RichText::new("identity").small().color(style::MUTED)),
        );
        if references {
            ui.add_sized(
                [thumb, 16.0],
                egui::Label::new(RichText::new("reference").small().color(style::OK)).truncate(),
            );
        }
        for c in &grid.spec.columns {
            let text = if thumb < 56.0 {
                c.trim_start_matches("sample ").to_string()
            } else {
                c.clone()
            };
            ui.add_sized(
                [thumb, 16.0],
                egui::Label::new(RichText::new(text).small().color(style::MUTED)).truncate(),
            );
        }
    });
    let row_h = thumb.max(48.0);
    let mut clicked = None;
    let mut reject_image = None;
    let mut reject_row = None;
    let scroll = egui::ScrollArea::vertical()
        .id_salt("identity_grid")
        .auto_shrink([false, false]);
    let scroll = match cx.scroll_to_row.take() {
        Some(r) => scroll.vertical_scroll_offset(
            (r as f32 * (row_h + ui.spacing().item_spacing.y) - row_h).max(0.0),
        ),
        None => scroll,
    };
    scroll.show_rows(ui, row_h, grid.rows(), |ui, range| {
        for r in range {
            ui.horizontal(|ui| {
                ui.spacing_mut().item_spacing.x = gap;
                ui.allocate_ui_with_layout(
                    [LABEL_W, row_h].into(),
                    Layout::top_down(Align::Min),
                    |ui| {
                        ui.set_width(LABEL_W);
                        ui.spacing_mut().item_spacing.y = 1.0;
                        let label = &grid.spec.rows[r];
                        let rejected = grid.rejects.identities.contains(&r);
                        let done = grid.finished_rows.contains(&r);
                        let name = RichText::new(format!("{r} · {}", label.name)).strong();
                        ui.add(
                            egui::Label::new(if rejected {
                                name.strikethrough().color(style::DANGER)
                            } else {
                                name
                            })
                            .truncate(),
                        );
                        ui.add(
                            egui::Label::new(
                                RichText::new(&label.origin).small().color(style::MUTED),
                            )
                            .truncate(),
                        );
                        ui.horizontal(|ui| {
                            let text = if rejected { "restore" } else { "reject" };
                            if ui
                                .small_button(text)
                                .on_hover_text("Reject or restore every image of this identity")
                                .clicked()
                            {
                                reject_row = Some(r);
                            }
                            if done {
                                ui.label(RichText::new("done").small().color(style::OK));
                            }
                        });
                    },
                );
                if references {
                    reference_tile(ui, grid, cx.thumbs, r, thumb);
                }
                for c in 0..grid.cols() {
                    let t = tile(
                        ui,
                        grid,
                        cx.thumbs,
                        (r, c),
                        thumb,
                        state.selection == Some((r, c)),
                    );
                    if t.clicked {
                        clicked = Some((r, c));
                    }
                    if t.secondary {
                        reject_image = Some((r, c));
                    }
                }
            });
        }
    });
    if let Some(g) = state.grid.as_mut() {
        if let Some(r) = reject_row {
            g.rejects.toggle_identity(r);
        }
        if let Some((r, c)) = reject_image {
            g.rejects.toggle_image(r, c);
            state.selection = Some((r, c));
        }
    }
    if let Some((r, c)) = clicked {
        state.selection = Some((r, c));
        state.zoom = Some(r);
    }
}
