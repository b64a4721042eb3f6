//! Face detection (RFB-320, `fr_detect.onnx`) and 68-point landmarks (`fr_landmark.onnx`),
//! reduced to the 5 points of the InsightFace template.
//!
//! Pre- and post-processing follow the model set's own JavaScript (npm
//! `faceplugin-face-recognition-js@0.0.1`, `lib/fr_detect.js`, `lib/fr_landmark.js`,
//! `lib/fr_feature.js`): the detector sees the whole image resized to 320 × 240, RGB,
//! `(x − 127) / 128`, and returns per-prior face scores (column 1) and boxes normalised to
//! the image (x1, y1, x2, y2); boxes above the score threshold (0.65) go through greedy
//! non-maximum suppression (IoU 0.4, highest score first). Each box is made square (side =
//! box height, same centre, clipped to the image), cropped, resized to 64 × 64 grey
//! `/ 256`; the landmark model returns 68 points normalised to that crop.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use image::RgbImage;

use super::align::align_112;
use super::runtime::OnnxNet;
use crate::imageops::resize_bilinear;

/// Detector input height.
pub const DETECTOR_HEIGHT: usize = 240;
/// Detector input width.
pub const DETECTOR_WIDTH: usize = 320;
/// Landmark model input side.
pub const LANDMARK_SIZE: usize = 64;
/// Default face score threshold of the detector.
pub const DEFAULT_SCORE_THRESHOLD: f32 = 0.65;
/// Default IoU of the non-maximum suppression.
pub const DEFAULT_NMS_IOU: f32 = 0.4;

/// One detected face, in pixel coordinates of the input image.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectedFace {
    /// Detector box `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Detector face score in `[0, 1]`.
    pub score: f32,
    /// The 68 landmarks (iBUG 300-W order).
    pub landmarks68: Vec<[f32; 2]>,
    /// The 5 template points: left eye, right eye, nose tip, left and right mouth corners.
    pub five: [[f32; 2]; 5],
}

