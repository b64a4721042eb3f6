//! The `generate` job: sample M images for each of N identities into an ImageFolder
//! (`OUT/<identity:06>/<sample:04>.png`), an identity grid and a `manifest.json`.
//!
//! Identity folders are written atomically (a hidden temporary folder renamed into place),
//! the manifest lists finished identities after each one, and a re-run with the same
//! settings resumes by skipping them: an interrupted run completes to the same bytes as an
//! uninterrupted one.

use crate::diffusion::rng::{ImageKey, SEED_CONTRACT_VERSION};
use crate::diffusion::sampler::SamplingSettings;
use crate::files::{sha256_file, write_json_atomic};
use crate::pipeline::{Pipeline, WeightPaths};
use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where identities come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum IdentitySource {
    /// Uniform random identities: normalise(randn(512)) from the seed contract.
    Random {
        /// Number of identities.
        count: usize,
        /// Global index of the first identity.
        first: usize,
        /// Seed of the identity streams.
        seed: u64,
    },
    /// New ProcFace identities (seeds from 2,000,000 + `first`), embedded by the built-in
    /// default model's FR backbone: contexts for the built-in U-Net with a known face.
    Procface {
        /// Number of identities.
        count: usize,
        /// Index of the first identity (seed 2,000,000 + first).
        first: usize,
    },
    /// Contexts read from a file (reference torch pickle, `.npy` or safetensors).
    File {
        /// The context file.
        path: PathBuf,
        /// Its SHA-256.
        sha256: String,
    },
}

/// A resolved identity: its global index, name and context.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Global index (folder name).
    pub index: usize,
    /// Name (the key in a context file, or the index).
    pub name: String,
    /// Context vector.
    pub context: Vec<f32>,
}

impl IdentitySource {
    /// Materialises the identities.
    pub fn resolve(&self, width: usize) -> Result<Vec<Identity>> {
        match self {
            Self::Random { count, first, seed } => {
                let ctx = crate::identity::Contexts::uniform(*seed, *first, *count, width)?;
                Ok((0..ctx.len())
                    .map(|i| Identity {
                        index: first + i,
                        name: format!("{}", first + i),
                        context: ctx.row(i).to_vec(),
                    })
                    .collect())
            }
            Self::Procface { count, first } => {
                let rows = crate::default_model::eval::builtin_procface_contexts(*first, *count)?;
                let got = rows.first().map_or(width, Vec::len);
                anyhow::ensure!(
                    got == width,
                    "ProcFace identities are {got}-d contexts of the built-in FR model, but this \
                     U-Net takes {width}-d contexts (use them with the built-in U-Net)"
                );
                Ok(rows
                    .into_iter()
                    .enumerate()
                    .map(|(i, context)| Identity {
                        index: first + i,
                        name: format!(
                            "procface {}",
                            crate::procface::seeds::procface_identity_seed(first + i)
                        ),
                        context,
                    })
                    .collect())
            }
            Self::File { path, .. } => {
                let c = crate::identity::Contexts::load(path, width)?;
                Ok((0..c.len())
                    .map(|i| Identity {
                        index: i,
                        name: c.names.get(i).cloned().unwrap_or_else(|| i.to_string()),
                        context: c.row(i).to_vec(),
                    })
                    .collect())
            }
        }
    }
}

/// A deterministic slice `index` of `count` shards: identities whose position p in the
/// list satisfies p mod count == index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// This shard (0-based).
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (i, n) = s.split_once('/').context("shard must look like i/N")?;
        let shard = Shard {
            index: i.trim().parse().context("shard index")?,
            count: n.trim().parse().context("shard count")?,
        };
        anyhow::ensure!(
            shard.count > 0 && shard.index < shard.count,
            "shard {s}: need 0 <= i < N"
        );
        Ok(shard)
    }
}

/// Everything a `generate` run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Weights and configs.
    pub weights: WeightPaths,
    /// Identities.
    pub identities: IdentitySource,
    /// Images per identity.
    pub per_identity: usize,
    /// Sampler settings and seed.
    pub settings: SamplingSettings,
    /// Images per forward batch (does not change the images).
    pub batch_size: usize,
    /// Output folder.
    pub out: PathBuf,
    /// Optional shard of the identity list.
    pub shard: Option<Shard>,
}

/// The manifest written beside the images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Tool name and version.
    pub tool: String,
    /// Seed contract version (see `diffusion::rng`).
    pub seed_contract: u32,
    /// Everything that determines the images.
    pub generation: Generation,
    /// Identity indices finished so far (sorted).
    pub completed: Vec<usize>,
    /// Total identities of this run (or shard).
    pub total_identities: usize,
    /// `complete` or `partial`.
    pub status: String,
}

/// The part of the manifest that must match for a resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// U-Net file and its SHA-256.
    pub unet: FileRecord,
    /// Decoder file and its SHA-256.
    pub decoder: FileRecord,
    /// The U-Net configuration used.
    pub unet_config: crate::models::unet::UNetConfig,
    /// Where it came from.
    pub unet_config_source: String,
    /// Identities.
    pub identities: IdentitySource,
    /// Images per identity.
    pub per_identity: usize,
    /// Sampler settings.
    pub settings: SamplingSettings,
    /// Shard, if any.
    pub shard: Option<Shard>,
}

