//! `eval-default`: identity metrics of a default model with its own FR model.
//!
//! For `--identities` new identities × `--per-identity` samples (identities never seen in
//! training: ProcFace seeds from 2,000,000, whose FR centroids are the contexts, or uniform
//! random contexts), per sampling setting: genuine mean − impostor mean, EER (pyeer
//! definition), and the mean cosine between each context and the embeddings of its samples.

use super::assets::DefaultModel;
use super::diffusion_train::{centroid, fr_embeddings};
use crate::analysis::metrics::eer_stats;
use crate::diffusion::rng::ImageKey;
use crate::diffusion::sampler::{SamplerKind, SamplingSettings};
use crate::identity::uniform_contexts;
use crate::models::iresnet::IResNet;
use crate::pipeline::Pipeline;
use crate::procface::seeds::{procface_identity_seed, EVAL_FIRST_IDENTITY};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;

/// Where evaluation contexts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub enum ContextKind {
    /// FR centroid of two renders of a new ProcFace identity.
    Procface,
    /// Uniform random unit vectors (the studio's "random identities").
    Uniform,
    /// ProcFace training identities (seeds `0..n`, with their training contexts): measures
    /// what the U-Net learnt of seen faces, against new ones (the generalisation gap).
    ProcfaceSeen,
}

