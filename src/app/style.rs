//! The studio's look: a calm dark theme, one accent colour, roomy spacing.

use egui::{Color32, CornerRadius, FontFamily, FontId, Stroke, TextStyle, Vec2};

/// Accent (selection, primary buttons, progress).
pub const ACCENT: Color32 = Color32::from_rgb(86, 156, 214);
/// Rejected images and errors.
pub const DANGER: Color32 = Color32::from_rgb(224, 92, 92);
/// Success messages.
pub const OK: Color32 = Color32::from_rgb(110, 190, 120);
/// Warnings and previews.
pub const WARN: Color32 = Color32::from_rgb(230, 180, 80);
/// Secondary text.
pub const MUTED: Color32 = Color32::from_rgb(150, 155, 165);
/// Background of empty thumbnails.
pub const EMPTY_CELL: Color32 = Color32::from_rgb(40, 43, 48);

/// Applies the theme to `ctx`.
pub fn apply(ctx: &egui::Context) {
    ctx.set_theme(egui::Theme::Dark);
    let mut style = (*ctx.global_style()).clone();
    style.spacing.item_spacing = Vec2::new(8.0, 6.0);
    style.spacing.button_padding = Vec2::new(8.0, 4.0);
    style.spacing.interact_size.y = 22.0;
    style.spacing.slider_width = 150.0;
    style.text_styles.insert(
        TextStyle::Heading,
        FontId::new(17.0, FontFamily::Proportional),
    );
    style
        .text_styles
        .insert(TextStyle::Body, FontId::new(13.0, FontFamily::Proportional));
    style.text_styles.insert(
        TextStyle::Button,
        FontId::new(13.0, FontFamily::Proportional),
    );
    style.text_styles.insert(
        TextStyle::Small,
        FontId::new(11.0, FontFamily::Proportional),
    );
    style.text_styles.insert(
        TextStyle::Monospace,
        FontId::new(12.0, FontFamily::Monospace),
    );
    let v = &mut style.visuals;
    v.selection.bg_fill = ACCENT.gamma_multiply(0.6);
    v.selection.stroke = Stroke::new(1.0, ACCENT);
    v.hyperlink_color = ACCENT;
    v.panel_fill = Color32::from_rgb(27, 29, 33);
    v.window_fill = Color32::from_rgb(32, 34, 39);
    v.extreme_bg_color = Color32::from_rgb(20, 21, 24);
    v.faint_bg_color = Color32::from_rgb(34, 37, 42);
    for w in [
        &mut v.widgets.inactive,
        &mut v.widgets.hovered,
        &mut v.widgets.active,
    ] {
        w.corner_radius = CornerRadius::same(4);
    }
    v.widgets.noninteractive.bg_stroke = Stroke::new(1.0, Color32::from_rgb(48, 51, 57));
    ctx.set_global_style(style);
}
