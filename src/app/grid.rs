//! The result grid of the last run: rows = identities, columns = samples (or sweep values),
//! plus the per-image and per-identity rejects that feed export.

use crate::diffusion::sampler::SamplingSettings;
use crate::worker::identities::Reference;
use crate::worker::io::ExportRow;
use crate::worker::JobKind;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;

/// One row's label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowLabel {
    /// Identity name.
    pub name: String,
    /// Its origin (seed and index, file row, …).
    pub origin: String,
    /// Seed-contract identity index.
    pub key: u64,
    /// The identity's reference picture, drawn before the row's images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
}

/// What produced a grid: enough to label it, to show its settings and to re-run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridSpec {
    /// Sweep or plain grid.
    pub sweep: bool,
    /// Settings of each column for a sweep, or the single settings of a plain run.
    pub settings: Vec<SamplingSettings>,
    /// Row labels.
    pub rows: Vec<RowLabel>,
    /// Column labels.
    pub columns: Vec<String>,
}

impl GridSpec {
    /// The settings used by column `col`.
    pub fn settings_for(&self, col: usize) -> &SamplingSettings {
        if self.sweep {
            &self.settings[col.min(self.settings.len() - 1)]
        } else {
            &self.settings[0]
        }
    }

    /// The job kind that makes this grid.
    pub fn kind(&self) -> JobKind {
        if self.sweep {
            JobKind::Sweep
        } else {
            JobKind::Generate
        }
    }
}

/// An image in a grid cell.
#[derive(Debug, Clone)]
pub struct CellImage {
    /// Pixels.
    pub image: Arc<RgbImage>,
    /// True while it is a live x̂0 preview rather than the final image.
    pub preview: bool,
    /// Bumped on every change, so views re-upload textures only when needed.
    pub version: u64,
}

/// Rejected images `(row, col)` and rejected identities (rows).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rejects {
    /// Rejected single images.
    pub images: BTreeSet<(usize, usize)>,
    /// Rejected identities (every image of the row).
    pub identities: BTreeSet<usize>,
}

impl Rejects {
    /// True when the image or its whole identity is rejected.
    pub fn is_rejected(&self, row: usize, col: usize) -> bool {
        self.identities.contains(&row) || self.images.contains(&(row, col))
    }

    /// Flips the reject mark of one image.
    pub fn toggle_image(&mut self, row: usize, col: usize) {
        if !self.images.remove(&(row, col)) {
            self.images.insert((row, col));
        }
    }

    /// Flips the reject mark of a whole identity.
    pub fn toggle_identity(&mut self, row: usize) {
        if !self.identities.remove(&row) {
            self.identities.insert(row);
        }
    }

    /// Number of rejected images in a `rows × cols` grid.
    pub fn count(&self, rows: usize, cols: usize) -> usize {
        let singles = self
            .images
            .iter()
            .filter(|(r, c)| *r < rows && *c < cols && !self.identities.contains(r))
            .count();
        singles + self.identities.iter().filter(|r| **r < rows).count() * cols
    }
}

/// The grid of the current (or last) run.
#[derive(Debug, Clone)]
pub struct Grid {
    /// Job id whose events fill this grid.
    pub job: u64,
    /// What made it.
    pub spec: GridSpec,
    /// Row-major cells.
    pub cells: Vec<Option<CellImage>>,
    /// Rows whose images are all final.
    pub finished_rows: BTreeSet<usize>,
    /// Rejects.
    pub rejects: Rejects,
    /// The context of each row, when known (set by the run that fills the grid).
    pub contexts: Vec<Arc<Vec<f32>>>,
    next_version: u64,
}