/// A weights file and its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name (not the full path, so moved weights still resume).
    pub name: String,
    /// SHA-256 hex.
    pub sha256: String,
}

impl FileRecord {
    fn of(path: &Path) -> Result<Self> {
        Ok(Self {
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: sha256_file(path)?,
        })
    }
}

/// Events reported while generating.
#[derive(Debug, Clone)]
pub enum GenerateEvent {
    /// The run starts: identities still to do, images per identity, steps per batch.
    Started {
        /// Identities still to generate.
        pending: usize,
        /// Identities skipped because a previous run finished them.
        resumed: usize,
        /// Images still to generate.
        images: usize,
    },
    /// A denoising step of the current batch finished.
    Step {
        /// Steps done in this batch.
        done: usize,
        /// Steps per batch.
        total: usize,
        /// Images in this batch.
        batch: usize,
    },
    /// An identity's folder is complete on disk.
    IdentityDone {
        /// Global identity index.
        identity: usize,
    },
}

/// Outcome of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateOutcome {
    /// All identities are done.
    Complete,
    /// Cancelled; finished identities are kept, the run can be resumed.
    Cancelled {
        /// Identities finished so far in total.
        completed: usize,
    },
}

/// Name of an identity folder.
pub fn identity_dir_name(identity: usize) -> String {
    format!("{identity:06}")
}

/// Name of a sample file.
pub fn sample_file_name(sample: usize) -> String {
    format!("{sample:04}.png")
}

/// Runs (or resumes) a generation into `req.out`.
pub fn run_generate(
    req: &GenerateRequest,
    pipeline: &Pipeline,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(GenerateEvent),
) -> Result<GenerateOutcome> {
    anyhow::ensure!(req.per_identity > 0, "--per-identity must be at least 1");
    anyhow::ensure!(req.batch_size > 0, "--batch-size must be at least 1");
    req.settings.validate()?;
    let width = pipeline.unet_config().context_input_channels;
    let mut identities = req.identities.resolve(width)?;
    if let Some(shard) = req.shard {
        identities = identities
            .into_iter()
            .enumerate()
            .filter(|(p, _)| p % shard.count == shard.index)
            .map(|(_, id)| id)
            .collect();
    }
    let generation = Generation {
        unet: FileRecord::of(&req.weights.unet)?,
        decoder: FileRecord::of(&req.weights.decoder)?,
        unet_config: pipeline.unet_config().clone(),
        unet_config_source: pipeline.unet_config_source.to_string(),
        identities: req.identities.clone(),
        per_identity: req.per_identity,
        settings: req.settings.clone(),
        shard: req.shard,
    };
    prepare_out_dir(&req.out)?;
    let manifest_path = req.out.join("manifest.json");
    let mut manifest = match read_manifest(&manifest_path)? {
        Some(m) => {
            if m.generation != generation {
                bail!(
                    "{}: holds a different generation ({}); choose another --out",
                    req.out.display(),
                    first_difference(&m.generation, &generation)
                );
            }
            m
        }
        None => Manifest {
            tool: format!("idiff-studio {}", env!("CARGO_PKG_VERSION")),
            seed_contract: SEED_CONTRACT_VERSION,
            generation,
            completed: Vec::new(),
            total_identities: identities.len(),
            status: "partial".into(),
        },
    };
    // Trust the manifest only for folders that exist.
    manifest
        .completed
        .retain(|i| req.out.join(identity_dir_name(*i)).is_dir());
    write_json_atomic(&manifest_path, &manifest)?;

    let pending: Vec<&Identity> = identities
        .iter()
        .filter(|id| manifest.completed.binary_search(&id.index).is_err())
        .collect();
    on_event(GenerateEvent::Started {
        pending: pending.len(),
        resumed: identities.len() - pending.len(),
        images: pending.len() * req.per_identity,
    });

    let work: Vec<(usize, ImageKey)> = pending
        .iter()
        .enumerate()
        .flat_map(|(slot, id)| {
            (0..req.per_identity).map(move |s| {
                (
                    slot,
                    ImageKey {
                        identity: id.index as u64,
                        sample: s as u64,
                    },
                )
            })
        })
        .collect();
    let mut buffers: BTreeMap<usize, Vec<Option<RgbImage>>> = BTreeMap::new();
    for chunk in work.chunks(req.batch_size) {
        let contexts: Vec<Vec<f32>> = chunk
            .iter()
            .map(|(slot, _)| pending[*slot].context.clone())
            .collect();
        let keys: Vec<ImageKey> = chunk.iter().map(|(_, k)| *k).collect();
        let batch = chunk.len();
        let images = pipeline.generate_batch(&contexts, &keys, &req.settings, &mut |p| {
            on_event(GenerateEvent::Step {
                done: p.done,
                total: p.total,
                batch,
            });
            !cancel.load(Ordering::SeqCst)
        })?;
        let Some(images) = images else {
            return Ok(GenerateOutcome::Cancelled {
                completed: manifest.completed.len(),
            });
        };
        for ((slot, key), img) in chunk.iter().zip(images) {
            let buf = buffers
                .entry(*slot)
                .or_insert_with(|| vec![None; req.per_identity]);
            buf[key.sample as usize] = Some(img);
            if buf.iter().all(Option::is_some) {
                let imgs: Vec<RgbImage> = buffers
                    .remove(slot)
                    .unwrap_or_default()
                    .into_iter()
                    .flatten()
                    .collect();
                let index = pending[*slot].index;
                write_identity(&req.out, index, &imgs)?;
                manifest.completed.push(index);
                manifest.completed.sort_unstable();
                write_json_atomic(&manifest_path, &manifest)?;
                on_event(GenerateEvent::IdentityDone { identity: index });
            }
        }
        if cancel.load(Ordering::SeqCst) {
            return Ok(GenerateOutcome::Cancelled {
                completed: manifest.completed.len(),
            });
        }
    }
    write_grid(&req.out, &manifest)?;
    manifest.status = "complete".into();
    write_json_atomic(&manifest_path, &manifest)?;
    Ok(GenerateOutcome::Complete)
}

