//! Handlers of the `analyze` and `metrics` subcommands.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::{Dtype, SafeTensors};

use super::embed::{default_cache_dir, embed_folder, EmbedOptions, Embeddings, FrModel};
use super::metrics::{eer_stats, read_scores, EerStats};
use super::output::write_report_dir;
use super::report::{analyze, HistogramBackend, ReferenceSet, Report, ReportOptions};

/// File the `analyze` command writes the embeddings to (re-usable with `--embeddings`).
pub const EMBEDDINGS_FILE: &str = "embeddings.safetensors";

/// Arguments of `analyze`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["images", "embeddings"])))]
pub struct AnalyzeArgs {
    /// ImageFolder dataset (`DIR/<identity>/<image>`) to embed with --fr-model (default:
    /// the built-in default model's FR backbone).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Precomputed embeddings (safetensors: `embeddings` [N, D], `labels` [N]).
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Face-recognition IResNet weights (.pth / .pt / safetensors).
    #[arg(long)]
    pub fr_model: Option<PathBuf>,
    /// IResNet config (JSON/YAML); default: read off the weights.
    #[arg(long)]
    pub fr_config: Option<PathBuf>,
    /// Embed as f(x) + f(flip(x)).
    #[arg(long)]
    pub flip: bool,
    /// Most impostor scores kept for the metrics; more cross pairs are sampled.
    #[arg(long, default_value_t = 1_000_000)]
    pub impostor_samples: usize,
    /// Seed of the impostor sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Reference embeddings for the leakage check (.npy, safetensors, context pickle).
    #[arg(long)]
    pub reference_embeddings: Option<PathBuf>,
    /// Flag identities whose best reference similarity exceeds this.
    #[arg(long, default_value_t = 0.5)]
    pub leak_threshold: f64,
    /// Outlier when the centroid similarity is below mean - SIGMA * std.
    #[arg(long, default_value_t = 2.0)]
    pub outlier_sigma: f64,
    /// Outlier also when the centroid similarity is below this.
    #[arg(long)]
    pub outlier_threshold: Option<f64>,
    /// Histogram bins over [-1, 1].
    #[arg(long, default_value_t = 100)]
    pub bins: usize,
    /// Compute the all-pairs histogram with the wgpu compute shader.
    #[arg(long)]
    pub gpu: bool,
    /// Device of the FR model: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Embedding cache folder (default: $IDIFF_CACHE_DIR or ~/.cache/idiff-studio/embeddings).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Do not read or write the embedding cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Detect each image's face and align it to the InsightFace 112 × 112 template before
    /// embedding (images without a detected face are embedded whole and counted).
    #[arg(long)]
    pub align: bool,
    /// Folder with the detector `fr_detect.onnx` and landmarks `fr_landmark.onnx` for
    /// --align (default: the model cache, $IDIFF_MODELS or ~/.cache/idiff-studio/models).
    #[arg(long)]
    pub face_models: Option<PathBuf>,
    /// Report folder.
    #[arg(long)]
    pub out: PathBuf,
}

impl AnalyzeArgs {
    /// The report settings these arguments ask for.
    pub fn report_options(&self) -> ReportOptions {
        ReportOptions {
            impostor_samples: self.impostor_samples,
            seed: self.seed,
            bins: self.bins,
            outlier_sigma: self.outlier_sigma,
            outlier_threshold: self.outlier_threshold,
            leak_threshold: self.leak_threshold,
            backend: if self.gpu {
                HistogramBackend::Gpu
            } else {
                HistogramBackend::Cpu
            },
        }
    }
}

/// Runs `analyze`; returns the exit code.
///
/// # Errors
/// On unreadable inputs, model failures or unwritable outputs (one line each).
pub fn run_analyze(a: &AnalyzeArgs) -> Result<i32> {
    let start = Instant::now();
    let emb = match (&a.images, &a.embeddings) {
        (Some(dir), _) => match &a.fr_model {
            Some(weights) => embed_images(a, dir, weights)?,
            None => {
                let (weights, config) = crate::default_model::assets::default_fr_paths()
                    .context("--images without --fr-model needs the built-in default model")?;
                let with_default = AnalyzeArgs {
                    fr_config: Some(a.fr_config.clone().unwrap_or(config)),
                    ..a.clone()
                };
                embed_images(&with_default, dir, &weights)?
            }
        },
        (None, Some(file)) => Embeddings::load(file)?,
        (None, None) => bail!("give --images DIR or --embeddings FILE"),
    };
    let reference = a
        .reference_embeddings
        .as_deref()
        .map(|p| ReferenceSet::load(p, emb.dim))
        .transpose()?;
    let mut report = analyze(&emb, reference.as_ref(), &a.report_options())?;
    if let Some(contexts) = a
        .images
        .as_deref()
        .and_then(|d| generated_contexts(d, &emb))
    {
        // Contexts of another FR model (another width) cannot be compared: a note, no error.
        if let Err(e) = report.score_contexts(&emb, &contexts) {
            eprintln!("note: contexts not scored: {e:#}");
        }
    }
    let mut written = write_report_dir(&report, &a.out)?;
    if a.images.is_some() {
        let p = a.out.join(EMBEDDINGS_FILE);
        emb.save(&p)?;
        written.push(p);
    }
    emit(&summary(&report, start.elapsed().as_secs_f64()));
    let names: Vec<String> = written
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    emit(&format!(
        "wrote {}: {}\n",
        a.out.display(),
        names.join(", ")
    ));
    Ok(0)
}

