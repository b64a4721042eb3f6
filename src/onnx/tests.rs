//! Tests on the real model set and photos fetched by `scripts/fetch-models.sh` (skipped
//! with a note when absent, failing under `CI=true`).

use std::path::PathBuf;
use std::time::Instant;

use image::{Rgb, RgbImage};

use super::detect::FaceDetector;
use super::fr::{cosine, FrDescriptor, OnnxFrModel};
use super::{cached_model_file, DETECTOR_FILE, FR_MODEL_FILE, LANDMARK_FILE};
use crate::imageops::read_rgb;

const PHOTOS: [&str; 4] = ["obama", "obama2", "obama3", "biden"];

/// The fixed input of the parity test: pixel (x, y, c) = (3x + 5y + 85c + (x·y mod 17)) mod 256.
fn pattern_112() -> RgbImage {
    RgbImage::from_fn(112, 112, |x, y| {
        let v = |c: u32| ((3 * x + 5 * y + 85 * c + (x * y) % 17) % 256) as u8;
        Rgb([v(0), v(1), v(2)])
    })
}

fn photos() -> Option<Vec<(String, RgbImage)>> {
    PHOTOS
        .iter()
        .map(|n| {
            let p = cached_model_file(&format!("photos/{n}.jpg"))?;
            Some((n.to_string(), read_rgb(&p).unwrap()))
        })
        .collect()
}

fn detector() -> Option<FaceDetector> {
    let det = cached_model_file(DETECTOR_FILE)?;
    let lmk = cached_model_file(LANDMARK_FILE)?;
    Some(FaceDetector::load(&det, &lmk).unwrap())
}

fn fr_model() -> Option<OnnxFrModel> {
    let p = cached_model_file(FR_MODEL_FILE)?;
    Some(OnnxFrModel::load_with(&p, FrDescriptor::mobilefacenet()).unwrap())
}

/// Largest absolute element-wise difference of two equally long slices.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn assert_one_line(msg: &str, needles: &[&str]) {
    assert_eq!(msg.lines().count(), 1, "not one line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{msg:?} lacks {n:?}");
    }
}

#[test]
fn onnx_fr_feature_matches_onnxruntime_on_fixed_input() {
    let Some(model) = fr_model() else { return };
    // Known-good output: onnxruntime 1.32.0 (CPU) on the same model and input; see the
    // file's `source` and `input` fields.
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("../../tests/data/fr_feature_pattern_ort.json")).unwrap();
    let want: Vec<f32> = reference["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let want_norm = reference["raw_norm"].as_f64().unwrap();
    assert_eq!(model.dim(), 512);
    let input = model.descriptor().preprocess(&pattern_112()).unwrap();
    let raw = model.forward_raw(&input).unwrap();
    let norm = raw
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    let got = model.embed(&pattern_112()).unwrap();
    let max_err = max_abs_diff(&got, &want);
    eprintln!(
        "tract vs onnxruntime: max |Δ| = {max_err:.2e} over 512 values, raw norm {norm:.6} vs {want_norm:.6}"
    );
    assert_eq!(got.len(), want.len());
    assert!(max_err < 1e-4, "max abs error {max_err}");
    assert!((norm - want_norm).abs() < 1e-4 * want_norm);
}

#[test]
fn onnx_detector_finds_one_face_per_portrait_and_aligned_embeddings_separate_identities() {
    let (Some(det), Some(fr), Some(photos)) = (detector(), fr_model(), photos()) else {
        return;
    };
    let mut embeddings = Vec::new();
    let start = Instant::now();
    for (name, img) in &photos {
        let faces = det.align_all(img, name).unwrap();
        assert_eq!(
            faces.len(),
            1,
            "{name}: {} faces: {:?}",
            faces.len(),
            faces
                .iter()
                .map(|f| (f.face.bbox, f.face.score))
                .collect::<Vec<_>>()
        );
        let f = &faces[0];
        eprintln!(
            "{name} ({}x{}): score {:.3}, box {:?}, 5-point residual {:.2} px (112 template)",
            img.width(),
            img.height(),
            f.face.score,
            f.face.bbox.map(|v| v.round()),
            f.residual
        );
        // The 5 points of a near-frontal face fit the template to within a few template
        // pixels (measured 1.8-4.0 px on these photos; the inter-ocular distance is 35 px).
        assert!(f.residual < 5.0, "{name}: residual {}", f.residual);
        let [le, re, nose, lm, rm] = f.face.five;
        assert!(
            le[0] < nose[0] && nose[0] < re[0],
            "{name}: eyes/nose order"
        );
        assert!(le[1] < nose[1] && nose[1] < lm[1] && nose[1] < rm[1]);
        embeddings.push(fr.embed(&f.image).unwrap());
    }
    let ms = 1000.0 * start.elapsed().as_secs_f64() / photos.len() as f64;
    eprintln!("detect + landmarks + align + embed: {ms:.0} ms/face (debug test build)");
    let c = |i: usize, j: usize| cosine(&embeddings[i], &embeddings[j]);
    for (i, j) in [(0, 1), (0, 2), (1, 2)] {
        eprintln!("cos({}, {}) = {:.3}", PHOTOS[i], PHOTOS[j], c(i, j));
        assert!(
            c(i, j) > 0.5,
            "genuine {}-{}: {}",
            PHOTOS[i],
            PHOTOS[j],
            c(i, j)
        );
    }
    for (i, name) in PHOTOS.iter().enumerate().take(3) {
        eprintln!("cos({name}, biden) = {:.3}", c(i, 3));
        assert!(c(i, 3) < 0.25, "impostor {name}-biden: {}", c(i, 3));
    }
}

