//! Export of a curated dataset as an ImageFolder or an InsightFace RecordIO set.
//!
//! Layouts:
//! - ImageFolder: `OUT/<label:06>/<sample:04>.png|jpg`, labels renumbered contiguously
//!   (`0..K`) over the kept identities; samples keep their source numbers. Images keep
//!   their size.
//! - RecordIO: `OUT/train.rec`, `OUT/train.idx`, `OUT/property` written with
//!   [`RecordWriter`], float label = new identity index. Images are resized to 112×112
//!   with [`resize_112`]: bilinear (triangle) interpolation whose kernel is widened by the
//!   scale factor when shrinking, i.e. antialiased like Pillow's `BILINEAR` resize (see
//!   [`super::resize`]).
//! - Both: `embeddings.npy` (when embeddings were given; rows in export order) and
//!   `manifest.json` ([`ExportManifest`]: the source manifest's weights hashes, generation
//!   settings and seed contract, the curation rules and counts, the identity mapping and
//!   the tool version).
//!
//! Exports are atomic ([`StagedDir`]): written into `OUT.partial/` and renamed to `OUT`
//! when complete; errors and cancels leave no `OUT`. Images are decoded, resized and encoded
//! in parallel (rayon; ImageFolder files are also written in parallel) in chunks, between
//! which the cancel flag is polled and progress reported. The bytes do not depend on the
//! number of threads.

use super::curate::{CurationCounts, CurationOutcome, CurationRules, ImageId};
use super::embeddings::Embeddings;
use super::recordio::RecordWriter;
use super::source::ImageSource;
use super::staging::StagedDir;
use super::{encode_image, ImageEncoding};
use anyhow::{anyhow, ensure, Context, Result};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Side of the images in a RecordIO export.
pub const RECORDIO_SIZE: u32 = 112;

/// Description of the RecordIO resize, recorded in manifests.
pub const RESIZE_METHOD: &str =
    "bilinear (triangle filter widened by the scale factor when shrinking: antialiased)";

/// Output format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// `OUT/<identity:06>/<sample:04>.png|jpg`.
    #[value(name = "imagefolder")]
    ImageFolder,
    /// InsightFace `train.rec`, `train.idx`, `property` (112×112).
    #[value(name = "recordio")]
    RecordIo,
}

impl ExportFormat {
    /// `imagefolder` or `recordio`.
    pub fn name(self) -> &'static str {
        match self {
            Self::ImageFolder => "imagefolder",
            Self::RecordIo => "recordio",
        }
    }
}

/// What to export and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRequest {
    /// Destination folder (must not exist; its parent must).
    pub out: PathBuf,
    /// Output format.
    pub format: ExportFormat,
    /// PNG or JPEG (with quality).
    pub encoding: ImageEncoding,
    /// The rules that produced the curation (recorded in the manifest).
    pub rules: CurationRules,
}

/// Progress of an export.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportProgress {
    /// Images written.
    pub done: usize,
    /// Images to write.
    pub total: usize,
    /// Images per second so far.
    pub images_per_s: f64,
    /// Estimated seconds left.
    pub eta_s: Option<f64>,
}

/// Counts of a finished export.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    /// The written folder.
    pub out: PathBuf,
    /// Images written.
    pub images: usize,
    /// Identities written.
    pub identities: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Images per second.
    pub images_per_s: f64,
}

/// How an export ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ExportOutcome {
    /// Written and renamed into place.
    Complete(ExportSummary),
    /// Cancelled; nothing was left behind.
    Cancelled,
}

/// The curation part of an export manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurationRecord {
    /// The rules.
    pub rules: CurationRules,
    /// Counts per rule.
    pub counts: CurationCounts,
}

/// `manifest.json` of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportManifest {
    /// Tool name and version that exported.
    pub tool: String,
    /// `imagefolder` or `recordio`.
    pub format: ExportFormat,
    /// `png` or `jpeg`.
    pub encoding: String,
    /// JPEG quality, for JPEG.
    pub jpeg_quality: Option<u8>,
    /// Width and height of the exported images.
    pub image_size: [u32; 2],
    /// How images were resized, if they were.
    pub resize: Option<String>,
    /// Where the images came from.
    pub source: String,
    /// Tool that generated the source (from its manifest).
    pub source_tool: Option<String>,
    /// Seed contract version of the source.
    pub seed_contract: Option<u64>,
    /// The source's generation record: weights files and their SHA-256, U-Net config,
    /// identities, images per identity, sampler settings and seed.
    pub generation: Option<serde_json::Value>,
    /// Rules and counts.
    pub curation: CurationRecord,
    /// Images written.
    pub images: usize,
    /// Identities written.
    pub identities: usize,
    /// `identity_map[label]` is the source identity index of exported label `label`.
    pub identity_map: Vec<usize>,
    /// Embeddings file beside the images (rows in export order), if written.
    pub embeddings: Option<String>,
}