/// The contexts of `emb`'s identities when `dir` is a `generate` output (its `manifest.json`
/// says how to rebuild them); `None` for other folders, or with a note when they cannot be
/// rebuilt (e.g. a moved context file).
fn generated_contexts(dir: &Path, emb: &Embeddings) -> Option<Vec<Vec<f32>>> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).ok()?;
    let manifest: crate::generate::Manifest = serde_json::from_str(&text).ok()?;
    let width = manifest.generation.unet_config.context_input_channels;
    let identities = match manifest.generation.identities.resolve(width) {
        Ok(ids) => ids,
        Err(e) => {
            eprintln!("note: contexts not scored: {e:#}");
            return None;
        }
    };
    let by_folder: std::collections::HashMap<String, Vec<f32>> = identities
        .into_iter()
        .map(|i| (crate::generate::identity_dir_name(i.index), i.context))
        .collect();
    emb.identities
        .iter()
        .map(|name| by_folder.get(name).cloned())
        .collect()
}

fn embed_images(a: &AnalyzeArgs, dir: &Path, weights: &Path) -> Result<Embeddings> {
    let device = crate::pipeline::parse_device(&a.device)?;
    let mut model = FrModel::load(weights, a.fr_config.as_deref(), &device)?;
    if a.align {
        let dir = a
            .face_models
            .clone()
            .unwrap_or_else(crate::onnx::models_dir);
        model = model.with_alignment(crate::onnx::detect::FaceDetector::from_dir(&dir)?);
    }
    let opts = EmbedOptions {
        flip: a.flip,
        batch_size: a.batch_size.max(1),
        cache_dir: if a.no_cache {
            None
        } else {
            a.cache_dir.clone().or_else(default_cache_dir)
        },
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} embedding {bar:40} {pos}/{len} images {msg}")
            .context("progress template")?,
    );
    let emb = embed_folder(
        dir,
        &model,
        &opts,
        &mut |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            if p.cached > 0 {
                bar.set_message(format!("({} cached)", p.cached));
            }
        },
        None,
    )?;
    bar.finish_and_clear();
    if model.aligns() {
        eprintln!(
            "aligned to the 112 x 112 template; {} of {} images without a detected face were embedded whole",
            model.unaligned_count(),
            emb.len()
        );
    }
    Ok(emb)
}

/// Writes to stdout, ignoring a closed pipe (e.g. `| head`).
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Human-readable summary of a report (several lines).
pub fn summary(r: &Report, seconds: f64) -> String {
    let mut s = format!(
        "analyzed {} images of {} identities (dim {}) in {seconds:.1} s\n",
        r.images, r.identities, r.dim
    );
    s += &format!(
        "genuine pairs {}, impostor pairs {} ({})\n",
        r.genuine_pairs,
        r.impostor_pairs,
        if r.impostor_sampled {
            format!("{} sampled, seed {}", r.impostor_scored, r.options.seed)
        } else {
            "all scored".to_owned()
        }
    );
    match &r.metrics {
        Some(m) => {
            s += &format!(
                "EER {:.3} % at threshold {:.4}; FNMR@FMR1% {:.4}, FNMR@FMR0.1% {:.4}; AUC {:.5}; d' {:.3}\n",
                m.eer * 100.0,
                m.eer_threshold,
                m.fmr100,
                m.fmr1000,
                m.auc,
                m.decidability
            );
            s += &format!(
                "genuine {:.4} ± {:.4}, impostor {:.4} ± {:.4}\n",
                m.gmean, m.gstd, m.imean, m.istd
            );
        }
        None => s += "no metrics: need at least one genuine and one impostor pair\n",
    }
    if let Some(c) = r.context_cosine {
        s += &format!(
            "context cosine {c:.4} (images against the contexts they were generated from)\n"
        );
    }
    s += &format!(
        "histogram ({} bins, {} pairs) on {}\n",
        r.histogram.bins(),
        r.histogram.total(),
        r.histogram_device
    );
    let with_outliers = r
        .per_identity
        .iter()
        .filter(|p| !p.outliers.is_empty())
        .count();
    s += &format!(
        "outliers: {} samples in {with_outliers} identities\n",
        r.outlier_count()
    );
    if let Some(l) = &r.leakage {
        s += &format!(
            "leakage: {} of {} identities above {} (max similarity {:.4}, {} reference rows)\n",
            l.flagged, r.identities, l.threshold, l.max_similarity, l.reference_rows
        );
    }
    s
}