fn prepare_out_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    // Probe writability up front so a read-only destination fails before any work.
    let probe = out.join(".idiff-write-test");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("output folder {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(&probe);
    // Leftovers of an interrupted run (an identity folder, a file being written) are
    // discarded.
    crate::files::remove_stale_temps(out);
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".partial-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

fn read_manifest(path: &Path) -> Result<Option<Manifest>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let m = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid manifest: {e}", path.display()))?;
    Ok(Some(m))
}

fn first_difference(a: &Generation, b: &Generation) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, v) in a {
            if b.get(k) != Some(v) {
                return format!("`{k}` differs");
            }
        }
    }
    "settings differ".into()
}

fn write_identity(out: &Path, identity: usize, images: &[RgbImage]) -> Result<()> {
    let final_dir = out.join(identity_dir_name(identity));
    let tmp = out.join(format!(".partial-{}", identity_dir_name(identity)));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    for (s, img) in images.iter().enumerate() {
        let p = tmp.join(sample_file_name(s));
        img.save(&p)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("cannot replace {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move {} into place", final_dir.display()))?;
    Ok(())
}

/// Most identities (rows) and samples (columns) shown in `grid.png`.
pub const GRID_MAX: usize = 16;

/// Composes `grid.png` from the first identities on disk (rows) and their first samples;
/// ProcFace identities' rows start with their reference render (see
/// [`crate::default_model::eval::procface_reference`]), scaled to the samples' size.
pub fn write_grid(out: &Path, manifest: &Manifest) -> Result<()> {
    let rows: Vec<usize> = manifest.completed.iter().copied().take(GRID_MAX).collect();
    let cols = manifest.generation.per_identity.min(GRID_MAX);
    let procface = matches!(
        manifest.generation.identities,
        IdentitySource::Procface { .. }
    );
    let mut tiles = Vec::new();
    for &id in &rows {
        let mut row = Vec::new();
        for s in 0..cols {
            let p = out.join(identity_dir_name(id)).join(sample_file_name(s));
            let img = image::open(&p).with_context(|| format!("cannot read {}", p.display()))?;
            row.push(img.to_rgb8());
        }
        let reference = procface.then(|| crate::default_model::eval::procface_reference(id));
        tiles.push(with_reference(row, reference.as_ref()));
    }
    if let Some(grid) = compose_grid(&tiles, 2) {
        let mut bytes = Vec::new();
        grid.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )?;
        crate::files::write_atomic(&out.join("grid.png"), &bytes)?;
    }
    Ok(())
}

/// `row` with `reference` (if any) scaled to its first image's size put in front: a grid
/// row that starts with who the identity is.
pub fn with_reference(mut row: Vec<RgbImage>, reference: Option<&RgbImage>) -> Vec<RgbImage> {
    if let (Some(reference), Some(first)) = (reference, row.first()) {
        let (w, h) = first.dimensions();
        row.insert(
            0,
            image::imageops::resize(reference, w, h, FilterType::Triangle),
        );
    }
    row
}

/// Lays out equally sized tiles in rows with a `gap`-pixel white border.
pub fn compose_grid(rows: &[Vec<RgbImage>], gap: u32) -> Option<RgbImage> {
    let first = rows.first()?.first()?;
    let (w, h) = first.dimensions();
    let cols = rows.iter().map(Vec::len).max()? as u32;
    let n_rows = rows.len() as u32;
    let mut grid = RgbImage::from_pixel(
        cols * (w + gap) + gap,
        n_rows * (h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let x = gap + c as u32 * (w + gap);
            let y = gap + r as u32 * (h + gap);
            image::imageops::replace(&mut grid, tile, x as i64, y as i64);
        }
    }
    Some(grid)
}
