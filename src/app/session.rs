//! Sessions: the settings, identities and curation of a workspace as one JSON document,
//! saved to a file or to eframe's storage. Images are not stored: the seed contract
//! regenerates them bit for bit with Run.

use super::forms::{IdentityForm, ModelForm, SamplingForm};
use super::grid::{Grid, GridSpec, Rejects};
use super::messages::AppMessage;
use super::state::{AppState, Tab};
use crate::worker::identities::IdentityEntry;
use crate::worker::protocol::Event;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version written into session files.
pub const SESSION_VERSION: u32 = 1;

/// Key of the session in eframe's storage.
pub const STORAGE_KEY: &str = "idiff-studio-session";

/// A saved workspace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// Format version.
    pub version: u32,
    /// Model panel.
    pub model: ModelForm,
    /// Identities panel.
    pub identity_form: IdentityForm,
    /// Sampling panel.
    pub sampling: SamplingForm,
    /// Identity list.
    pub identities: Vec<IdentityEntry>,
    /// Layout and settings of the last grid, if any.
    pub grid: Option<GridSpec>,
    /// Rejects of that grid.
    pub rejects: Rejects,
    /// Open tab.
    pub tab: Tab,
    /// PNG export path.
    pub export_path: String,
    /// The Train tab's fields (absent in sessions saved before they were kept: defaults).
    #[serde(default)]
    pub train: super::views::train_tab::TrainForm,
}

impl Session {
    /// Captures the persistent part of `state`.
    pub fn capture(state: &AppState) -> Self {
        Self {
            version: SESSION_VERSION,
            model: state.model.clone(),
            identity_form: state.identity_form.clone(),
            sampling: state.sampling.clone(),
            identities: state.identities.clone(),
            grid: state.grid.as_ref().map(|g| g.spec.clone()),
            rejects: state
                .grid
                .as_ref()
                .map(|g| g.rejects.clone())
                .unwrap_or_default(),
            tab: state.tab,
            export_path: state.export_path.clone(),
            train: state.train_tab.form.clone(),
        }
    }

    /// Restores it into `state` (the grid comes back empty, with its rejects).
    pub fn restore(self, state: &mut AppState) {
        state.model = self.model;
        state.identity_form = self.identity_form;
        state.sampling = self.sampling;
        state.identities = self.identities;
        state.tab = self.tab;
        state.export_path = self.export_path;
        state.train_tab.form = self.train;
        state.selection = None;
        state.zoom = None;
        state.grid = self.grid.map(|spec| {
            let mut g = Grid::new(0, spec);
            g.rejects = self.rejects;
            g
        });
    }

    /// Serialises to pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Parses JSON, refusing other versions.
    pub fn from_json(s: &str) -> Result<Self> {
        let session: Self = serde_json::from_str(s).context("not an IDiff Studio session")?;
        anyhow::ensure!(
            session.version == SESSION_VERSION,
            "session version {} is not supported (expected {SESSION_VERSION})",
            session.version
        );
        Ok(session)
    }

    /// Writes the session file.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_atomic(path, self.to_json()?.as_bytes())
            .with_context(|| format!("cannot save session {}", path.display()))
    }

    /// Reads a session file.
    pub fn open(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read session {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("session {}", path.display()))
    }
}

impl AppState {
    /// Saves the session to `session_path` (a small JSON file; images are not included). The
    /// file is written on a background thread when the state has an I/O channel
    /// ([`AppState::io`]), and the outcome arrives as [`Event::SessionSaved`].
    pub fn save_session(&mut self) {
        let path = PathBuf::from(self.session_path.trim());
        let session = Session::capture(self);
        let write = move || {
            session
                .save(&path)
                .map(|()| path)
                .map_err(|e| format!("{e:#}"))
        };
        match self.io.clone() {
            Some(tx) => {
                self.session_io = true;
                std::thread::spawn(move || tx.send(Event::SessionSaved(write())));
            }
            None => self.session_saved(write()),
        }
    }

    /// Opens the session at `session_path`, replacing the workspace (not while busy). The file
    /// is read and parsed on a background thread when the state has an I/O channel; the
    /// workspace changes when [`AppMessage::SessionOpened`] arrives.
    pub fn open_session(&mut self) {
        if !self.is_idle() || self.session_io {
            self.error = Some("cannot open a session while the worker is busy".into());
            return;
        }
        let path = PathBuf::from(self.session_path.trim());
        match self.io.clone() {
            Some(tx) => {
                self.session_io = true;
                std::thread::spawn(move || {
                    tx.send(AppMessage::SessionOpened(read_session(path)).into_event())
                });
            }
            None => self.session_opened(read_session(path)),
        }
    }

