//! "Identity from a photo": the Identities panel's face picker. Detection runs on a
//! background thread ([`crate::worker::io::spawn_detect_faces`]); the faces arrive as
//! [`Event::FacesDetected`] and one of them becomes an identity whose context is its
//! face-recognition embedding.

use super::state::AppState;
use crate::worker::identities::{IdentityEntry, Reference};
use crate::worker::protocol::DetectedPhoto;
use crate::worker::{io, Event, Worker};
use std::path::{Path, PathBuf};

/// The face picker's state.
#[derive(Debug, Default)]
pub struct PhotoFacesState {
    /// Id of the detection in flight.
    pub running: Option<u64>,
    /// The faces of the last detection with its request id (the key of its thumbnails).
    pub result: Option<(u64, DetectedPhoto)>,
    /// Last error of the picker (detection or use), shown in the panel.
    pub error: Option<String>,
    next_id: u64,
}

impl PhotoFacesState {
    /// Applies an [`Event::FacesDetected`]; stale results (an older request) are dropped.
    pub fn apply(&mut self, event: Event) {
        if let Event::FacesDetected { id, result } = event {
            if self.running != Some(id) {
                return;
            }
            self.running = None;
            match result {
                Ok(photo) => {
                    self.error = None;
                    self.result = Some((id, photo));
                }
                Err(e) => {
                    self.result = None;
                    self.error = Some(e);
                }
            }
        }
    }
}

/// Display name of a photo: its file name.
fn photo_label(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

impl AppState {
    /// "Detect faces": detects the faces of the form's photo on a background thread with
    /// the ONNX models of the form's models folder.
    pub fn detect_faces(&mut self, worker: &Worker) {
        let photo = self.identity_form.photo.trim();
        let p = &mut self.photo_faces;
        if photo.is_empty() {
            p.error = Some("choose a photo first".into());
            return;
        }
        let dir = self.identity_form.models_dir.trim();
        let dir = if dir.is_empty() {
            crate::onnx::models_dir()
        } else {
            PathBuf::from(dir)
        };
        p.next_id += 1;
        p.running = Some(p.next_id);
        p.error = None;
        io::spawn_detect_faces(p.next_id, PathBuf::from(photo), dir, worker.event_sender());
    }

    /// Makes face `k` of the last detection an identity (appended to the list, or replacing
    /// it when the form says so). A context width other than the loaded U-Net's is refused
    /// with a message.
    pub fn use_photo_face(&mut self, k: usize) {
        let dim = self.context_dim();
        let p = &mut self.photo_faces;
        let Some((_, photo)) = &p.result else {
            p.error = Some("detect the faces of a photo first".into());
            return;
        };
        let Some(face) = photo.faces.get(k) else {
            p.error = Some(format!("the photo has no face {k}"));
            return;
        };
        if face.embedding.len() != dim {
            p.error = Some(format!(
                "the face embedding is {}-d but the loaded U-Net expects {dim}-d contexts: \
                 load a U-Net trained on {}-d face embeddings",
                face.embedding.len(),
                face.embedding.len()
            ));
            return;
        }
        let label = photo_label(&photo.path);
        let replace = self.identity_form.photo_replace;
        let key = if replace {
            0
        } else {
            self.identities.iter().map(|i| i.key + 1).max().unwrap_or(0)
        };
        let entry = IdentityEntry {
            name: format!("{label} · face {k}"),
            origin: format!("photo · score {:.2}", face.score),
            key,
            context: face.embedding.clone(),
            reference: Some(Reference::Picture(face.crop.clone())),
        };
        p.error = None;
        if replace {
            self.identities.clear();
        }
        self.identities.push(entry);
        self.notice = Some(format!(
            "face {k} of {label} added: {} identities in the list",
            self.identities.len()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::protocol::PhotoFaceInfo;
    use std::sync::Arc;

    fn detected(dim: usize) -> DetectedPhoto {
        let mut e = vec![0.0; dim];
        e[0] = 1.0;
        DetectedPhoto {
            path: PathBuf::from("/x/obama.jpg"),
            faces: vec![PhotoFaceInfo {
                crop: Arc::new(image::RgbImage::new(112, 112)),
                embedding: Arc::new(e),
                score: 0.99,
                residual: 1.0,
            }],
        }
    }

    #[test]
    fn a_face_is_appended_with_a_fresh_key_and_stale_results_are_dropped() {
        let mut s = AppState::default();
        let n = s.identities.len();
        s.photo_faces.running = Some(2);
        s.apply(Event::FacesDetected {
            id: 1,
            result: Ok(detected(512)),
        });
        assert!(s.photo_faces.result.is_none(), "stale result applied");
        s.apply(Event::FacesDetected {
            id: 2,
            result: Ok(detected(512)),
        });
        assert!(s.photo_faces.running.is_none());
        s.use_photo_face(0);
        assert_eq!(s.identities.len(), n + 1);
        let last = s.identities.last().unwrap();
        assert_eq!(last.name, "obama.jpg · face 0");
        assert_eq!(last.key, n as u64);
        let crop = &s.photo_faces.result.as_ref().unwrap().1.faces[0].crop;
        assert!(
            matches!(&last.reference, Some(Reference::Picture(p)) if Arc::ptr_eq(p, crop)),
            "the face crop is the reference"
        );
        assert!(s.photo_faces.error.is_none());
        s.use_photo_face(3);
        assert!(s
            .photo_faces
            .error
            .as_deref()
            .unwrap()
            .contains("no face 3"));
        s.identity_form.photo_replace = true;
        s.use_photo_face(0);
        assert_eq!(s.identities.len(), 1);
    }

    #[test]
    fn a_width_mismatch_is_a_message() {
        let mut s = AppState::default();
        let n = s.identities.len();
        s.photo_faces.running = Some(1);
        s.apply(Event::FacesDetected {
            id: 1,
            result: Ok(detected(64)),
        });
        s.use_photo_face(0);
        assert_eq!(s.identities.len(), n);
        let e = s.photo_faces.error.clone().unwrap();
        assert!(e.contains("64-d") && e.contains("512-d"), "{e}");
    }

    #[test]
    fn detection_errors_become_messages() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = io::detect_faces(&dir.path().join("a.jpg"), &missing).unwrap_err();
        assert!(format!("{e:#}").contains("models folder"), "{e:#}");
        let e = io::detect_faces(&dir.path().join("a.jpg"), dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("not found"), "{e:#}");
        // With the real models: an unreadable photo and a photo without a face.
        if crate::onnx::cached_model_file(crate::onnx::DETECTOR_FILE).is_some() {
            let models = crate::onnx::models_dir();
            let bad = dir.path().join("bad.jpg");
            std::fs::write(&bad, b"not an image").unwrap();
            let e = format!("{:#}", io::detect_faces(&bad, &models).unwrap_err());
            assert!(e.contains("bad.jpg"), "{e}");
            let gray = dir.path().join("gray.png");
            image::RgbImage::from_pixel(320, 240, image::Rgb([128, 128, 128]))
                .save(&gray)
                .unwrap();
            let e = format!("{:#}", io::detect_faces(&gray, &models).unwrap_err());
            assert!(e.contains("no face found"), "{e}");
        }
        let worker = Worker::spawn();
        let mut s = AppState::default();
        s.detect_faces(&worker);
        assert!(s
            .photo_faces
            .error
            .as_deref()
            .unwrap()
            .contains("choose a photo"));
    }
}
