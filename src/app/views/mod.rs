//! The studio's views: pure functions of the state that call actions on it.

pub mod analyze_tab;
pub mod export_tab;
pub mod generate_tab;
pub mod grid_view;
pub mod identities_panel;
pub mod model_panel;
pub mod sampling_panel;
pub mod status_bar;
pub mod thumb;
pub mod train_tab;
pub mod widgets;
pub mod zoom_view;

use super::state::{AppState, Tab};
use super::textures::Thumbnails;
use crate::app::messages::PickTarget;
use crate::worker::Worker;
use egui::{RichText, Ui};
use std::path::PathBuf;

/// What views need besides the state.
pub struct ViewCtx<'a> {
    /// The worker (views send commands through state actions).
    pub worker: &'a Worker,
    /// Thumbnail textures.
    pub thumbs: &'a mut Thumbnails,
    /// Native file dialogs can be shown.
    pub dialogs_ok: bool,
    /// Requested thumbnail size in the grid.
    pub thumb_size: f32,
    /// Image size in the zoom view.
    pub zoom_size: f32,
    /// Scroll the grid so this row is visible (keyboard navigation).
    pub scroll_to_row: Option<usize>,
    /// Recent p99 of the UI frame time, in ms.
    pub frame_p99_ms: Option<f32>,
    /// Show wall-clock timings (off in snapshot tests).
    pub show_timings: bool,
    /// Dialog requests of this frame.
    pub picks: Vec<(PickTarget, Option<PathBuf>)>,
}

impl ViewCtx<'_> {
    /// Requests a file dialog (opened by the app after the frame, off the UI thread).
    pub fn pick(&mut self, target: PickTarget, start: Option<PathBuf>) {
        self.picks.push((target, start));
    }
}

/// The left settings panel.
pub fn settings_panel(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    egui::ScrollArea::vertical()
        .id_salt("settings")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            ui.add_space(4.0);
            widgets::section(ui, "Model", |ui| model_panel::show(ui, state, cx));
            widgets::section(ui, "Identities", |ui| identities_panel::show(ui, state, cx));
            widgets::section(ui, "Sampling", |ui| sampling_panel::show(ui, state));
            widgets::section(ui, "Session", |ui| session(ui, state, cx));
        });
}

fn session(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    if let Some(t) = widgets::path_field(
        ui,
        "Session file",
        &mut state.session_path,
        "session.json",
        PickTarget::OpenSession,
        cx.dialogs_ok,
    ) {
        cx.pick(t, Some(state.session_path.clone().into()));
    }
    ui.horizontal(|ui| {
        if ui
            .add_enabled(!state.session_io, egui::Button::new("Save session"))
            .clicked()
        {
            state.save_session();
        }
        if ui
            .add_enabled(
                state.is_idle() && !state.session_io,
                egui::Button::new("Open session"),
            )
            .clicked()
        {
            state.open_session();
        }
    });
    widgets::caption(
        ui,
        "settings, identities and rejects; images regenerate with Run",
    );
}

/// The top bar: title and tabs.
pub fn top_bar(ui: &mut Ui, state: &mut AppState) {
    ui.horizontal(|ui| {
        ui.label(RichText::new("IDiff Studio").strong().size(16.0));
        ui.label(
            RichText::new("identity-conditioned diffusion")
                .small()
                .color(super::style::MUTED),
        );
        ui.add_space(24.0);
        for tab in Tab::ALL {
            let text = RichText::new(tab.title()).size(14.0);
            ui.selectable_value(&mut state.tab, tab, text);
        }
    });
}
