//! Short background tasks that must not run on the UI thread: PNG export and reading
//! identity context files. Each runs on its own thread and reports one event.

use super::protocol::{Event, LoadedContexts};
use super::EventSender;
use crate::generate::compose_grid;
use crate::identity::Contexts;
use anyhow::Context;
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Composes `rows` into one grid (2-pixel white gaps) and writes it as PNG to `path`,
/// reporting [`Event::Exported`].
pub fn spawn_export_png(rows: Vec<Vec<Arc<RgbImage>>>, path: PathBuf, events: EventSender) {
    std::thread::spawn(move || {
        let result = export_png(&rows, &path)
            .map(|()| path.clone())
            .map_err(|e| format!("{e:#}"));
        events.send(Event::Exported(result));
    });
}

/// Writes the grid synchronously (used by [`spawn_export_png`]).
pub fn export_png(rows: &[Vec<Arc<RgbImage>>], path: &Path) -> anyhow::Result<()> {
    let owned: Vec<Vec<RgbImage>> = rows
        .iter()
        .map(|r| r.iter().map(|im| (**im).clone()).collect())
        .collect();
    let grid = compose_grid(&owned, 2).context("nothing to export: the grid has no images")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    grid.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Reads an identity context file of width `dim`, reporting [`Event::ContextsLoaded`].
pub fn spawn_load_contexts(path: PathBuf, dim: usize, events: EventSender) {
    std::thread::spawn(move || {
        let result = Contexts::load(&path, dim)
            .map(|c| LoadedContexts {
                rows: c.rows().map(<[f32]>::to_vec).collect(),
                names: c.names.clone(),
                path: path.clone(),
            })
            .map_err(|e| format!("{e:#}"));
        events.send(Event::ContextsLoaded(result));
    });
}
