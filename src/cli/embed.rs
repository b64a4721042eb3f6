//! `idiff-studio embed`: one L2-normalised embedding per image (or per detected, aligned
//! face) with an ONNX or IResNet face-recognition model, plus the file names.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use image::RgbImage;

use crate::analysis::embed::{Embeddings, FrModel};
use crate::imageops::read_rgb;
use crate::onnx::detect::FaceDetector;

/// Arguments of `embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Image files, or one folder (its images, and those of its sub-folders, sorted by path).
    #[arg(long, num_args = 1.., required = true)]
    pub images: Vec<PathBuf>,
    /// Face-recognition model: ONNX (descriptor `<model>.json` beside it, else InsightFace
    /// defaults) or IResNet weights (`.safetensors`, `.pth`, `.pt`).
    #[arg(long)]
    pub fr_model: PathBuf,
    /// IResNet config for non-ONNX weights (default: read off the weights).
    #[arg(long)]
    pub fr_config: Option<PathBuf>,
    /// Detect faces and align the best one of each image to the 112 × 112 template first.
    #[arg(long)]
    pub align: bool,
    /// Face detector for --align (default: `fr_detect.onnx` beside the FR model, else in the
    /// model cache `$IDIFF_MODELS`).
    #[arg(long)]
    pub detector: Option<PathBuf>,
    /// 68-point landmark model for --align (default: `fr_landmark.onnx`, found like --detector).
    #[arg(long)]
    pub landmarks: Option<PathBuf>,
    /// Output: `.safetensors` (`embeddings`, `labels`, file names in the metadata, as
    /// `analyze` writes) or `.npy` (`N × D` f32, file names in `<out stem>.files.txt`).
    #[arg(long)]
    pub out: PathBuf,
}

/// One L2-normalised embedding of a whole image (no flip), as the reference's extraction
/// script computes it.
fn embed_one(model: &FrModel, img: &RgbImage) -> Result<Vec<f32>> {
    model.embed(model.preprocess(img)?, 1, false)
}

/// Image paths and their names (relative to the folder, or as given) from `--images`.
///
/// # Errors
/// When a path does not exist or a folder holds no images.
pub fn list_images(args: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    if let [dir] = args {
        if dir.is_dir() {
            let mut found = Vec::new();
            collect_images(dir, dir, &mut found)?;
            found.sort_by(|a, b| a.1.cmp(&b.1));
            if found.is_empty() {
                bail!(
                    "{}: no images ({}) found",
                    dir.display(),
                    crate::files::IMAGE_EXTENSIONS.join(", ")
                );
            }
            return Ok(found);
        }
    }
    args.iter()
        .map(|p| {
            if !p.is_file() {
                bail!("{}: no such image file", p.display());
            }
            Ok((p.clone(), p.display().to_string()))
        })
        .collect()
}

fn collect_images(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_images(root, &path, out)?;
        } else if crate::files::is_image_name(&path) {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((path, name));
        }
    }
    Ok(())
}

/// Finds a companion model: the explicit path, else `file` beside the FR model, else in
/// the model cache.
fn companion(explicit: Option<&Path>, fr_model: &Path, file: &str) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let beside = fr_model
        .parent()
        .map(|d| d.join(file))
        .filter(|p| p.is_file());
    beside.unwrap_or_else(|| crate::onnx::models_dir().join(file))
}

/// Runs `embed`; returns the exit code.
///
/// # Errors
/// One line naming the file: unreadable image or model, an image without a face under
/// `--align`, an output of unknown type.
pub fn run_embed(a: &EmbedArgs) -> Result<i32> {
    let ext = a
        .out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext != "safetensors" && ext != "npy" {
        bail!(
            "{}: output must end in .safetensors or .npy",
            a.out.display()
        );
    }
    let images = list_images(&a.images)?;
    let model = FrModel::load(
        &a.fr_model,
        a.fr_config.as_deref(),
        &candle_core::Device::Cpu,
    )?;
    let detector = if a.align {
        let det = companion(
            a.detector.as_deref(),
            &a.fr_model,
            crate::onnx::DETECTOR_FILE,
        );
        let lmk = companion(
            a.landmarks.as_deref(),
            &a.fr_model,
            crate::onnx::LANDMARK_FILE,
        );
        Some(FaceDetector::load(&det, &lmk)?)
    } else {
        None
    };
    let start = Instant::now();
    let mut data = Vec::new();
    let mut dim = 0;
    let mut names = Vec::with_capacity(images.len());
    for (path, name) in &images {
        let img = read_rgb(path)?;
        let face = match &detector {
            Some(d) => {
                let best = d
                    .align_all(&img, &path.display().to_string())?
                    .swap_remove(0);
                best.image
            }
            None => img,
        };
        let e = embed_one(&model, &face).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        dim = e.len();
        data.extend(e);
        names.push(name.clone());
    }
    let secs = start.elapsed().as_secs_f64();
    if ext == "safetensors" {
        // Labels: the identity folder of each file (its parent path), in first-seen order.
        let mut identities: Vec<String> = Vec::new();
        let labels = names
            .iter()
            .map(|n| {
                let id = n.rsplit_once('/').map_or(".", |(d, _)| d).to_owned();
                let k = identities.iter().position(|i| *i == id).unwrap_or_else(|| {
                    identities.push(id);
                    identities.len() - 1
                });
                k as u32
            })
            .collect();
        Embeddings {
            dim,
            data,
            labels,
            identities,
            files: names.clone(),
        }
        .save(&a.out)?;
    } else {
        crate::identity::Contexts::new(names.clone(), dim, data)?.save_npy(&a.out)?;
        let list = a.out.with_extension("files.txt");
        let mut text = names.join("\n");
        text.push('\n');
        crate::files::write_atomic(&list, text.as_bytes())
            .with_context(|| format!("cannot write {}", list.display()))?;
    }
    eprintln!(
        "embedded {} image(s){} in {secs:.2} s ({:.1} ms/image): {}",
        names.len(),
        if a.align { " (detected + aligned)" } else { "" },
        1000.0 * secs / names.len().max(1) as f64,
        a.out.display()
    );
    Ok(0)
}