#[test]
fn onnx_non_face_image_reports_no_face_found() {
    let Some(det) = detector() else { return };
    let flat = RgbImage::from_pixel(320, 240, Rgb([128, 128, 128]));
    let err = det.align_all(&flat, "flat.png").unwrap_err().to_string();
    assert_one_line(&err, &["flat.png", "no face found"]);
    assert!(det.detect(&flat).unwrap().is_empty());
}

#[test]
fn onnx_corrupted_or_missing_model_is_a_one_line_error_naming_the_file() {
    let Some(src) = cached_model_file(FR_MODEL_FILE) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(&src).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", OnnxFrModel::load(&truncated).unwrap_err());
    assert_one_line(&err, &["truncated.onnx", "not a readable ONNX model"]);

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf").unwrap();
    let err = format!("{:#}", OnnxFrModel::load(&garbage).unwrap_err());
    assert_one_line(&err, &["garbage.onnx"]);

    let missing = dir.path().join("missing.onnx");
    let err = format!("{:#}", OnnxFrModel::load(&missing).unwrap_err());
    assert_one_line(&err, &["missing.onnx", "not found"]);
}

#[test]
fn onnx_model_with_unexpected_input_shape_is_a_clear_error() {
    let (Some(fr), Some(lmk), Some(det)) = (
        cached_model_file(FR_MODEL_FILE),
        cached_model_file(LANDMARK_FILE),
        cached_model_file(DETECTOR_FILE),
    ) else {
        return;
    };
    // The landmark model (1 × 1 × 64 × 64) is not a face recognizer.
    let err = format!("{:#}", OnnxFrModel::load(&lmk).unwrap_err());
    assert_one_line(
        &err,
        &[
            "fr_landmark.onnx",
            "[1, 1, 64, 64]",
            "expected [N, 3, H, W]",
        ],
    );
    // A descriptor asking for another size than the model's.
    let d = FrDescriptor {
        input_size: [128, 128],
        ..FrDescriptor::mobilefacenet()
    };
    let err = format!("{:#}", OnnxFrModel::load_with(&fr, d).unwrap_err());
    assert_one_line(&err, &["fr_feature.onnx", "[1, 3, 112, 112]", "128x128"]);
    // The detector has a 3-channel input but no [1, D] output.
    let err = format!("{:#}", OnnxFrModel::load(&det).unwrap_err());
    assert_one_line(&err, &["fr_detect.onnx", "outputs"]);
    // Detector and landmark model swapped.
    let err = format!("{:#}", FaceDetector::load(&lmk, &det).unwrap_err());
    assert_one_line(&err, &["fr_landmark.onnx", "[1, 1, 64, 64]"]);
}

