//! Small shared widgets: section headers, path fields, labelled rows.

use crate::app::messages::PickTarget;
use crate::app::style;
use egui::{RichText, Ui};

/// A collapsible settings section with a bold title.
pub fn section(ui: &mut Ui, title: &str, add: impl FnOnce(&mut Ui)) {
    egui::CollapsingHeader::new(RichText::new(title).strong().size(14.0))
        .default_open(true)
        .show(ui, |ui| {
            ui.add_space(2.0);
            add(ui);
            ui.add_space(4.0);
        });
    ui.separator();
}

/// A muted caption above a field.
pub fn caption(ui: &mut Ui, text: &str) -> egui::Response {
    ui.label(RichText::new(text).small().color(style::MUTED))
}

/// A path text field with a browse button. Returns the target when Browse was clicked.
pub fn path_field(
    ui: &mut Ui,
    label: &str,
    value: &mut String,
    hint: &str,
    target: PickTarget,
    dialogs_ok: bool,
) -> Option<PickTarget> {
    let cap = caption(ui, label);
    let mut picked = None;
    ui.horizontal(|ui| {
        let button_w = 30.0;
        let w = (ui.available_width() - button_w - ui.spacing().item_spacing.x).max(60.0);
        ui.add(
            egui::TextEdit::singleline(value)
                .hint_text(hint)
                .desired_width(w)
                .id_salt(label),
        )
        .labelled_by(cap.id)
        .on_hover_text(if value.is_empty() {
            hint
        } else {
            value.as_str()
        });
        let browse = ui
            .add_enabled(
                dialogs_ok,
                egui::Button::new("…").min_size(egui::vec2(button_w, 0.0)),
            )
            .on_hover_text("Browse…")
            .on_disabled_hover_text("No display for file dialogs: type the path");
        if browse.clicked() {
            picked = Some(target);
        }
    });
    picked
}

/// A label on the left, a widget on the right, aligned in a two-column grid.
pub fn row(ui: &mut Ui, label: &str, add: impl FnOnce(&mut Ui)) {
    ui.label(label);
    add(ui);
    ui.end_row();
}

/// A full-width primary button.
pub fn primary_button(ui: &mut Ui, enabled: bool, text: &str) -> egui::Response {
    let button = egui::Button::new(RichText::new(text).strong().color(egui::Color32::WHITE))
        .fill(style::ACCENT.gamma_multiply(0.85))
        .min_size(egui::vec2(ui.available_width(), 28.0));
    ui.add_enabled(enabled, button)
}

/// A small button with a painted die (five pips): "new random seed".
pub fn dice_button(ui: &mut Ui) -> egui::Response {
    let size = egui::vec2(ui.spacing().interact_size.y, ui.spacing().interact_size.y);
    let (rect, resp) = ui.allocate_exact_size(size, egui::Sense::click());
    resp.widget_info(|| egui::WidgetInfo::labeled(egui::Role::Button, true, "New seed"));
    if ui.is_rect_visible(rect) {
        let v = ui.style().interact(&resp);
        let face = rect.shrink(2.0);
        ui.painter()
            .rect(face, 4, v.bg_fill, v.fg_stroke, egui::StrokeKind::Inside);
        let c = face.center();
        let d = face.width() * 0.26;
        let r = face.width() * 0.08;
        for (dx, dy) in [
            (-1.0, -1.0),
            (1.0, -1.0),
            (0.0, 0.0),
            (-1.0, 1.0),
            (1.0, 1.0),
        ] {
            ui.painter()
                .circle_filled(c + egui::vec2(dx * d, dy * d), r, v.fg_stroke.color);
        }
    }
    resp
}