/// Arguments of `metrics`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["genuine", "scores"])))]
pub struct MetricsArgs {
    /// Genuine scores (pyeer text file: one score per line).
    #[arg(long, requires = "impostor")]
    pub genuine: Option<PathBuf>,
    /// Impostor scores (pyeer text file).
    #[arg(long, requires = "genuine")]
    pub impostor: Option<PathBuf>,
    /// One safetensors file with float tensors `genuine` and `impostor`.
    #[arg(long, conflicts_with_all = ["genuine", "impostor"])]
    pub scores: Option<PathBuf>,
    /// Read `<PREFIX>.genuine` / `<PREFIX>.impostor` from --scores.
    #[arg(long, requires = "scores")]
    pub prefix: Option<String>,
    /// Print JSON (keys eer, eer_threshold, fmr100, fmr1000, fmr0, auc, gmean, gstd,
    /// imean, istd, decidability, fdr).
    #[arg(long)]
    pub json: bool,
}

/// Runs `metrics`; returns the exit code.
///
/// # Errors
/// On unreadable or empty score lists (one line).
pub fn run_metrics(a: &MetricsArgs) -> Result<i32> {
    let (g, i) = match (&a.scores, &a.genuine, &a.impostor) {
        (Some(file), _, _) => read_score_tensors(file, a.prefix.as_deref())?,
        (None, Some(g), Some(i)) => (read_scores(g)?, read_scores(i)?),
        _ => bail!("give --genuine G --impostor I, or --scores FILE"),
    };
    let stats = eer_stats(&g, &i)?;
    if a.json {
        emit(&(serde_json::to_string_pretty(&stats)? + "\n"));
    } else {
        emit(&metrics_text(&stats, g.len(), i.len()));
    }
    Ok(0)
}

/// The statistics as aligned text lines.
pub fn metrics_text(m: &EerStats, genuine: usize, impostor: usize) -> String {
    format!(
        "genuine scores   {genuine}\nimpostor scores  {impostor}\n\
         EER              {:.6} ({:.3} %)\nEER threshold    {:.6}\n\
         FMR100 (FNMR)    {:.6}\nFMR1000 (FNMR)   {:.6}\nFMR0 (FNMR)      {:.6}\n\
         AUC              {:.6}\ngenuine mean/std {:.6} / {:.6}\n\
         impostor mean/std {:.6} / {:.6}\ndecidability d'  {:.6}\nFDR              {:.6}\n",
        m.eer,
        m.eer * 100.0,
        m.eer_threshold,
        m.fmr100,
        m.fmr1000,
        m.fmr0,
        m.auc,
        m.gmean,
        m.gstd,
        m.imean,
        m.istd,
        m.decidability,
        m.fdr
    )
}

/// Reads `genuine` / `impostor` (optionally prefixed `<p>.`) float tensors as f64.
///
/// # Errors
/// When the file or a tensor is missing or not a float tensor.
pub fn read_score_tensors(path: &Path, prefix: Option<&str>) -> Result<(Vec<f64>, Vec<f64>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let get = |name: &str| -> Result<Vec<f64>> {
        let key = match prefix {
            Some(p) => format!("{p}.{name}"),
            None => name.to_owned(),
        };
        let t = st.tensor(&key).map_err(|_| {
            let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
            names.sort();
            anyhow!(
                "{}: no tensor `{key}` (has {}; use --prefix)",
                path.display(),
                names.join(", ")
            )
        })?;
        let d = t.data();
        Ok(match t.dtype() {
            Dtype::F64 => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => super::embed::float_values(&t)?
                .into_iter()
                .map(f64::from)
                .collect(),
            other => bail!(
                "{}: tensor `{key}` has dtype {other:?}, expected a float type",
                path.display()
            ),
        })
    };
    Ok((get("genuine")?, get("impostor")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_tensors_with_prefix_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        let g: Vec<u8> = [0.9f64, 0.8].iter().flat_map(|v| v.to_le_bytes()).collect();
        let i: Vec<u8> = [0.1f32, 0.85]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = safetensors::serialize(
            [
                (
                    "x.genuine",
                    safetensors::tensor::TensorView::new(Dtype::F64, vec![2], &g).unwrap(),
                ),
                (
                    "x.impostor",
                    safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &i).unwrap(),
                ),
            ],
            None,
        )
        .unwrap();
        std::fs::write(&p, bytes).unwrap();
        let (g, i) = read_score_tensors(&p, Some("x")).unwrap();
        assert_eq!(g, vec![0.9, 0.8]);
        assert_eq!(i, vec![f64::from(0.1f32), f64::from(0.85f32)]);
        let e = read_score_tensors(&p, None).unwrap_err().to_string();
        assert!(
            e.contains("no tensor `genuine`") && e.contains("x.genuine"),
            "{e}"
        );
        let m = eer_stats(&g, &i).unwrap();
        let text = metrics_text(&m, 2, 2);
        assert!(
            text.contains("EER ") && text.lines().count() == 12,
            "{text}"
        );
    }
}