impl Grid {
    /// An empty grid for `spec`, filled by events of `job`.
    pub fn new(job: u64, spec: GridSpec) -> Self {
        let n = spec.rows.len() * spec.columns.len();
        Self {
            job,
            spec,
            cells: vec![None; n],
            finished_rows: BTreeSet::new(),
            rejects: Rejects::default(),
            contexts: Vec::new(),
            next_version: 1,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.spec.rows.len()
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.spec.columns.len()
    }

    /// The cell at `(row, col)`.
    pub fn cell(&self, row: usize, col: usize) -> Option<&CellImage> {
        if row < self.rows() && col < self.cols() {
            self.cells[row * self.cols() + col].as_ref()
        } else {
            None
        }
    }

    /// Stores an image (final or preview); previews never replace a final image.
    pub fn put(&mut self, row: usize, col: usize, image: Arc<RgbImage>, preview: bool) {
        if row >= self.rows() || col >= self.cols() {
            return;
        }
        let cols = self.cols();
        let slot = &mut self.cells[row * cols + col];
        if preview && slot.as_ref().is_some_and(|c| !c.preview) {
            return;
        }
        self.next_version += 1;
        *slot = Some(CellImage {
            image,
            preview,
            version: self.next_version,
        });
    }

    /// Final images in the grid.
    pub fn final_images(&self) -> usize {
        self.cells.iter().flatten().filter(|c| !c.preview).count()
    }

    /// Rows of final images for PNG export (rejected images skipped when `skip_rejected`),
    /// each with its identity's reference picture; rows without an image are left out.
    pub fn export_rows(&self, skip_rejected: bool) -> Vec<ExportRow> {
        (0..self.rows())
            .map(|r| ExportRow {
                reference: self.spec.rows[r].reference.clone(),
                images: (0..self.cols())
                    .filter(|c| !(skip_rejected && self.rejects.is_rejected(r, *c)))
                    .filter_map(|c| {
                        self.cell(r, c)
                            .filter(|x| !x.preview)
                            .map(|x| x.image.clone())
                    })
                    .collect(),
            })
            .filter(|r| !r.images.is_empty())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rows: usize, cols: usize) -> GridSpec {
        GridSpec {
            sweep: false,
            settings: vec![SamplingSettings::default()],
            rows: (0..rows)
                .map(|i| RowLabel {
                    name: format!("{i}"),
                    origin: String::new(),
                    key: i as u64,
                    reference: None,
                })
                .collect(),
            columns: (0..cols).map(|c| format!("s{c}")).collect(),
        }
    }

    #[test]
    fn previews_never_replace_final_images() {
        let mut g = Grid::new(1, spec(2, 2));
        let im = Arc::new(RgbImage::new(2, 2));
        g.put(1, 1, im.clone(), true);
        assert!(g.cell(1, 1).unwrap().preview);
        g.put(1, 1, im.clone(), false);
        g.put(1, 1, im, true);
        assert!(!g.cell(1, 1).unwrap().preview);
        assert_eq!(g.final_images(), 1);
        g.put(5, 0, Arc::new(RgbImage::new(2, 2)), false);
    }

    #[test]
    fn export_rows_keep_references_and_skip_rejects_and_empty_rows() {
        let mut sp = spec(3, 2);
        let reference = Reference::Procface(3);
        sp.rows[0].reference = Some(reference.clone());
        let mut g = Grid::new(1, sp);
        let im = |v| Arc::new(RgbImage::from_pixel(2, 2, image::Rgb([v, v, v])));
        g.put(0, 0, im(1), false);
        g.put(0, 1, im(2), false);
        g.put(1, 0, im(3), true);
        g.put(2, 1, im(4), false);
        g.rejects.toggle_image(0, 0);
        let all = g.export_rows(false);
        assert_eq!(all.len(), 2, "the preview-only row is left out");
        assert_eq!(all[0].reference, Some(reference));
        assert_eq!(all[0].images.len(), 2);
        assert!(all[1].reference.is_none());
        let kept = g.export_rows(true);
        assert_eq!(kept[0].images.len(), 1);
        assert_eq!(kept[0].images[0].get_pixel(0, 0)[0], 2);
    }

    #[test]
    fn rejects_count_identities_once() {
        let mut r = Rejects::default();
        r.toggle_image(0, 1);
        r.toggle_image(1, 0);
        r.toggle_identity(1);
        assert_eq!(r.count(2, 3), 4);
        assert!(r.is_rejected(1, 2));
        r.toggle_image(0, 1);
        assert!(!r.is_rejected(0, 1));
    }
}
