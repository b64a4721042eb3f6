//! Thumbnail textures: each grid image is uploaded once, when it is first shown, and the
//! handle is reused every frame after (re-uploaded in place only when the image changes,
//! e.g. a live preview becoming the final image). Far-off-screen textures are dropped when
//! the cache grows past its cap, so huge grids stay within GPU memory. At most
//! `uploads_per_frame` textures are uploaded per frame, so a fast scroll through a huge grid
//! fills in over a few frames instead of stalling one.

use super::grid::CellImage;
use crate::worker::identities::Reference;
use egui::{ColorImage, TextureHandle, TextureId, TextureOptions};
use image::RgbImage;
use std::collections::HashMap;

/// Identifies a grid cell across jobs.
pub type CellKey = (u64, usize, usize);

/// The column slot of a row's reference picture in [`CellKey`].
const REFERENCE_COLUMN: usize = usize::MAX;

/// Most ProcFace reference pictures rendered per frame (about 3 ms each in a release build).
pub const RENDERS_PER_FRAME: usize = 4;

struct Entry {
    texture: TextureHandle,
    version: u64,
    last_used: u64,
}

/// Cache of thumbnail textures.
pub struct Thumbnails {
    map: HashMap<CellKey, Entry>,
    frame: u64,
    cap: usize,
    uploads: u64,
    budget: usize,
    left_this_frame: usize,
    renders_left_this_frame: usize,
    deferred: bool,
}

impl Default for Thumbnails {
    fn default() -> Self {
        Self::with_cap(4096, 48)
    }
}

impl Thumbnails {
    /// A cache that keeps at most about `cap` textures between frames and uploads at most
    /// `uploads_per_frame` per frame.
    pub fn with_cap(cap: usize, uploads_per_frame: usize) -> Self {
        Self {
            map: HashMap::new(),
            frame: 0,
            cap,
            uploads: 0,
            budget: uploads_per_frame.max(1),
            left_this_frame: uploads_per_frame.max(1),
            renders_left_this_frame: RENDERS_PER_FRAME,
            deferred: false,
        }
    }

    /// Starts a frame; evicts textures unused in the last frame when over the cap.
    pub fn begin_frame(&mut self) {
        self.frame += 1;
        self.left_this_frame = self.budget;
        self.renders_left_this_frame = RENDERS_PER_FRAME;
        self.deferred = false;
        if self.map.len() > self.cap {
            let keep_after = self.frame.saturating_sub(2);
            self.map.retain(|_, e| e.last_used >= keep_after);
        }
    }

    /// The texture of `cell` at `key`, uploading it if new or changed; `None` when this
    /// frame's upload budget is spent (the caller draws a placeholder; see [`Self::deferred`]).
    pub fn texture(
        &mut self,
        ctx: &egui::Context,
        key: CellKey,
        cell: &CellImage,
    ) -> Option<TextureId> {
        self.image_texture(ctx, key, &cell.image, cell.version)
    }

    /// The texture of row `row`'s reference picture in grid `job` (it never changes). At most
    /// [`RENDERS_PER_FRAME`] ProcFace references are rendered per frame; `None` puts the rest
    /// off (see [`Self::deferred`]).
    pub fn reference(
        &mut self,
        ctx: &egui::Context,
        job: u64,
        row: usize,
        reference: &Reference,
    ) -> Option<TextureId> {
        let key = (job, row, REFERENCE_COLUMN);
        if let Some(e) = self.map.get_mut(&key) {
            e.last_used = self.frame;
            return Some(e.texture.id());
        }
        if matches!(reference, Reference::Procface(_)) {
            if self.renders_left_this_frame == 0 || self.left_this_frame == 0 {
                self.deferred = true;
                return None;
            }
            self.renders_left_this_frame -= 1;
        }
        self.image_texture(ctx, key, &reference.image(), 0)
    }

    fn image_texture(
        &mut self,
        ctx: &egui::Context,
        key: CellKey,
        image: &RgbImage,
        version: u64,
    ) -> Option<TextureId> {
        let frame = self.frame;
        if let Some(e) = self.map.get_mut(&key) {
            if e.version != version && self.left_this_frame > 0 {
                e.texture.set(color_image(image), TextureOptions::LINEAR);
                e.version = version;
                self.uploads += 1;
                self.left_this_frame -= 1;
            } else if e.version != version {
                self.deferred = true;
            }
            e.last_used = frame;
            return Some(e.texture.id());
        }
        if self.left_this_frame == 0 {
            self.deferred = true;
            return None;
        }
        self.left_this_frame -= 1;
        let texture = ctx.load_texture(
            format!("cell-{}-{}-{}", key.0, key.1, key.2),
            color_image(image),
            TextureOptions::LINEAR,
        );
        let id = texture.id();
        self.uploads += 1;
        self.map.insert(
            key,
            Entry {
                texture,
                version,
                last_used: frame,
            },
        );
        Some(id)
    }

    /// True when some upload of this frame was put off (request another frame).
    pub fn deferred(&self) -> bool {
        self.deferred
    }

    /// Drops every texture (e.g. when a new grid replaces the old one).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// Textures currently held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no texture is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Uploads (new textures plus in-place updates) since start.
    pub fn uploads(&self) -> u64 {
        self.uploads
    }
}

fn color_image(image: &RgbImage) -> ColorImage {
    let (w, h) = image.dimensions();
    ColorImage::from_rgb([w as usize, h as usize], image.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// ProcFace references are rendered a few per frame, once; pictures are only uploaded.
    #[test]
    fn references_render_a_few_per_frame_and_once() {
        let ctx = egui::Context::default();
        let mut t = Thumbnails::default();
        t.begin_frame();
        let got: Vec<bool> = (0..RENDERS_PER_FRAME + 2)
            .map(|r| t.reference(&ctx, 1, r, &Reference::Procface(r)).is_some())
            .collect();
        assert_eq!(got.iter().filter(|g| **g).count(), RENDERS_PER_FRAME);
        assert!(t.deferred());
        let picture = Reference::Picture(Arc::new(RgbImage::new(4, 4)));
        assert!(
            t.reference(&ctx, 1, 99, &picture).is_some(),
            "no render needed"
        );
        t.begin_frame();
        for r in 0..RENDERS_PER_FRAME + 2 {
            assert!(t.reference(&ctx, 1, r, &Reference::Procface(r)).is_some());
        }
        assert!(!t.deferred());
        assert_eq!(t.uploads(), RENDERS_PER_FRAME as u64 + 3);
    }
}
