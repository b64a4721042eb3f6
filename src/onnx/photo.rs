//! "Identity from a photo": every face of a photo, detected, aligned and embedded — what
//! the studio's Identities panel needs to offer a choice of faces whose embedding becomes
//! a context.

use std::path::Path;

use anyhow::{anyhow, Result};
use image::RgbImage;

use super::detect::{DetectedFace, FaceDetector};
use super::fr::OnnxFrModel;

/// One face of a photo.
#[derive(Debug, Clone)]
pub struct PhotoFace {
    /// Detection (box, score, 68 and 5 landmarks) in photo pixels.
    pub face: DetectedFace,
    /// The aligned 112 × 112 crop (a thumbnail for the face picker).
    pub aligned: RgbImage,
    /// RMS 5-point residual of the alignment, template pixels.
    pub residual: f64,
    /// L2-normalised embedding of the aligned crop.
    pub embedding: Vec<f32>,
}

/// Detector, landmark model and recognizer together.
#[derive(Debug, Clone)]
pub struct FacePipeline {
    /// Detector plus landmark model.
    pub detector: FaceDetector,
    /// Face-recognition model.
    pub fr: OnnxFrModel,
}

impl FacePipeline {
    /// Loads `fr_detect.onnx`, `fr_landmark.onnx` and `fr_feature.onnx` (with its
    /// descriptor) from a folder such as [`super::models_dir`].
    ///
    /// # Errors
    /// One line naming the missing or bad model file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Ok(Self {
            detector: FaceDetector::from_dir(dir)?,
            fr: OnnxFrModel::load(&dir.join(super::FR_MODEL_FILE))?,
        })
    }

    /// All faces of an image, best detector score first.
    ///
    /// # Errors
    /// `"<name>: no face found"` when there is none; inference failures.
    pub fn faces(&self, img: &RgbImage, name: &str) -> Result<Vec<PhotoFace>> {
        self.detector
            .align_all(img, name)?
            .into_iter()
            .map(|a| {
                let embedding = self
                    .fr
                    .embed(&a.image)
                    .map_err(|e| anyhow!("{name}: {e:#}"))?;
                Ok(PhotoFace {
                    face: a.face,
                    aligned: a.image,
                    residual: a.residual,
                    embedding,
                })
            })
            .collect()
    }

    /// All faces of a photo file.
    ///
    /// # Errors
    /// An unreadable image, no face, inference failures — one line naming the file.
    pub fn faces_in_file(&self, path: &Path) -> Result<Vec<PhotoFace>> {
        let img = crate::imageops::read_rgb(path)?;
        self.faces(&img, &path.display().to_string())
    }
}