/// The 5 template points from 68 iBUG landmarks (as the model set's `convert68pts5pts`):
/// eye centres = mean of points 37, 38, 40, 41 and 43, 44, 46, 47 (0-based), nose tip 30,
/// mouth corners = mean(48, 60) and mean(54, 64).
///
/// # Errors
/// With fewer than 68 points.
pub fn five_from_68(p: &[[f32; 2]]) -> Result<[[f32; 2]; 5]> {
    if p.len() < 68 {
        bail!("expected 68 landmarks, got {}", p.len());
    }
    let mean = |idx: &[usize]| {
        let n = idx.len() as f32;
        let (x, y) = idx
            .iter()
            .fold((0.0, 0.0), |(x, y), &i| (x + p[i][0], y + p[i][1]));
        [x / n, y / n]
    };
    Ok([
        mean(&[37, 38, 40, 41]),
        mean(&[43, 44, 46, 47]),
        p[30],
        mean(&[48, 60]),
        mean(&[54, 64]),
    ])
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy non-maximum suppression: highest score first, dropping boxes whose IoU with a
/// kept one exceeds `iou_threshold`.
pub fn nms(mut cands: Vec<([f32; 4], f32)>, iou_threshold: f32) -> Vec<([f32; 4], f32)> {
    cands.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept: Vec<([f32; 4], f32)> = Vec::new();
    for c in cands {
        if kept.iter().all(|k| iou(&k.0, &c.0) <= iou_threshold) {
            kept.push(c);
        }
    }
    kept
}

/// Planar RGB f32 (0–255) of an image.
fn planar_rgb(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planar = vec![0.0f32; 3 * h * w];
    for (p, px) in img.pixels().enumerate() {
        for c in 0..3 {
            planar[c * h * w + p] = f32::from(px[c]);
        }
    }
    planar
}

/// Face detector plus landmark model.
#[derive(Debug, Clone)]
pub struct FaceDetector {
    detector: OnnxNet,
    landmarks: OnnxNet,
    /// Minimum face score.
    pub score_threshold: f32,
    /// IoU above which a lower-scored box is suppressed.
    pub nms_iou: f32,
}

impl FaceDetector {
    /// Loads the detector (`1 × 3 × 240 × 320` input, outputs scores `[1, P, 2]` and boxes
    /// `[1, P, 4]`) and the landmark model (`1 × 1 × 64 × 64` input, 136 outputs).
    ///
    /// # Errors
    /// One line naming the file that is missing, corrupted or of unexpected shape.
    pub fn load(detector: &Path, landmarks: &Path) -> Result<Self> {
        let det = OnnxNet::load(detector, 3, Some((DETECTOR_HEIGHT, DETECTOR_WIDTH)))?;
        let outs = det.output_shapes();
        let ok = outs.len() == 2
            && outs.iter().any(|s| s.len() == 3 && s[2] == 2)
            && outs.iter().any(|s| s.len() == 3 && s[2] == 4)
            && outs[0].get(1) == outs[1].get(1);
        if !ok {
            bail!(
                "{}: outputs have shapes {outs:?}, expected scores [1, P, 2] and boxes [1, P, 4]",
                detector.display()
            );
        }
        let lmk = OnnxNet::load(landmarks, 1, Some((LANDMARK_SIZE, LANDMARK_SIZE)))?;
        let louts = lmk.output_shapes();
        if louts.len() != 1 || louts[0].iter().product::<usize>() != 136 {
            bail!(
                "{}: output has shape {louts:?}, expected [1, 136] (68 points)",
                landmarks.display()
            );
        }
        Ok(Self {
            detector: det,
            landmarks: lmk,
            score_threshold: DEFAULT_SCORE_THRESHOLD,
            nms_iou: DEFAULT_NMS_IOU,
        })
    }

    /// Loads `fr_detect.onnx` and `fr_landmark.onnx` from a folder (e.g. [`super::models_dir`]).
    ///
    /// # Errors
    /// As [`FaceDetector::load`].
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::load(
            &dir.join(super::DETECTOR_FILE),
            &dir.join(super::LANDMARK_FILE),
        )
    }

    /// Face boxes (pixels) and scores after thresholding and NMS, best first.
    ///
    /// # Errors
    /// When the image is empty or inference fails.
    pub fn boxes(&self, img: &RgbImage) -> Result<Vec<([f32; 4], f32)>> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if w == 0 || h == 0 {
            bail!("empty image");
        }
        let mut input = resize_bilinear(
            &planar_rgb(img),
            3,
            (h, w),
            (DETECTOR_HEIGHT, DETECTOR_WIDTH),
        )?;
        for v in &mut input {
            *v = (*v - 127.0) / 128.0;
        }
        let outs = self.detector.run(&input)?;
        let scores = outs
            .iter()
            .find(|o| o.shape.last() == Some(&2))
            .ok_or_else(|| anyhow!("{}: no scores output", self.detector.path().display()))?;
        let boxes = outs
            .iter()
            .find(|o| o.shape.last() == Some(&4))
            .ok_or_else(|| anyhow!("{}: no boxes output", self.detector.path().display()))?;
        let (wf, hf) = (w as f32, h as f32);
        let cands: Vec<([f32; 4], f32)> = scores
            .data
            .chunks_exact(2)
            .zip(boxes.data.chunks_exact(4))
            .filter(|(s, _)| s[1] > self.score_threshold)
            .map(|(s, b)| ([b[0] * wf, b[1] * hf, b[2] * wf, b[3] * hf], s[1]))
            .filter(|(b, _)| b[2] > b[0] && b[3] > b[1])
            .collect();
        Ok(nms(cands, self.nms_iou))
    }

    /// The 68 landmarks (pixels) of the face in `bbox`.
    ///
    /// # Errors
    /// When the box does not overlap the image or inference fails.
    pub fn landmarks68(&self, img: &RgbImage, bbox: &[f32; 4]) -> Result<Vec<[f32; 2]>> {
        let (w, h) = (img.width() as f32, img.height() as f32);
        let side = bbox[3] - bbox[1];
        let (cx, cy) = ((bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0);
        let x1 = (cx - side / 2.0).max(0.0).floor();
        let y1 = (cy - side / 2.0).max(0.0).floor();
        let x2 = (cx + side / 2.0).min(w - 1.0);
        let y2 = (cy + side / 2.0).min(h - 1.0);
        let (cw, ch) = ((x2 - x1).floor() as usize, (y2 - y1).floor() as usize);
        if cw < 2 || ch < 2 {
            bail!("face box {bbox:?} is outside the {w}x{h} image");
        }
        let (ox, oy) = (x1 as usize, y1 as usize);
        let mut grey = Vec::with_capacity(cw * ch);
        for y in oy..oy + ch {
            for x in ox..ox + cw {
                let p = img.get_pixel(x as u32, y as u32);
                grey.push(
                    0.299 * f32::from(p[0]) + 0.587 * f32::from(p[1]) + 0.114 * f32::from(p[2]),
                );
            }
        }
        let mut input = resize_bilinear(&grey, 1, (ch, cw), (LANDMARK_SIZE, LANDMARK_SIZE))?;
        for v in &mut input {
            *v /= 256.0;
        }
        let out = self.landmarks.run(&input)?;
        Ok(out[0]
            .data
            .chunks_exact(2)
            .map(|p| [x1 + p[0] * cw as f32, y1 + p[1] * ch as f32])
            .collect())
    }

    /// All faces of an image, best score first (possibly none).
    ///
    /// # Errors
    /// When inference fails.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<DetectedFace>> {
        self.boxes(img)?
            .into_iter()
            .map(|(bbox, score)| {
                let landmarks68 = self.landmarks68(img, &bbox)?;
                let five = five_from_68(&landmarks68)?;
                Ok(DetectedFace {
                    bbox,
                    score,
                    landmarks68,
                    five,
                })
            })
            .collect()
    }
}

/// A face cut out and aligned to the InsightFace 112 × 112 template.
#[derive(Debug, Clone)]
pub struct AlignedFace {
    /// The detection it came from.
    pub face: DetectedFace,
    /// The aligned 112 × 112 RGB crop.
    pub image: RgbImage,
    /// RMS distance (template pixels) between the warped 5 points and the template.
    pub residual: f64,
}

impl FaceDetector {
    /// Detects and aligns every face of an image, best score first.
    ///
    /// # Errors
    /// `"<name>: no face found"` when there is none; inference failures.
    pub fn align_all(&self, img: &RgbImage, name: &str) -> Result<Vec<AlignedFace>> {
        let faces = self.detect(img).map_err(|e| anyhow!("{name}: {e:#}"))?;
        if faces.is_empty() {
            bail!(
                "{name}: no face found (detector score threshold {})",
                self.score_threshold
            );
        }
        faces
            .into_iter()
            .map(|face| {
                let (image, residual) =
                    align_112(img, &face.five).map_err(|e| anyhow!("{name}: {e:#}"))?;
                Ok(AlignedFace {
                    face,
                    image,
                    residual,
                })
            })
            .collect()
    }
}
