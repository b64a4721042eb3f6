//! One image tile: the texture (or an empty placeholder), reject and selection marks.

use crate::app::grid::Grid;
use crate::app::style;
use crate::app::textures::Thumbnails;
use egui::{Align2, Color32, FontId, Rect, Sense, Stroke, StrokeKind, Ui, Vec2};

/// How a tile reacted.
#[derive(Debug, Default, Clone, Copy)]
pub struct TileResponse {
    /// Left click.
    pub clicked: bool,
    /// Right click (toggle reject).
    pub secondary: bool,
}

/// Draws the tile of `(row, col)` at `size`, returning clicks.
pub fn tile(
    ui: &mut Ui,
    grid: &Grid,
    thumbs: &mut Thumbnails,
    (row, col): (usize, usize),
    size: f32,
    selected: bool,
) -> TileResponse {
    let (rect, resp) = ui.allocate_exact_size(Vec2::splat(size), Sense::click());
    let label = format!("image {row}/{col}");
    resp.widget_info(|| egui::WidgetInfo::labeled(egui::accesskit::Role::Image, true, &label));
    if ui.is_rect_visible(rect) {
        paint(ui, grid, thumbs, (row, col), rect, selected, resp.hovered());
    }
    TileResponse {
        clicked: resp.clicked(),
        secondary: resp.secondary_clicked(),
    }
}

/// Draws row `row`'s reference picture (or an empty slot for a row without one) at `size`,
/// framed so it is not mistaken for a generated image.
pub fn reference_tile(ui: &mut Ui, grid: &Grid, thumbs: &mut Thumbnails, row: usize, size: f32) {
    let (rect, resp) = ui.allocate_exact_size(Vec2::splat(size), Sense::hover());
    let Some(reference) = grid.spec.rows[row].reference.as_ref() else {
        return;
    };
    let label = format!("reference {row}");
    resp.widget_info(|| egui::WidgetInfo::labeled(egui::accesskit::Role::Image, true, &label));
    resp.on_hover_text("Reference: the face this identity's context was taken from");
    if !ui.is_rect_visible(rect) {
        return;
    }
    let painter = ui.painter();
    match thumbs.reference(ui.ctx(), grid.job, row, reference) {
        Some(tex) => egui::Image::new(egui::load::SizedTexture::new(tex, rect.size()))
            .corner_radius(3)
            .paint_at(ui, rect),
        None => {
            painter.rect_filled(rect, 3, style::EMPTY_CELL);
        }
    }
    painter.rect_stroke(rect, 3, Stroke::new(1.5, style::OK), StrokeKind::Inside);
}

#[allow(clippy::too_many_arguments)]
fn paint(
    ui: &Ui,
    grid: &Grid,
    thumbs: &mut Thumbnails,
    (row, col): (usize, usize),
    rect: Rect,
    selected: bool,
    hovered: bool,
) {
    let painter = ui.painter();
    let rejected = grid.rejects.is_rejected(row, col);
    match grid.cell(row, col) {
        Some(cell) => match thumbs.texture(ui.ctx(), (grid.job, row, col), cell) {
            Some(tex) => {
                egui::Image::new(egui::load::SizedTexture::new(tex, rect.size()))
                    .corner_radius(3)
                    .paint_at(ui, rect);
                if cell.preview {
                    let tag = Rect::from_min_size(
                        rect.left_top() + Vec2::splat(3.0),
                        Vec2::new(22.0, 14.0),
                    );
                    painter.rect_filled(tag, 3, Color32::from_black_alpha(170));
                    painter.text(
                        tag.center(),
                        Align2::CENTER_CENTER,
                        "x0",
                        FontId::proportional(10.0),
                        style::WARN,
                    );
                }
            }
            None => {
                painter.rect_filled(rect, 3, style::EMPTY_CELL.gamma_multiply(1.3));
            }
        },
        None => {
            painter.rect_filled(rect, 3, style::EMPTY_CELL);
        }
    }
    if rejected {
        painter.rect_filled(rect, 3, Color32::from_black_alpha(150));
        let s = rect.shrink(rect.width() * 0.3);
        let stroke = Stroke::new(2.5, style::DANGER);
        painter.line_segment([s.left_top(), s.right_bottom()], stroke);
        painter.line_segment([s.right_top(), s.left_bottom()], stroke);
        painter.rect_stroke(rect, 3, Stroke::new(1.5, style::DANGER), StrokeKind::Inside);
    }
    if selected {
        painter.rect_stroke(
            rect.expand(1.0),
            4,
            Stroke::new(2.5, style::ACCENT),
            StrokeKind::Outside,
        );
    } else if hovered {
        painter.rect_stroke(
            rect,
            3,
            Stroke::new(1.0, Color32::from_white_alpha(120)),
            StrokeKind::Inside,
        );
    }
}
