//! The studio's window: a settings panel on the left, a tabbed workspace in the middle and a
//! status bar, drawn with egui. The app only sends commands to the [`Worker`] and applies
//! its events; models, weights files and file dialogs never run on the UI thread.

pub mod dialogs;
pub mod forms;
pub mod frame_stats;
pub mod grid;
pub mod keys;
pub mod launch;
pub mod messages;
pub mod photo_faces;
pub mod session;
pub mod state;
pub mod style;
pub mod textures;
pub mod views;

use crate::worker::guard::mark_ui_thread;
use crate::worker::{Event, Worker};
use frame_stats::FrameStats;
use state::{AppState, Tab};
use std::time::Instant;
use textures::Thumbnails;
use views::ViewCtx;

/// Hook called with every event before the state applies it (used by the launcher).
pub type EventHook = Box<dyn FnMut(&Event, &AppState)>;

/// The studio application.
pub struct StudioApp {
    /// Everything shown.
    pub state: AppState,
    /// The worker thread.
    pub worker: Worker,
    /// Thumbnail textures.
    pub thumbs: Thumbnails,
    /// UI frame times.
    pub frame_stats: FrameStats,
    /// Thumbnail size in the grid (points).
    pub thumb_size: f32,
    /// Image size in the zoom view (points).
    pub zoom_size: f32,
    dialogs_ok: bool,
    shown_job: u64,
    scroll_to_row: Option<usize>,
    hooks: Vec<EventHook>,
    ctx_ready: bool,
    /// Show wall-clock timings (load time, run time, frame time); tests turn this off so
    /// snapshots are stable.
    pub show_timings: bool,
}

impl Default for StudioApp {
    fn default() -> Self {
        Self::new()
    }
}

impl StudioApp {
    /// A studio with default state and a fresh worker. The theme and the worker's repaint
    /// hook are installed on the first frame.
    pub fn new() -> Self {
        let worker = Worker::spawn();
        let mut state = AppState::default();
        state.io = Some(worker.event_sender());
        Self {
            state,
            worker,
            thumbs: Thumbnails::default(),
            frame_stats: FrameStats::default(),
            thumb_size: 112.0,
            zoom_size: 256.0,
            dialogs_ok: dialogs::dialogs_available(),
            shown_job: u64::MAX,
            scroll_to_row: None,
            hooks: Vec::new(),
            ctx_ready: false,
            show_timings: true,
        }
    }

    /// Turns native file dialogs off (tests; headless runs).
    pub fn without_dialogs(mut self) -> Self {
        self.dialogs_ok = false;
        self
    }

    /// Adds a hook that sees every event before the state does.
    pub fn on_event(&mut self, hook: EventHook) {
        self.hooks.push(hook);
    }

    /// Applies every pending worker event to the state.
    pub fn pump_events(&mut self) {
        while let Some(event) = self.worker.try_recv() {
            for h in &mut self.hooks {
                h(&event, &self.state);
            }
            self.state.apply(event);
        }
    }

    /// Draws one frame into `ui` (the whole window).
    pub fn show(&mut self, ui: &mut egui::Ui) {
        mark_ui_thread();
        let start = Instant::now();
        self.pump_events();
        let ctx = ui.ctx().clone();
        if !self.ctx_ready {
            style::apply(&ctx);
            let repaint = ctx.clone();
            self.worker
                .set_waker(std::sync::Arc::new(move || repaint.request_repaint()));
            self.ctx_ready = true;
        }
        let moved = keys::handle(&ctx, &mut self.state, &self.worker);
        if moved.moved_to_row.is_some() {
            self.scroll_to_row = moved.moved_to_row;
        }
        let job = self.state.grid.as_ref().map_or(u64::MAX, |g| g.job);
        if job != self.shown_job {
            self.thumbs.clear();
            self.shown_job = job;
        }
        self.thumbs.begin_frame();
        let mut cx = ViewCtx {
            worker: &self.worker,
            thumbs: &mut self.thumbs,
            dialogs_ok: self.dialogs_ok,
            thumb_size: self.thumb_size,
            zoom_size: self.zoom_size,
            scroll_to_row: self.scroll_to_row.take(),
            frame_p99_ms: self
                .frame_stats
                .quantile_ms(0.99)
                .filter(|_| self.show_timings),
            show_timings: self.show_timings,
            picks: Vec::new(),
        };
        let bar =
            egui::Frame::side_top_panel(ui.style()).inner_margin(egui::Margin::symmetric(10, 6));
        egui::Panel::top("top_bar")
            .frame(bar)
            .show(ui, |ui| views::top_bar(ui, &mut self.state));
        egui::Panel::bottom("status_bar")
            .frame(bar)
            .show(ui, |ui| views::status_bar::show(ui, &self.state, &cx));
        egui::Panel::left("settings_panel")
            .resizable(true)
            .default_size(310.0)
            .min_size(260.0)
            .frame(
                egui::Frame::side_top_panel(ui.style())
                    .inner_margin(egui::Margin::symmetric(10, 4)),
            )
            .show(ui, |ui| views::settings_panel(ui, &mut self.state, &mut cx));
        let central = egui::Frame::central_panel(ui.style()).inner_margin(egui::Margin::same(10));
        egui::CentralPanel::default()
            .frame(central)
            .show(ui, |ui| match self.state.tab {
                Tab::Generate => views::generate_tab::show(ui, &mut self.state, &mut cx),
                Tab::Analyze => views::analyze_tab::show(ui, &mut self.state, &mut cx),
                Tab::Export => views::export_tab::show(ui, &mut self.state, &mut cx),
                Tab::Train => views::train_tab::show(ui, &mut self.state, &mut cx),
            });
        self.thumb_size = cx.thumb_size;
        for (target, start) in std::mem::take(&mut cx.picks) {
            dialogs::spawn_pick(target, start, self.worker.event_sender());
        }
        if self.thumbs.deferred() {
            ctx.request_repaint();
        }
        if self.state.is_running() {
            // Keep the progress text and ETA moving even between events.
            ctx.request_repaint_after(std::time::Duration::from_millis(250));
        }
        self.frame_stats.record(start.elapsed());
    }

    /// Rebuilds the identity list from the Identities panel's fields.
    pub fn apply_identity_form(&mut self) {
        self.state.apply_identity_form(&self.worker);
    }

    /// The persistent part of the workspace as a session.
    pub fn session(&self) -> session::Session {
        session::Session::capture(&self.state)
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.show(ui);
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if let Ok(json) = self.session().to_json() {
            storage.set_string(session::STORAGE_KEY, json);
        }
    }

    fn auto_save_interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs(120)
    }

    fn on_exit(&mut self) {
        self.state.cancel();
        self.state.train_tab.stop();
        // Give a stopped run a moment to checkpoint, or an external trainer to receive its
        // SIGTERM, before the process exits.
        let deadline = Instant::now() + std::time::Duration::from_secs(3);
        while self.state.train_tab.is_running() && Instant::now() < deadline {
            if let Some(e) = self
                .worker
                .recv_timeout(std::time::Duration::from_millis(50))
            {
                self.state.apply(e);
            }
        }
    }
}
