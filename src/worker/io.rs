//! Short background tasks that must not run on the UI thread: PNG export, reading
//! identity context files and detecting the faces of a photo. Each runs on its own thread
//! and reports one event.

use super::identities::Reference;
use super::protocol::{DetectedPhoto, Event, LoadedContexts, PhotoFaceInfo};
use super::EventSender;
use crate::errors::one_line;
use crate::files::write_atomic;
use crate::generate::{compose_grid, with_reference};
use crate::identity::Contexts;
use anyhow::Context;
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One row of an exported grid picture.
#[derive(Debug, Clone)]
pub struct ExportRow {
    /// The identity's reference picture, drawn first (scaled to the images' size).
    pub reference: Option<Reference>,
    /// The row's images.
    pub images: Vec<Arc<RgbImage>>,
}

/// Composes `rows` into one grid (2-pixel white gaps, each row's reference first) and writes
/// it as PNG to `path`, reporting [`Event::Exported`].
pub fn spawn_export_png(rows: Vec<ExportRow>, path: PathBuf, events: EventSender) {
    std::thread::spawn(move || {
        let result = export_png(&rows, &path)
            .map(|()| path.clone())
            .map_err(|e| format!("{e:#}"));
        events.send(Event::Exported(result));
    });
}

/// Writes the grid synchronously and atomically (used by [`spawn_export_png`]); references
/// are scaled to the size of their row's images.
pub fn export_png(rows: &[ExportRow], path: &Path) -> anyhow::Result<()> {
    let owned: Vec<Vec<RgbImage>> = rows
        .iter()
        .map(|r| {
            let images = r.images.iter().map(|im| (**im).clone()).collect();
            with_reference(images, r.reference.as_ref().map(|x| x.image()).as_deref())
        })
        .collect();
    let grid = compose_grid(&owned, 2).context("nothing to export: the grid has no images")?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut png = Vec::new();
    grid.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    write_atomic(path, &png)
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

/// Embeds new ProcFace identities `first..first + count` with the built-in FR model,
/// reporting [`Event::ProcfaceIdentities`].
pub fn spawn_procface_identities(first: usize, count: usize, events: EventSender) {
    std::thread::spawn(move || {
        let result = crate::default_model::eval::builtin_procface_contexts(first, count)
            .map(|rows| crate::worker::identities::procface_identities(first, rows))
            .map_err(|e| one_line(&e));
        events.send(Event::ProcfaceIdentities(result));
    });
}

/// Loads the ONNX face pipeline from `models_dir` and detects, aligns and embeds every face
/// of `photo`, reporting [`Event::FacesDetected`] with request id `id`.
pub fn spawn_detect_faces(id: u64, photo: PathBuf, models_dir: PathBuf, events: EventSender) {
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(|| detect_faces(&photo, &models_dir))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error while detecting faces")))
            .map_err(|e| one_line(&e));
        events.send(Event::FacesDetected { id, result });
    });
}

/// Detects the faces of `photo` with the models of `models_dir` (used by
/// [`spawn_detect_faces`]).
///
/// # Errors
/// A missing models folder or model file, an unreadable photo, no face found.
pub fn detect_faces(photo: &Path, models_dir: &Path) -> anyhow::Result<DetectedPhoto> {
    anyhow::ensure!(
        models_dir.is_dir(),
        "models folder {} not found (run scripts/fetch-models.sh or choose the folder holding \
         {}, {} and {})",
        models_dir.display(),
        crate::onnx::DETECTOR_FILE,
        crate::onnx::LANDMARK_FILE,
        crate::onnx::FR_MODEL_FILE
    );
    anyhow::ensure!(photo.is_file(), "photo {} not found", photo.display());
    let pipeline = crate::onnx::photo::FacePipeline::from_dir(models_dir)?;
    let faces = pipeline
        .faces_in_file(photo)?
        .into_iter()
        .map(|f| PhotoFaceInfo {
            crop: Arc::new(f.aligned),
            embedding: Arc::new(f.embedding),
            score: f.face.score,
            residual: f.residual,
        })
        .collect::<Vec<_>>();
    anyhow::ensure!(!faces.is_empty(), "{}: no face found", photo.display());
    Ok(DetectedPhoto {
        path: photo.to_path_buf(),
        faces,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::identities::Reference;

    #[test]
    fn exported_grid_starts_rows_with_their_scaled_reference() {
        let px = |v: u8, side| Arc::new(RgbImage::from_pixel(side, side, image::Rgb([v, v, v])));
        let rows = vec![
            ExportRow {
                reference: Some(Reference::Picture(px(9, 8))),
                images: vec![px(1, 2), px(2, 2)],
            },
            ExportRow {
                reference: None,
                images: vec![px(3, 2)],
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/grid.png");
        export_png(&rows, &path).unwrap();
        let grid = image::open(&path).unwrap().to_rgb8();
        assert_eq!(grid.dimensions(), (3 * 4 + 2, 2 * 4 + 2));
        let at = |col: u32, row: u32| grid.get_pixel(2 + col * 4, 2 + row * 4)[0];
        assert_eq!((at(0, 0), at(1, 0), at(2, 0)), (9, 1, 2));
        assert_eq!(
            at(0, 1),
            3,
            "a row without reference starts with its images"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }
}