/// Exports the images `curation` kept from `source` (see the module docs).
///
/// `embeddings` (row `i` for source image `i`) are written for the kept images when given.
/// `on_progress` is called on the calling thread after every chunk.
pub fn export(
    source: &dyn ImageSource,
    curation: &CurationOutcome,
    embeddings: Option<&Embeddings>,
    req: &ExportRequest,
    cancel: &AtomicBool,
    on_progress: &mut dyn FnMut(&ExportProgress),
) -> Result<ExportOutcome> {
    let ids = source.images();
    ensure!(
        curation.kept.iter().all(|&i| i < ids.len()),
        "the curation does not belong to this source"
    );
    if let Some(e) = embeddings {
        ensure!(
            e.len() == ids.len(),
            "embeddings have {} rows but the source has {} images",
            e.len(),
            ids.len()
        );
    }
    if let ImageEncoding::Jpeg { quality } = req.encoding {
        ensure!(
            (1..=100).contains(&quality),
            "JPEG quality must be 1-100, got {quality}"
        );
    }
    let staged = StagedDir::create(&req.out)?;
    let labels = curation.new_labels(ids);
    let items: Vec<(usize, usize)> = curation.kept.iter().copied().zip(labels).collect();
    let start = Instant::now();
    let total = items.len();
    let mut report = |done: usize| {
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        on_progress(&ExportProgress {
            done,
            total,
            images_per_s: rate,
            eta_s: (rate > 0.0).then(|| (total - done) as f64 / rate),
        });
    };
    report(0);
    let chunk = (rayon::current_num_threads() * 16).max(64);
    let size = match req.format {
        ExportFormat::ImageFolder => {
            for k in 0..curation.identity_map.len() {
                let d = staged.path().join(label_dir(k));
                std::fs::create_dir(&d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
            }
            let mut size = None;
            for (n, part) in items.chunks(chunk).enumerate() {
                if cancel.load(Ordering::SeqCst) {
                    return Ok(ExportOutcome::Cancelled);
                }
                let sizes = part
                    .par_iter()
                    .map(|&(i, label)| {
                        let img = source.load(i)?;
                        let path = staged
                            .path()
                            .join(label_dir(label))
                            .join(image_file_name(ids[i], req.encoding));
                        let bytes = encode_image(&img, req.encoding)?;
                        std::fs::write(&path, bytes)
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        Ok(img.dimensions())
                    })
                    .collect::<Result<Vec<_>>>()?;
                size = size.or(sizes.first().copied());
                report((n * chunk + part.len()).min(total));
            }
            size.unwrap_or((0, 0))
        }
        ExportFormat::RecordIo => {
            let mut writer = RecordWriter::create_dir(staged.path(), RECORDIO_SIZE, RECORDIO_SIZE)?;
            for (n, part) in items.chunks(chunk).enumerate() {
                if cancel.load(Ordering::SeqCst) {
                    return Ok(ExportOutcome::Cancelled);
                }
                let encoded = part
                    .par_iter()
                    .map(|&(i, _)| {
                        let img = source.load(i)?;
                        encode_image(&resize_112(&img), req.encoding)
                    })
                    .collect::<Result<Vec<_>>>()?;
                for (bytes, &(_, label)) in encoded.iter().zip(part) {
                    writer.push_encoded(bytes, label)?;
                }
                report((n * chunk + part.len()).min(total));
            }
            writer.finish()?;
            (RECORDIO_SIZE, RECORDIO_SIZE)
        }
    };
    if cancel.load(Ordering::SeqCst) {
        return Ok(ExportOutcome::Cancelled);
    }
    let embeddings_file = match embeddings {
        Some(e) => {
            let name = "embeddings.npy";
            let path = staged.path().join(name);
            std::fs::write(&path, e.select(&curation.kept).to_npy_bytes()?)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Some(name.to_string())
        }
        None => None,
    };
    let manifest = build_manifest(source, curation, req, size, embeddings_file);
    let path = staged.path().join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    let out = staged.commit()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(ExportOutcome::Complete(ExportSummary {
        out,
        images: total,
        identities: curation.identity_map.len(),
        seconds,
        images_per_s: total as f64 / seconds.max(1e-9),
    }))
}

fn build_manifest(
    source: &dyn ImageSource,
    curation: &CurationOutcome,
    req: &ExportRequest,
    (w, h): (u32, u32),
    embeddings: Option<String>,
) -> ExportManifest {
    let src = source.manifest();
    let field = |k: &str| src.and_then(|m| m.get(k)).cloned();
    let resized = req.format == ExportFormat::RecordIo;
    ExportManifest {
        tool: format!("idiff-studio {}", env!("CARGO_PKG_VERSION")),
        format: req.format,
        encoding: match req.encoding {
            ImageEncoding::Png => "png".into(),
            ImageEncoding::Jpeg { .. } => "jpeg".into(),
        },
        jpeg_quality: match req.encoding {
            ImageEncoding::Jpeg { quality } => Some(quality),
            ImageEncoding::Png => None,
        },
        image_size: [w, h],
        resize: resized.then(|| RESIZE_METHOD.to_string()),
        source: source.describe(),
        source_tool: field("tool").and_then(|v| v.as_str().map(String::from)),
        seed_contract: field("seed_contract").and_then(|v| v.as_u64()),
        generation: field("generation"),
        curation: CurationRecord {
            rules: req.rules.clone(),
            counts: curation.counts,
        },
        images: curation.kept.len(),
        identities: curation.identity_map.len(),
        identity_map: curation.identity_map.clone(),
        embeddings,
    }
}

/// Folder of exported label `label`.
pub fn label_dir(label: usize) -> String {
    format!("{label:06}")
}

/// File name of image `id` in an ImageFolder export.
pub fn image_file_name(id: ImageId, encoding: ImageEncoding) -> String {
    let ext = match encoding {
        ImageEncoding::Png => "png",
        ImageEncoding::Jpeg { .. } => "jpg",
    };
    format!("{:04}.{ext}", id.sample)
}

/// Resizes to 112×112 (see [`RESIZE_METHOD`]); a 112×112 image is returned unchanged.
pub fn resize_112(img: &RgbImage) -> RgbImage {
    if img.dimensions() == (RECORDIO_SIZE, RECORDIO_SIZE) {
        return img.clone();
    }
    super::resize::resize_bilinear_aa(img, RECORDIO_SIZE, RECORDIO_SIZE)
}

/// Reads an export's `manifest.json`.
pub fn read_export_manifest(dir: &Path) -> Result<ExportManifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not an export manifest: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::curate::{curate, ManualRejects};
    use crate::dataset::recordio::RecordReader;
    use crate::dataset::source::MemorySource;
    use std::sync::Arc;

    fn source(size: u32) -> MemorySource {
        let items = (0..4u64)
            .flat_map(|id| (0..3u64).map(move |s| (id, s)))
            .map(|(id, s)| {
                (
                    ImageId {
                        identity: 10 + id as usize,
                        sample: s as usize,
                    },
                    Arc::new(crate::procface::render_sample(id, s, size)),
                )
            })
            .collect();
        let manifest = serde_json::json!({
            "tool": "idiff-studio 0.1.0",
            "seed_contract": 1,
            "generation": {"unet": {"name": "u.ckpt", "sha256": "ab"}, "per_identity": 3},
        });
        MemorySource::new("memory", items, Some(manifest))
    }

    fn rules() -> CurationRules {
        CurationRules {
            rejects: ManualRejects {
                images: [(12, 1)].into(),
                identities: [11].into(),
            },
            ..Default::default()
        }
    }

    fn run(
        src: &MemorySource,
        out: &Path,
        format: ExportFormat,
        encoding: ImageEncoding,
    ) -> ExportOutcome {
        let rules = rules();
        let cur = curate(src.images(), None, None, &rules).unwrap();
        let emb = Embeddings::new(2, (0..24).map(|v| v as f32).collect()).unwrap();
        let req = ExportRequest {
            out: out.to_path_buf(),
            format,
            encoding,
            rules,
        };
        let mut seen = Vec::new();
        let outcome = export(
            src,
            &cur,
            Some(&emb),
            &req,
            &AtomicBool::new(false),
            &mut |p| seen.push(p.done),
        )
        .unwrap();
        assert_eq!(seen.first(), Some(&0));
        assert_eq!(seen.last(), Some(&8));
        outcome
    }

    #[test]
    fn recordio_export_reads_back_same_images_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(112);
        let out = dir.path().join("rec");
        let ExportOutcome::Complete(sum) =
            run(&src, &out, ExportFormat::RecordIo, ImageEncoding::Png)
        else {
            panic!("not complete")
        };
        assert_eq!((sum.images, sum.identities), (8, 3));
        let reader = RecordReader::open_dir(&out).unwrap();
        assert_eq!(reader.len(), 8);
        // Kept: identity 10 (3), 12 (samples 0 and 2), 13 (3) -> labels 0, 1, 2.
        let want: Vec<(usize, i64)> = vec![
            (0, 0),
            (1, 0),
            (2, 0),
            (6, 1),
            (8, 1),
            (9, 2),
            (10, 2),
            (11, 2),
        ];
        for (k, &(i, label)) in want.iter().enumerate() {
            let (img, l) = reader.get(k).unwrap();
            assert_eq!(l, label);
            assert_eq!(img, *src.load(i).unwrap(), "image {k}");
        }
        assert_eq!(
            reader.identity_ranges().unwrap(),
            vec![(1, 4), (4, 6), (6, 9)]
        );
        let m = read_export_manifest(&out).unwrap();
        assert_eq!(m.identity_map, vec![10, 12, 13]);
        assert_eq!(m.curation.counts.manual.images, 4);
        assert_eq!(m.generation.unwrap()["unet"]["sha256"], "ab");
        assert_eq!(m.seed_contract, Some(1));
        let emb = Embeddings::load(out.join("embeddings.npy")).unwrap();
        assert_eq!(emb.len(), 8);
        assert_eq!(emb.row(3), &[12.0, 13.0]);
        assert!(!partial_exists(&out));
    }

    #[test]
    fn recordio_resizes_to_112_and_imagefolder_keeps_size() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(128);
        let out = dir.path().join("rec");
        run(&src, &out, ExportFormat::RecordIo, ImageEncoding::Png);
        let reader = RecordReader::open_dir(&out).unwrap();
        let (img, _) = reader.get(0).unwrap();
        assert_eq!(img, resize_112(&src.load(0).unwrap()));
        assert_eq!(img.dimensions(), (112, 112));

        let folder = dir.path().join("folder");
        run(
            &src,
            &folder,
            ExportFormat::ImageFolder,
            ImageEncoding::Jpeg { quality: 90 },
        );
        let mut names: Vec<String> = std::fs::read_dir(folder.join("000001"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["0000.jpg", "0002.jpg"]);
        let img =
            crate::imageops::decode_rgb(&std::fs::read(folder.join("000002/0001.jpg")).unwrap())
                .unwrap();
        assert_eq!(img.dimensions(), (128, 128));
        let m = read_export_manifest(&folder).unwrap();
        assert_eq!((m.encoding.as_str(), m.jpeg_quality), ("jpeg", Some(90)));
        assert_eq!(m.image_size, [128, 128]);
    }

    #[test]
    fn thread_count_does_not_change_bytes_and_cancel_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = source(112);
        let mut recs = Vec::new();
        for threads in [1, 3] {
            let out = dir.path().join(format!("t{threads}"));
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    run(
                        &src,
                        &out,
                        ExportFormat::RecordIo,
                        ImageEncoding::Jpeg { quality: 75 },
                    )
                });
            recs.push(std::fs::read(out.join("train.rec")).unwrap());
        }
        assert_eq!(recs[0], recs[1]);

        let out = dir.path().join("cancelled");
        let cur = curate(src.images(), None, None, &CurationRules::default()).unwrap();
        let req = ExportRequest {
            out: out.clone(),
            format: ExportFormat::ImageFolder,
            encoding: ImageEncoding::Png,
            rules: CurationRules::default(),
        };
        let got = export(&src, &cur, None, &req, &AtomicBool::new(true), &mut |_| {}).unwrap();
        assert_eq!(got, ExportOutcome::Cancelled);
        assert!(!out.exists() && !partial_exists(&out));
    }

    fn partial_exists(out: &Path) -> bool {
        crate::dataset::staging::partial_path(out).exists()
    }
}