    /// Opens the session at `session_path` at once, on this thread (start-up, before the
    /// window exists, so that command-line flags can override it afterwards).
    pub fn open_session_now(&mut self) {
        let path = PathBuf::from(self.session_path.trim());
        self.session_opened(read_session(path));
    }

    /// Applies the outcome of a background save.
    pub fn session_saved(&mut self, result: Result<PathBuf, String>) {
        self.session_io = false;
        match result {
            Ok(path) => self.notice = Some(format!("session saved to {}", path.display())),
            Err(e) => self.error = Some(e),
        }
    }

    /// Applies the outcome of a background open.
    pub fn session_opened(&mut self, result: Result<(PathBuf, Box<Session>), String>) {
        self.session_io = false;
        match result {
            Ok(_) if !self.is_idle() => {
                self.error = Some("session not opened: the worker became busy".into());
            }
            Ok((path, session)) => {
                session.restore(self);
                self.notice = Some(format!(
                    "session {} opened: press Run to regenerate its images (same seed, same pixels)",
                    path.display()
                ));
            }
            Err(e) => self.error = Some(e),
        }
    }
}

/// Reads and parses a session file (off the UI thread).
fn read_session(path: PathBuf) -> Result<(PathBuf, Box<Session>), String> {
    Session::open(&path)
        .map(|s| (path, Box::new(s)))
        .map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::grid::Grid;
    use crate::app::views::train_tab::TrainForm;

    #[test]
    fn round_trip_restores_settings_identities_and_rejects() {
        let mut a = AppState::default();
        a.sampling.guidance = 2.5;
        a.model.unet = "/w/unet.ckpt".into();
        a.train_tab.form.backbone = "1,1,1,1".into();
        a.train_tab.form.epochs = 7;
        a.train_tab.form.command = "python train.py {dataset}".into();
        a.train_tab.loss_points.push([1.0, 2.0]);
        let spec = GridSpec {
            sweep: false,
            settings: vec![a.sampling.settings()],
            rows: vec![],
            columns: vec!["s0".into()],
        };
        let mut g = Grid::new(3, spec);
        g.rejects.toggle_image(0, 0);
        g.rejects.toggle_identity(2);
        a.grid = Some(g);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        Session::capture(&a).save(&path).unwrap();
        let mut b = AppState::default();
        b.identities.clear();
        Session::open(&path).unwrap().restore(&mut b);
        assert_eq!(b.sampling, a.sampling);
        assert_eq!(b.model, a.model);
        assert_eq!(b.identities, a.identities);
        assert_eq!(b.grid.unwrap().rejects, a.grid.as_ref().unwrap().rejects);
        let (ta, tb) = (&a.train_tab, &b.train_tab);
        assert_eq!(tb.form, ta.form);
        assert!(
            tb.loss_points.is_empty(),
            "curves are not part of a session"
        );
        // A session written before the Train tab was saved still opens, with its defaults.
        let mut old: serde_json::Value =
            serde_json::from_str(&Session::capture(&a).to_json().unwrap()).unwrap();
        old.as_object_mut().unwrap().remove("train");
        let s = Session::from_json(&old.to_string()).unwrap();
        assert_eq!(s.train, TrainForm::default());
        assert!(Session::from_json("{\"version\": 9}").is_err());
    }

    /// With an I/O channel, saving and opening happen on background threads: the state only
    /// changes when their events arrive, and a bad file becomes a one-line error.
    #[test]
    fn background_save_and_open_report_through_events() {
        let worker = crate::worker::Worker::spawn();
        let wait = || {
            worker
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("no event from the session thread")
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bg.json");
        let mut a = AppState::default();
        a.io = Some(worker.event_sender());
        a.sampling.guidance = 3.25;
        a.session_path = path.display().to_string();
        a.save_session();
        assert!(a.session_io, "the save did not go to the background");
        let ev = wait();
        assert!(matches!(ev, Event::SessionSaved(Ok(_))), "{ev:?}");
        a.apply(ev);
        assert!(!a.session_io && path.is_file());
        assert!(a.notice.as_deref().unwrap().contains("bg.json"));

        let mut b = AppState::default();
        b.io = Some(worker.event_sender());
        b.session_path = path.display().to_string();
        b.open_session();
        assert!(b.session_io);
        assert_ne!(
            b.sampling.guidance, 3.25,
            "restored before the event arrived"
        );
        b.open_session();
        assert!(
            b.error.as_deref().unwrap().contains("busy"),
            "{:?}",
            b.error
        );
        let ev = wait();
        b.apply(ev);
        assert_eq!(b.sampling.guidance, 3.25);
        assert!(!b.session_io);

        std::fs::write(&path, b"not json").unwrap();
        b.error = None;
        b.open_session();
        b.apply(wait());
        let err = b.error.clone().unwrap();
        assert!(err.contains("bg.json") && !err.contains('\n'), "{err}");
    }
}