#[test]
fn onnx_descriptor_file_presets_overrides_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("w600k_r50.onnx");
    assert_eq!(FrDescriptor::path_for(&model), None);
    let desc = dir.path().join("w600k_r50.json");
    std::fs::write(
        &desc,
        r#"{"preset": "mobilefacenet", "channel_order": "bgr"}"#,
    )
    .unwrap();
    assert_eq!(FrDescriptor::path_for(&model), Some(desc.clone()));
    let d = FrDescriptor::load(&desc).unwrap();
    assert_eq!(d.mean, [127.0; 3]);
    assert_eq!(d.std, [128.0; 3]);
    assert_eq!(d.channel_order, super::fr::ChannelOrder::Bgr);
    // BGR planes: the first plane holds blue.
    let img = RgbImage::from_pixel(112, 112, Rgb([255, 0, 127]));
    let x = d.preprocess(&img).unwrap();
    assert_eq!(
        (x[0], x[112 * 112], x[2 * 112 * 112]),
        (0.0, -127.0 / 128.0, 1.0)
    );
    assert_eq!(FrDescriptor::default(), FrDescriptor::insightface());
    let x = FrDescriptor::insightface().preprocess(&img).unwrap();
    assert_eq!((x[0], x[2 * 112 * 112]), (1.0, -0.5 / 127.5));

    std::fs::write(&desc, r#"{"mean": [1, 2, 3], "stdev": [1, 1, 1]}"#).unwrap();
    let err = format!("{:#}", FrDescriptor::load(&desc).unwrap_err());
    assert_one_line(&err, &["w600k_r50.json", "stdev"]);
    std::fs::write(&desc, r#"{"preset": "vgg"}"#).unwrap();
    let err = format!("{:#}", FrDescriptor::load(&desc).unwrap_err());
    assert_one_line(&err, &["w600k_r50.json", "unknown preset `vgg`"]);
}

#[test]
fn onnx_face_pipeline_from_cache_dir_gives_one_face_of_a_portrait() {
    let (Some(_), Some(_), Some(_), Some(photo)) = (
        cached_model_file(FR_MODEL_FILE),
        cached_model_file(DETECTOR_FILE),
        cached_model_file(LANDMARK_FILE),
        cached_model_file("photos/obama2.jpg"),
    ) else {
        return;
    };
    // fetch-models.sh writes fr_feature.json (preset mobilefacenet) beside the model.
    let pipe = super::photo::FacePipeline::from_dir(&super::models_dir()).unwrap();
    assert_eq!(pipe.fr.descriptor(), &FrDescriptor::mobilefacenet());
    let faces = pipe.faces_in_file(&photo).unwrap();
    assert_eq!(faces.len(), 1);
    let f = &faces[0];
    assert_eq!(f.aligned.dimensions(), (112, 112));
    assert_eq!(f.embedding, pipe.fr.embed(&f.aligned).unwrap());
    let norm: f32 = f.embedding.iter().map(|v| v * v).sum();
    assert!((norm - 1.0).abs() < 1e-5);
    let err = pipe
        .faces_in_file(&PathBuf::from("/nonexistent/face.jpg"))
        .unwrap_err()
        .to_string();
    assert_one_line(&err, &["/nonexistent/face.jpg", "cannot read image"]);
}

/// The analysis code's `FrModel` runs ONNX recognizers: the same embedding as
/// `OnnxFrModel::embed`, batched, and the flip-sum variant through `embed_images`.
#[test]
fn onnx_model_is_usable_as_the_analysis_fr_model() {
    let Some(p) = cached_model_file(FR_MODEL_FILE) else {
        return;
    };
    let onnx = OnnxFrModel::load(&p).unwrap();
    let fr = crate::analysis::embed::FrModel::load(&p, None, &candle_core::Device::Cpu).unwrap();
    assert_eq!(fr.dim(), 512);
    assert_eq!(fr.input_hw(), (112, 112));
    assert_eq!(fr.sha256(), onnx.sha256());
    let a = pattern_112();
    let b = image::imageops::flip_horizontal(&a);
    let inputs = [fr.preprocess(&a).unwrap(), fr.preprocess(&b).unwrap()].concat();
    let rows = fr.embed(inputs, 2, false).unwrap();
    for (row, img) in rows.chunks_exact(512).zip([&a, &b]) {
        let want = onnx.embed(img).unwrap();
        let diff = max_abs_diff(row, &want);
        assert!(diff < 1e-6, "{diff}");
    }
    // f(x) + f(flip(x)) is the same for an image and its mirror image.
    let flip =
        crate::analysis::embed::embed_images(&fr, &[&a, &b], true, 8, &mut |_| {}, None).unwrap();
    let diff = max_abs_diff(&flip[..512], &flip[512..]);
    assert!(diff < 1e-5, "{diff}");
    let norm: f32 = flip[..512].iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
}

/// `eval`'s loader takes an ONNX recognizer: the verification set of the aligned portraits
/// (genuine pairs of one person, impostor pairs against another) embeds with the
/// model's own preprocessing and flip-sum, and the pairs separate.
#[test]
fn eval_runs_an_onnx_recognizer_on_a_verification_set() {
    let (Some(p), Some(det), Some(photos)) =
        (cached_model_file(FR_MODEL_FILE), detector(), photos())
    else {
        return;
    };
    let aligned: Vec<RgbImage> = photos
        .iter()
        .map(|(n, img)| det.align_all(img, n).unwrap().swap_remove(0).image)
        .collect();
    // 12 pairs (the protocol needs at least 10), genuine and impostor interleaved.
    let genuine = [(0, 1), (0, 2), (1, 2), (1, 0), (2, 0), (2, 1)];
    let impostor = [(0, 3), (1, 3), (2, 3), (3, 0), (3, 1), (3, 2)];
    let pairs: Vec<(usize, usize)> = genuine
        .iter()
        .zip(&impostor)
        .flat_map(|(g, i)| [*g, *i])
        .collect();
    let issame: Vec<bool> = (0..12).map(|k| k % 2 == 0).collect();
    let set =
        crate::train::eval::ValidationSet::from_images("portraits", aligned.clone(), pairs, issame)
            .unwrap();
    let device = candle_core::Device::Cpu;
    let model = crate::train::cli::load_embedder(&p, None, &device).unwrap();
    let (emb, dim) = set.embed(model.as_ref(), &device, 3).unwrap();
    assert_eq!(dim, 512);
    let row = |i: usize| -> Vec<f32> {
        emb[i * dim..(i + 1) * dim]
            .iter()
            .map(|&v| v as f32)
            .collect()
    };
    // The same flip-sum embedding as the analysis model gives.
    let fr = crate::analysis::embed::FrModel::load(&p, None, &device).unwrap();
    let refs: Vec<&RgbImage> = aligned.iter().collect();
    let want =
        crate::analysis::embed::embed_images(&fr, &refs, true, 4, &mut |_| {}, None).unwrap();
    for i in 0..4 {
        let d = max_abs_diff(&row(i), &want[i * dim..(i + 1) * dim]);
        assert!(d < 1e-5, "image {i}: {d}");
    }
    for (a, b) in [(0, 1), (0, 2), (1, 2)] {
        let c = cosine(&row(a), &row(b));
        assert!(c > 0.5, "genuine {a}-{b}: {c}");
    }
    for a in 0..3 {
        let c = cosine(&row(a), &row(3));
        assert!(c < 0.25, "impostor {a}-3: {c}");
    }
    let result = set.evaluate(model.as_ref(), &device, 4).unwrap();
    eprintln!("portraits: {result:?}");
    assert!(result.accuracy_mean > 0.99, "{result:?}");
}

/// The analysis model with alignment embeds the aligned crop of the best face (the same
/// embedding as aligning by hand), counts images without a face, and keeps its cache
/// entries apart from unaligned ones.
#[test]
fn analysis_model_aligns_faces_before_embedding() {
    let (Some(p), Some(det), Some(photos)) =
        (cached_model_file(FR_MODEL_FILE), detector(), photos())
    else {
        return;
    };
    let device = candle_core::Device::Cpu;
    let plain = crate::analysis::embed::FrModel::load(&p, None, &device).unwrap();
    let aligned_model = plain.clone().with_alignment(det.clone());
    assert!(aligned_model.aligns() && !plain.aligns());
    assert_ne!(aligned_model.sha256(), plain.sha256());
    let (name, photo) = &photos[0];
    let crop = det.align_all(photo, name).unwrap().swap_remove(0).image;
    let by_hand = plain
        .embed(plain.preprocess(&crop).unwrap(), 1, false)
        .unwrap();
    let auto = aligned_model
        .embed(aligned_model.preprocess(photo).unwrap(), 1, false)
        .unwrap();
    let d = max_abs_diff(&by_hand, &auto);
    assert!(d < 1e-6, "{d}");
    assert_eq!(aligned_model.unaligned_count(), 0);
    // A flat grey image has no face: embedded whole (as without alignment) and counted.
    let grey = RgbImage::from_pixel(128, 128, Rgb([128, 128, 128]));
    assert_eq!(
        aligned_model.preprocess(&grey).unwrap(),
        plain.preprocess(&grey).unwrap()
    );
    assert_eq!(aligned_model.unaligned_count(), 1);
    // Aligned analysis of real photos separates the identities better than whole images.
    let refs: Vec<&RgbImage> = photos.iter().map(|(_, i)| i).collect();
    let e =
        crate::analysis::embed::embed_images(&aligned_model, &refs, false, 4, &mut |_| {}, None)
            .unwrap();
    let row = |i: usize| &e[i * 512..(i + 1) * 512];
    assert!(cosine(row(0), row(1)) > 0.5 && cosine(row(0), row(3)) < 0.25);
}