/// Arguments of `eval-default`.
#[derive(Debug, Clone, Args)]
pub struct EvalDefaultArgs {
    /// Model folder with the six default-model files; default: the built-in model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Number of new identities.
    #[arg(long, default_value_t = 200)]
    pub identities: usize,
    /// Samples per identity.
    #[arg(long, default_value_t = 16)]
    pub per_identity: usize,
    /// Context source.
    #[arg(long, value_enum, default_value = "procface")]
    pub contexts: ContextKind,
    /// DDIM steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Guidance scales to evaluate (at context dropout 0).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub guidance: Vec<f64>,
    /// Inference-time context dropouts to evaluate (at guidance 1).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5")]
    pub context_dropout: Vec<f64>,
    /// Images per forward batch.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Seed of the sampling noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// JSON report output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Metrics of one sampling setting.
#[derive(Debug, Clone, Serialize)]
pub struct SettingMetrics {
    /// Guidance scale.
    pub guidance: f64,
    /// Inference-time context dropout.
    pub context_dropout: f64,
    /// Mean genuine cosine similarity (all within-identity pairs).
    pub genuine_mean: f64,
    /// Mean impostor cosine similarity (all cross-identity pairs).
    pub impostor_mean: f64,
    /// genuine_mean − impostor_mean.
    pub separation: f64,
    /// Equal error rate.
    pub eer: f64,
    /// Mean cosine between a context and the embeddings of its own samples.
    pub context_cosine: f64,
    /// Wall time of sampling and embedding (s).
    pub wall_s: f64,
}

/// The contexts of evaluation identities `0..n`.
pub fn eval_contexts(
    kind: ContextKind,
    n: usize,
    fr: &IResNet,
    dim: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    match kind {
        ContextKind::Uniform => Ok(uniform_contexts(0, 0, n, dim)),
        ContextKind::Procface => procface_contexts(fr, EVAL_FIRST_IDENTITY, n, device),
        ContextKind::ProcfaceSeen => procface_contexts(fr, 0, n, device),
    }
}

/// Contexts of the ProcFace identities with seeds `first_seed..first_seed + n`: the
/// normalised FR centroid of two 64 × 64 renders (samples 0 and 1) of each, as in training;
/// each identity's context is the same whatever `first_seed` and `n` select it.
pub fn procface_contexts(
    fr: &IResNet,
    first_seed: u64,
    n: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let images: Vec<_> = (first_seed..first_seed + n as u64)
        .flat_map(|i| (0..2).map(move |s| crate::procface::render_sample(i, s, 64)))
        .collect();
    // One forward per identity, so that a context does not depend (even in the last bit)
    // on which other identities were asked for.
    let emb = fr_embeddings(fr, &images, device, 2)?;
    Ok(emb.chunks(2).map(centroid).collect())
}

/// Side of a ProcFace identity's reference render.
pub const REFERENCE_SIZE: u32 = 112;

/// The frontal, neutral render of new ProcFace identity `index` (seed
/// [`procface_identity_seed`]): the face its context was taken from, without pose, light or
/// accessories.
pub fn procface_reference(index: usize) -> image::RgbImage {
    use crate::procface::{render, FaceIdentity, Nuisance};
    render(
        &FaceIdentity::from_seed(procface_identity_seed(index)),
        &Nuisance::neutral(),
        REFERENCE_SIZE,
    )
}

/// Contexts for the built-in model of new ProcFace identities `first..first + n` (seeds
/// from [`EVAL_FIRST_IDENTITY`], never seen in training), by the built-in FR model: the
/// studio's and `generate --procface-identities`' identities with a known face.
pub fn builtin_procface_contexts(first: usize, n: usize) -> Result<Vec<Vec<f32>>> {
    anyhow::ensure!(
        super::assets::is_embedded(),
        "ProcFace identities need the built-in default model, which this build lacks"
    );
    let device = Device::Cpu;
    let fr = DefaultModel::embedded()?.fr_model(&device)?;
    procface_contexts(&fr, procface_identity_seed(first), n, &device)
}

/// Samples `per_identity` images of every context under `settings` and scores them.
pub fn evaluate_setting(
    pipeline: &Pipeline,
    fr: &IResNet,
    contexts: &[Vec<f32>],
    per_identity: usize,
    settings: &SamplingSettings,
    batch_size: usize,
) -> Result<SettingMetrics> {
    let t0 = std::time::Instant::now();
    let device = pipeline.device.clone();
    let keys: Vec<ImageKey> = (0..contexts.len() as u64)
        .flat_map(|i| {
            (0..per_identity as u64).map(move |s| ImageKey {
                identity: i,
                sample: s,
            })
        })
        .collect();
    let mut embeddings: Vec<Vec<f32>> = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(batch_size.max(1)) {
        let ctx: Vec<Vec<f32>> = chunk
            .iter()
            .map(|k| contexts[k.identity as usize].clone())
            .collect();
        let images = pipeline
            .generate_batch(&ctx, chunk, settings, &mut |_| true)?
            .context("sampling was cancelled")?;
        embeddings.extend(fr_embeddings(fr, &images, &device, 32)?);
    }
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() as f64;
    let (mut genuine, mut impostor) = (Vec::new(), Vec::new());
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            let s = dot(&embeddings[i], &embeddings[j]);
            if keys[i].identity == keys[j].identity {
                genuine.push(s);
            } else {
                impostor.push(s);
            }
        }
    }
    let ctx_cos: f64 = keys
        .iter()
        .zip(&embeddings)
        .map(|(k, e)| dot(&contexts[k.identity as usize], e))
        .sum::<f64>()
        / keys.len().max(1) as f64;
    let stats = eer_stats(&genuine, &impostor)?;
    Ok(SettingMetrics {
        guidance: settings.guidance,
        context_dropout: settings.context_dropout,
        genuine_mean: stats.gmean,
        impostor_mean: stats.imean,
        separation: stats.gmean - stats.imean,
        eer: stats.eer,
        context_cosine: ctx_cos,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

/// Runs `eval-default`.
pub fn run(a: &EvalDefaultArgs) -> Result<i32> {
    anyhow::ensure!(
        a.identities >= 2 && a.per_identity >= 2,
        "need at least 2 identities and 2 samples each"
    );
    let device = Device::Cpu;
    let model = match &a.model {
        Some(dir) => DefaultModel::from_dir(dir)?,
        None => DefaultModel::embedded()?,
    };
    let pipeline = model.pipeline(DType::F32, &device)?;
    let fr = model.fr_model(&device)?;
    let dim = model.unet_config.context_input_channels;
    let contexts = eval_contexts(a.contexts, a.identities, &fr, dim, &device)?;
    let mut settings_list: Vec<(f64, f64)> = a.guidance.iter().map(|&g| (g, 0.0)).collect();
    for &p in &a.context_dropout {
        if !settings_list.contains(&(1.0, p)) {
            settings_list.push((1.0, p));
        }
    }
    let mut rows = Vec::new();
    for (guidance, context_dropout) in settings_list {
        let settings = SamplingSettings {
            sampler: SamplerKind::Ddim {
                steps: a.steps,
                eta: 0.0,
            },
            guidance,
            context_dropout,
            seed: a.seed,
        };
        settings.validate()?;
        let m = evaluate_setting(
            &pipeline,
            &fr,
            &contexts,
            a.per_identity,
            &settings,
            a.batch_size,
        )?;
        eprintln!(
            "guidance {guidance} dropout {context_dropout}: gen {:.3} imp {:.3} sep {:.3} EER {:.3} ctx-cos {:.3} ({:.0}s)",
            m.genuine_mean, m.impostor_mean, m.separation, m.eer, m.context_cosine, m.wall_s
        );
        rows.push(m);
    }
    let report = serde_json::json!({
        "model": model.origin,
        "identities": a.identities,
        "per_identity": a.per_identity,
        "contexts": a.contexts,
        "ddim_steps": a.steps,
        "seed": a.seed,
        "settings": rows,
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &a.out {
        Some(p) => crate::files::write_atomic(p, text.as_bytes())?,
        None => println!("{text}"),
    }
    Ok(0)
}
