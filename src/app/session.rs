//! Sessions: the settings, identities and curation of a workspace as one JSON document,
//! saved to a file or to eframe's storage. Images are not stored: the seed contract
//! regenerates them bit for bit with Run.

use super::forms::{IdentityForm, ModelForm, SamplingForm};
use super::grid::{Grid, GridSpec, Rejects};
use super::identities::IdentityEntry;
use super::state::{AppState, Tab};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version written into session files.
pub const SESSION_VERSION: u32 = 1;

/// Key of the session in eframe's storage.
pub const STORAGE_KEY: &str = "idiff-studio-session";

/// A saved workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        crate::generate::write_bytes_atomic(path, self.to_json()?.as_bytes())
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
    /// Saves the session to `session_path` (a small JSON file; images are not included).
    pub fn save_session(&mut self) {
        let path = std::path::PathBuf::from(self.session_path.trim());
        match Session::capture(self).save(&path) {
            Ok(()) => self.notice = Some(format!("session saved to {}", path.display())),
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Opens the session at `session_path`, replacing the workspace (not while busy).
    pub fn open_session(&mut self) {
        if !self.is_idle() {
            self.error = Some("cannot open a session while the worker is busy".into());
            return;
        }
        let path = std::path::PathBuf::from(self.session_path.trim());
        match Session::open(&path) {
            Ok(s) => {
                s.restore(self);
                self.notice = Some(format!(
                    "session {} opened: press Run to regenerate its images (same seed, same pixels)",
                    path.display()
                ));
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::grid::Grid;

    #[test]
    fn round_trip_restores_settings_identities_and_rejects() {
        let mut a = AppState::default();
        a.sampling.guidance = 2.5;
        a.model.unet = "/w/unet.ckpt".into();
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
        assert_eq!(b.grid.unwrap().rejects, a.grid.unwrap().rejects);
        assert!(Session::from_json("{\"version\": 9}").is_err());
    }
}
