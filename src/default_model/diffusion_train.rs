//! `train-diffusion`: the identity-conditioned U-Net on VQ latents of ProcFace images,
//! conditioned on the default FR model's normalised embeddings.
//!
//! ε-prediction MSE on the reference T = 1000 linear schedule, AdamW, an EMA of the weights,
//! CPD (element-wise inverted dropout on the projected context) and whole-context dropout to
//! the empty context (zeros), which trains the unconditional branch that guidance needs.
//! Checkpoints (`unet_train.safetensors`: weights, EMA, optimiser) are written atomically
//! every `--save-every` steps and on Ctrl-C; running the same command again resumes.

use super::data::{images_to_tensor, FaceSet};
use super::optim::{self, AdamW, AdamWConfig, Ema};
use crate::diffusion::schedule::Schedule;
use crate::kernels::gemm::{on_pool, one_thread_per_kernel};
use crate::models::iresnet::{normalise, IResNet, IResNetConfig};
use crate::models::unet::{ConditionalUNet, Prediction, UNetConfig};
use crate::models::vq::{VqConfig, VqEncoder};
use crate::nn::layers::{current_kernels, with_kernels, TrainKernels};
use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Arguments of `train-diffusion`.
#[derive(Debug, Clone, Args)]
pub struct TrainDiffusionArgs {
    /// Run folder: `data.safetensors` (latent/context cache), `unet_train.safetensors`
    /// (resumed when present), `unet.safetensors` (EMA weights), `unet.json`, `log.jsonl`.
    #[arg(long)]
    pub out: PathBuf,
    /// VQ weights (`vq.safetensors` with `encoder.*`, `quant_conv.*`).
    #[arg(long, default_value = "assets/default/vq.safetensors")]
    pub vq: PathBuf,
    /// VQ config JSON.
    #[arg(long, default_value = "assets/default/vq.json")]
    pub vq_config: PathBuf,
    /// FR backbone weights.
    #[arg(long, default_value = "assets/default/fr.safetensors")]
    pub fr: PathBuf,
    /// FR config JSON (`layers`, `num_features`).
    #[arg(long, default_value = "assets/default/fr.json")]
    pub fr_config: PathBuf,
    /// ProcFace identity seeds 0..N used for training.
    #[arg(long, default_value_t = 1000)]
    pub identities: u64,
    /// Training images per identity.
    #[arg(long, default_value_t = 8)]
    pub per_identity: u64,
    /// Images per identity whose FR embeddings are averaged into the identity's context.
    #[arg(long, default_value_t = 2)]
    pub embed_per_identity: u64,
    /// Image size (must match the VQ).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// U-Net base channels (multiple of 32).
    #[arg(long, default_value_t = 32)]
    pub initial_channels: usize,
    /// Cumulative channel multipliers per level.
    #[arg(long, value_delimiter = ',', default_value = "1,2,2")]
    pub channel_multipliers: Vec<usize>,
    /// Levels with attention (same length as the multipliers).
    #[arg(long, value_delimiter = ',', default_value = "false,true,true")]
    pub is_attention: Vec<bool>,
    /// Residual blocks per level.
    #[arg(long, default_value_t = 1)]
    pub n_blocks: usize,
    /// Width of the projected context (multiple of 32).
    #[arg(long, default_value_t = 64)]
    pub context_channels: usize,
    /// CPD probability (element-wise dropout on the projected context).
    #[arg(long, default_value_t = 0.25)]
    pub cpd: f64,
    /// Probability of replacing a whole context by the empty context.
    #[arg(long, default_value_t = 0.1)]
    pub uncond: f64,
    /// Latents per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Total optimiser steps (including resumed ones).
    #[arg(long, default_value_t = 20000)]
    pub steps: usize,
    /// Stop (and save) after this many minutes of wall time in this run.
    #[arg(long)]
    pub minutes: Option<f64>,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// EMA decay.
    #[arg(long, default_value_t = 0.999)]
    pub ema: f64,
    /// Min-SNR-γ loss weighting (Hang et al. 2023): each sample's MSE is weighted by
    /// `min(SNR_t, γ) / SNR_t` (ε-prediction) or `min(SNR_t, γ) / (SNR_t + 1)`
    /// (v-prediction), which stops the easy low-noise steps from dominating.
    /// 0 = plain MSE (the reference's, for ε).
    #[arg(long, default_value_t = 0.0)]
    pub min_snr_gamma: f64,
    /// What the network learns to predict: `eps` (the reference) or `v`
    /// (v = √ᾱ·ε − √(1−ᾱ)·x₀; recorded in `unet.json`, the samplers convert it to ε).
    #[arg(long, default_value = "eps")]
    pub prediction: Prediction,
    /// Start a new run (no checkpoint in `--out` yet) from these U-Net weights (e.g. a
    /// previous run's EMA `unet.safetensors`, any float dtype) instead of a random
    /// initialisation; the optimiser starts fresh and the EMA starts at these weights.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Save a checkpoint every N steps.
    #[arg(long, default_value_t = 200)]
    pub save_every: usize,
    /// RNG seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Device: cpu or cuda:N (a `cuda` build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Instead of training: time this many optimiser steps of the configured U-Net on
    /// random data with the fused CPU layers and with the composed baseline (nothing is
    /// written; `--out` is not read).
    #[arg(long)]
    pub bench_steps: Option<usize>,
    /// Instead of training: write `--out`'s EMA weights in f16 and its `unet.json` into this
    /// folder (how `assets/default/unet.*` is made; half the size, same architecture).
    #[arg(long)]
    pub export_f16: Option<PathBuf>,
}

impl TrainDiffusionArgs {
    /// The U-Net architecture for a context of width `context_input`.
    pub fn unet_config(&self, context_input: usize, latent_size: usize) -> UNetConfig {
        UNetConfig {
            initial_channels: self.initial_channels,
            channel_multipliers: self.channel_multipliers.clone(),
            is_attention: self.is_attention.clone(),
            attention_heads: -1,
            attention_head_channels: 32,
            n_blocks_per_resolution: self.n_blocks,
            context_input_channels: context_input,
            context_channels: self.context_channels,
            input_channels: 3,
            context_dropout_probability: self.cpd,
            condition_type: "CA".to_owned(),
            latent_size,
            prediction: self.prediction,
        }
    }
}

/// One training batch.
pub struct DiffusionBatch {
    /// Clean latents `(B, 3, h, w)`.
    pub x0: Tensor,
    /// Raw contexts `(B, context_input_channels)`.
    pub ctx: Tensor,
    /// Diffusion steps in `0..T`.
    pub t: Vec<usize>,
    /// The noise ε to predict, shaped like `x0`.
    pub noise: Tensor,
    /// Whole-context dropout mask per row (0 = the empty context, 1 = keep).
    pub keep: Vec<f32>,
}

impl DiffusionBatch {
    /// The `n` rows from `start`.
    fn part(&self, start: usize, n: usize) -> Result<Self> {
        Ok(Self {
            x0: self.x0.narrow(0, start, n)?,
            ctx: self.ctx.narrow(0, start, n)?,
            t: self.t[start..start + n].to_vec(),
            noise: self.noise.narrow(0, start, n)?,
            keep: self.keep[start..start + n].to_vec(),
        })
    }
}

/// Images per part of a training batch on the CPU (see [`TrainableUNet::loss_and_grads`]).
pub const TRAIN_PART: usize = 16;

/// A trainable U-Net on its own `VarMap`.
pub struct TrainableUNet {
    /// The parameters.
    pub varmap: VarMap,
    /// The network.
    pub unet: ConditionalUNet,
}

impl TrainableUNet {
    /// Fresh randomly initialised weights.
    pub fn new(cfg: &UNetConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let unet = ConditionalUNet::new(vb, cfg)?;
        Ok(Self { varmap, unet })
    }

    /// The MSE of one batch against the network's target (ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀, by
    /// the config's `prediction`) with CPD probability `cpd`; with `min_snr_gamma > 0` each
    /// sample is weighted by `min(SNR_t, γ) / SNR_t` (ε) or `min(SNR_t, γ) / (SNR_t + 1)` (v).
    pub fn loss(
        &self,
        schedule: &Schedule,
        batch: &DiffusionBatch,
        cpd: f64,
        min_snr_gamma: f64,
    ) -> Result<Tensor> {
        self.part_loss(schedule, batch, cpd, min_snr_gamma, batch.t.len())
    }

    /// The loss and the gradients of one batch: on the CPU the batch is cut into parts of
    /// [`TRAIN_PART`] images whose losses and gradients are computed side by side (one thread
    /// each, the whole chain of forward and backward ops per part) and summed in part order,
    /// so the result does not depend on the number of threads; elsewhere one pass.
    pub fn loss_and_grads(
        &self,
        schedule: &Schedule,
        batch: &DiffusionBatch,
        cpd: f64,
        min_snr_gamma: f64,
    ) -> Result<(f64, GradStore)> {
        let b = batch.t.len();
        let part = |start: usize, n: usize| -> Result<(f64, GradStore)> {
            let part = batch.part(start, n)?;
            let loss = self.part_loss(schedule, &part, cpd, min_snr_gamma, b)?;
            let grads = loss.backward()?;
            Ok((f64::from(loss.to_scalar::<f32>()?), grads))
        };
        if !batch.x0.device().is_cpu() || b <= TRAIN_PART {
            return part(0, b);
        }
        use rayon::prelude::*;
        let kernels = current_kernels();
        let parts = (0..b)
            .step_by(TRAIN_PART)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|start| {
                with_kernels(kernels, || {
                    one_thread_per_kernel(|| part(start, TRAIN_PART.min(b - start)))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let loss = parts.iter().map(|(l, _)| l).sum();
        let vars = self.varmap.all_vars();
        let mut parts = parts.into_iter().map(|(_, g)| g);
        let mut grads = parts.next().expect("a batch has at least one part");
        let rest: Vec<GradStore> = parts.collect();
        let sums = vars
            .par_iter()
            .map(|v| {
                let Some(first) = grads.get(v) else {
                    return Ok(None);
                };
                let mut sum = first.clone();
                for g in rest.iter().filter_map(|g| g.get(v)) {
                    sum = (sum + g)?;
                }
                Ok(Some(sum))
            })
            .collect::<Result<Vec<_>>>()?;
        for (v, sum) in vars.iter().zip(sums) {
            if let Some(sum) = sum {
                grads.insert(v, sum);
            }
        }
        Ok((loss, grads))
    }

    /// The summed, weighted per-sample losses of `batch` divided by `total`: the loss of a
    /// batch of `total` images when `batch` is all of it, its share of that loss otherwise.
    fn part_loss(
        &self,
        schedule: &Schedule,
        batch: &DiffusionBatch,
        cpd: f64,
        min_snr_gamma: f64,
        total: usize,
    ) -> Result<Tensor> {
        let DiffusionBatch {
            x0,
            ctx,
            t,
            noise,
            keep,
        } = batch;
        let b = x0.dim(0)?;
        let dev = x0.device();
        let sa: Vec<f32> = t.iter().map(|&s| schedule.alpha_bars[s].sqrt()).collect();
        let sb: Vec<f32> = t
            .iter()
            .map(|&s| (1.0 - schedule.alpha_bars[s]).sqrt())
            .collect();
        let sa = Tensor::from_vec(sa, (b, 1, 1, 1), dev)?;
        let sb = Tensor::from_vec(sb, (b, 1, 1, 1), dev)?;
        let xt = (x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?;
        let mut c = self.unet.project_context(ctx)?;
        if cpd > 0.0 {
            c = candle_nn::ops::dropout(&c, cpd as f32)?;
        }
        let keep = Tensor::from_vec(keep.clone(), (b, 1), dev)?;
        let c = c.broadcast_mul(&keep)?;
        let tt = Tensor::from_vec(t.iter().map(|&s| s as i64).collect::<Vec<_>>(), b, dev)?;
        let out = self.unet.forward_projected(&xt, &tt, &c)?;
        let prediction = self.unet.config().prediction;
        let target = match prediction {
            Prediction::Eps => noise.clone(),
            Prediction::V => (noise.broadcast_mul(&sa)? - x0.broadcast_mul(&sb)?)?,
        };
        let per_sample = (out - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        let share = |x: Tensor| -> Result<Tensor> { Ok((x.sum_all()? / total as f64)?) };
        if min_snr_gamma <= 0.0 {
            return share(per_sample);
        }
        let w: Vec<f32> = t
            .iter()
            .map(|&s| {
                let ab = f64::from(schedule.alpha_bars[s]);
                let snr = ab / (1.0 - ab);
                let denominator = match prediction {
                    Prediction::Eps => snr,
                    Prediction::V => snr + 1.0,
                };
                (snr.min(min_snr_gamma) / denominator) as f32
            })
            .collect();
        let w = Tensor::from_vec(w, b, dev)?;
        share((per_sample * w)?)
    }
}

/// L2-normalised FR embeddings of RGB images (resized to the FR input size, [-1, 1]).
pub fn fr_embeddings(
    fr: &IResNet,
    images: &[image::RgbImage],
    device: &Device,
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(batch.max(1)) {
        let x = images_to_tensor(chunk, fr.input_size() as u32, device)?;
        let e = normalise(&fr.forward(&x)?)?;
        out.extend(e.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Normalised mean of unit vectors.
pub fn centroid(rows: &[Vec<f32>]) -> Vec<f32> {
    let d = rows.first().map_or(0, |r| r.len());
    let mut m = vec![0f32; d];
    for r in rows {
        for (a, b) in m.iter_mut().zip(r) {
            *a += b;
        }
    }
    let n = m.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    m.iter().map(|x| x / n).collect()
}

/// Loads the FR model from a weights file and its JSON config.
pub fn load_fr(weights: &Path, config: &Path, device: &Device) -> Result<IResNet> {
    let cfg = IResNetConfig::from_json_file(config)?;
    IResNet::load(weights, &cfg, device)
}

/// The cached training set: latents, per-identity contexts and labels.
pub struct LatentSet {
    /// `(N, 3, h, w)` VQ latents (unquantised, as the reference trains on).
    pub latents: Tensor,
    /// `(identities, d)` contexts.
    pub contexts: Tensor,
    /// Identity index of each latent.
    pub labels: Vec<u32>,
}

fn prepare(a: &TrainDiffusionArgs, device: &Device) -> Result<LatentSet> {
    let cache = a.out.join("data.safetensors");
    if cache.exists() {
        let t = candle_core::safetensors::load(&cache, device)?;
        let get = |k: &str| {
            t.get(k)
                .cloned()
                .with_context(|| format!("{} lacks `{k}`", cache.display()))
        };
        let labels = get("labels")?.to_vec1::<u32>()?;
        eprintln!("loaded the latent cache {}", cache.display());
        return Ok(LatentSet {
            latents: get("latents")?,
            contexts: get("contexts")?,
            labels,
        });
    }
    let t0 = Instant::now();
    let vq_cfg: VqConfig = VqConfig::from_json_file(&a.vq_config)?;
    let encoder = VqEncoder::load(&a.vq, &vq_cfg, device)?;
    let fr = load_fr(&a.fr, &a.fr_config, device)?;
    let data = FaceSet::render(0..a.identities, a.per_identity, a.size)?;
    eprintln!(
        "rendered {} images in {:.1}s",
        data.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut latents = Vec::new();
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(64) {
        latents.push(encoder.encode(&data.batch(chunk, device)?)?);
    }
    let latents = Tensor::cat(&latents, 0)?;
    eprintln!("encoded latents in {:.1}s", t0.elapsed().as_secs_f64());
    let k = a.embed_per_identity.clamp(1, a.per_identity) as usize;
    let per = a.per_identity as usize;
    let mut contexts = Vec::with_capacity(a.identities as usize);
    let ids: Vec<usize> = (0..a.identities as usize).collect();
    for group in ids.chunks(32) {
        let images: Vec<_> = group
            .iter()
            .flat_map(|&i| (0..k).map(move |s| i * per + s))
            .map(|j| data.image(j))
            .collect();
        let emb = fr_embeddings(&fr, &images, device, 64)?;
        contexts.extend(emb.chunks(k).map(centroid));
        eprintln!(
            "contexts: {}/{} identities ({:.1}s)",
            contexts.len(),
            a.identities,
            t0.elapsed().as_secs_f64()
        );
    }
    let d = contexts.first().map_or(0, |c| c.len());
    let contexts = Tensor::from_vec(contexts.concat(), (a.identities as usize, d), device)?;
    let labels: Vec<u32> = data.labels.iter().map(|&l| l as u32).collect();
    let mut t = HashMap::new();
    t.insert("latents".to_owned(), latents.clone());
    t.insert("contexts".to_owned(), contexts.clone());
    t.insert(
        "labels".to_owned(),
        Tensor::from_vec(labels.clone(), labels.len(), device)?,
    );
    optim::save_atomic(&t, &cache)?;
    Ok(LatentSet {
        latents,
        contexts,
        labels,
    })
}

/// Runs `train-diffusion`; returns the exit code (130 when cancelled).
pub fn run(a: &TrainDiffusionArgs) -> Result<i32> {
    if let Some(steps) = a.bench_steps {
        bench_steps(a, steps)?;
        return Ok(0);
    }
    if let Some(dest) = &a.export_f16 {
        export_f16(&a.out, dest, &Device::Cpu)?;
        return Ok(0);
    }
    let device = crate::pipeline::parse_device(&a.device)?;
    anyhow::ensure!(a.batch_size > 0, "batch size must be positive");
    anyhow::ensure!(
        (0.0..1.0).contains(&a.cpd) && (0.0..1.0).contains(&a.uncond),
        "--cpd and --uncond must be in [0, 1)"
    );
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    crate::files::remove_stale_temps(&a.out);
    let set = prepare(a, &device)?;
    let (n, _, h, _) = set.latents.dims4()?;
    let d = set.contexts.dim(1)?;
    let cfg = a.unet_config(d, h);
    std::fs::write(a.out.join("unet.json"), serde_json::to_string_pretty(&cfg)?)?;
    let std = set
        .latents
        .flatten_all()?
        .var_keepdim(0)?
        .sqrt()?
        .to_vec1::<f32>()?[0];
    eprintln!("{n} latents {h}x{h}, context width {d}, latent std {std:.3}");

    let model = TrainableUNet::new(&cfg, &device)?;
    let vars = optim::named_vars(&model.varmap);
    let nparams: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!("U-Net: {} tensors, {nparams} parameters", vars.len());
    let mut opt = optimiser(&vars, a)?;
    let ckpt = a.out.join("unet_train.safetensors");
    if let Some(init) = a.init_from.as_ref().filter(|_| !ckpt.exists()) {
        let saved = candle_core::safetensors::load(init, &device)
            .map_err(|e| anyhow::anyhow!("{}: {e}", init.display()))?;
        optim::load_vars(&vars, &saved).with_context(|| init.display().to_string())?;
        eprintln!("initialised from {}", init.display());
    }
    let mut ema = Ema::new(&vars, a.ema)?;
    let mut rng = ChaCha20Rng::seed_from_u64(a.seed);
    if ckpt.exists() {
        let saved = candle_core::safetensors::load(&ckpt, &device)?;
        optim::load_vars(&vars, &saved)?;
        opt.load_state(&saved)?;
        let ema_saved: HashMap<String, Tensor> = saved
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("ema.").map(|k| (k.to_owned(), v.clone())))
            .collect();
        ema.load(&ema_saved)?;
        rng = ChaCha20Rng::seed_from_u64(a.seed ^ (opt.step as u64).wrapping_mul(0x9E37_79B9));
        eprintln!("resumed {} at step {}", ckpt.display(), opt.step);
    }
    let schedule = Schedule::reference();
    let first_step = opt.step;
    let cancel = optim::cancel_flag();
    let start = Instant::now();
    let deadline = a.minutes.map(|m| m * 60.0);
    let mut log = String::new();
    let mut last_log = Instant::now();
    let mut running = 0f64;
    let mut running_n = 0usize;
    let mut interrupted = false;
    while opt.step < a.steps {
        if cancel.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        if deadline.is_some_and(|dl| start.elapsed().as_secs_f64() > dl) {
            break;
        }
        let idx: Vec<u32> = (0..a.batch_size)
            .map(|_| rng.random_range(0..n as u32))
            .collect();
        let lab: Vec<u32> = idx.iter().map(|&i| set.labels[i as usize]).collect();
        let it = Tensor::from_vec(idx, a.batch_size, &device)?;
        let lt = Tensor::from_vec(lab, a.batch_size, &device)?;
        let x0 = set.latents.index_select(&it, 0)?;
        let ctx = set.contexts.index_select(&lt, 0)?;
        let t: Vec<usize> = (0..a.batch_size)
            .map(|_| rng.random_range(0..schedule.len()))
            .collect();
        let keep: Vec<f32> = (0..a.batch_size)
            .map(|_| {
                if rng.random::<f64>() < a.uncond {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let noise = x0.randn_like(0.0, 1.0)?;
        let batch = DiffusionBatch {
            x0,
            ctx,
            t,
            noise,
            keep,
        };
        let (loss, gn) = train_step(&model, &mut opt, &mut ema, &schedule, &batch, a)?;
        running += loss;
        running_n += 1;
        let step = opt.step;
        if step % 50 == 0 {
            let line = serde_json::json!({
                "step": step,
                "loss": running / running_n as f64,
                "grad_norm": gn,
                "elapsed_s": start.elapsed().as_secs_f64(),
            });
            log.push_str(&format!("{line}\n"));
        }
        if last_log.elapsed().as_secs_f64() > 60.0 || step == 1 {
            eprintln!(
                "step {step}: loss {:.4} |g| {gn:.3} ({:.2}s/step)",
                running / running_n as f64,
                start.elapsed().as_secs_f64() / (step - first_step).max(1) as f64
            );
            last_log = Instant::now();
        }
        if step % 50 == 0 {
            running = 0.0;
            running_n = 0;
        }
        if step % a.save_every == 0 {
            save(&a.out, &vars, &opt, &ema, &mut log)?;
        }
    }
    save(&a.out, &vars, &opt, &ema, &mut log)?;
    eprintln!(
        "saved step {} ({:.1} min this run)",
        opt.step,
        start.elapsed().as_secs_f64() / 60.0
    );
    Ok(if interrupted { 130 } else { 0 })
}

/// AdamW at `--lr` without weight decay over `vars`.
fn optimiser(vars: &[(String, Var)], a: &TrainDiffusionArgs) -> Result<AdamW> {
    AdamW::new(
        vars.to_vec(),
        AdamWConfig {
            lr: a.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )
}

/// One optimiser step on `batch`: loss, backward, clipping to global gradient norm 1, AdamW
/// and the EMA. Returns the loss and the gradient norm before clipping.
///
/// The step runs on a rayon worker ([`on_pool`]), so that the fused ops' parallel loops
/// start without waking the pool from outside for every op (with one thread: no hand-offs
/// at all), and its kernels use every thread.
fn train_step(
    model: &TrainableUNet,
    opt: &mut AdamW,
    ema: &mut Ema,
    schedule: &Schedule,
    batch: &DiffusionBatch,
    a: &TrainDiffusionArgs,
) -> Result<(f64, f64)> {
    let kernels = current_kernels();
    on_pool(|| {
        with_kernels(kernels, || {
            let (loss, grads) = model.loss_and_grads(schedule, batch, a.cpd, a.min_snr_gamma)?;
            let gn = opt.grad_norm(&grads)?;
            let scale = if gn > 1.0 { 1.0 / gn } else { 1.0 };
            opt.step_scaled(&grads, scale)?;
            ema.update(opt.vars(), opt.step)?;
            Ok((loss, gn))
        })
    })
}

/// Training-step timings of one U-Net architecture: a fresh random initialisation and a fixed
/// set of random batches (latents, contexts, steps, dropout masks), so that every
/// [`TrainKernels`] choice timed with [`StepBench::time`] starts from the same weights and
/// sees the same data. Settings (learning rate, EMA, CPD, empty-context rate, seed) come from
/// `train-diffusion`'s arguments.
pub struct StepBench {
    a: TrainDiffusionArgs,
    model: TrainableUNet,
    vars: Vec<(String, Var)>,
    initial: HashMap<String, Tensor>,
    batches: Vec<DiffusionBatch>,
    schedule: Schedule,
}

/// Milliseconds per training step over the timed steps of [`StepBench::time`].
#[derive(Debug, Clone, Copy)]
pub struct StepTimes {
    /// Median.
    pub median_ms: f64,
    /// Fastest step.
    pub min_ms: f64,
    /// Slowest step.
    pub max_ms: f64,
    /// Mean loss of the timed steps.
    pub mean_loss: f64,
}

impl StepBench {
    /// Builds a U-Net of architecture `cfg` and `steps + 1` random batches of `a.batch_size`
    /// (the first one is the warm-up) on `a.device`.
    pub fn new(a: &TrainDiffusionArgs, cfg: &UNetConfig, steps: usize) -> Result<Self> {
        anyhow::ensure!(steps > 0, "at least one training step must be timed");
        anyhow::ensure!(a.batch_size > 0, "batch size must be positive");
        let device = crate::pipeline::parse_device(&a.device)?;
        let model = TrainableUNet::new(cfg, &device)?;
        let vars = optim::named_vars(&model.varmap);
        let initial: HashMap<String, Tensor> = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        let schedule = Schedule::reference();
        let mut rng = ChaCha20Rng::seed_from_u64(a.seed);
        let (b, c, h, d) = (
            a.batch_size,
            cfg.input_channels,
            cfg.latent_size,
            cfg.context_input_channels,
        );
        let batches = (0..=steps)
            .map(|_| {
                let x0 = Tensor::randn(0f32, 1.0, (b, c, h, h), &device)?;
                Ok(DiffusionBatch {
                    noise: x0.randn_like(0.0, 1.0)?,
                    ctx: normalise(&Tensor::randn(0f32, 1.0, (b, d), &device)?)?,
                    t: (0..b)
                        .map(|_| rng.random_range(0..schedule.len()))
                        .collect(),
                    keep: (0..b)
                        .map(|_| f32::from(u8::from(rng.random::<f64>() >= a.uncond)))
                        .collect(),
                    x0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            a: a.clone(),
            model,
            vars,
            initial,
            batches,
            schedule,
        })
    }

    /// Number of U-Net parameters.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Runs one warm-up step and the timed steps (loss, backward, gradient clipping, AdamW
    /// and the EMA, as in training) with `kernels`, from the initial weights and a fresh
    /// optimiser.
    pub fn time(&self, kernels: TrainKernels) -> Result<StepTimes> {
        optim::load_vars(&self.vars, &self.initial)?;
        let mut opt = optimiser(&self.vars, &self.a)?;
        let mut ema = Ema::new(&self.vars, self.a.ema)?;
        let (mut times, mut losses) = (Vec::new(), Vec::new());
        with_kernels(kernels, || -> Result<()> {
            for (i, batch) in self.batches.iter().enumerate() {
                let t0 = Instant::now();
                let (loss, _) = train_step(
                    &self.model,
                    &mut opt,
                    &mut ema,
                    &self.schedule,
                    batch,
                    &self.a,
                )?;
                if i > 0 {
                    times.push(t0.elapsed().as_secs_f64() * 1000.0);
                    losses.push(loss);
                }
            }
            Ok(())
        })?;
        times.sort_by(f64::total_cmp);
        Ok(StepTimes {
            median_ms: times[times.len() / 2],
            min_ms: times[0],
            max_ms: times[times.len() - 1],
            mean_loss: losses.iter().sum::<f64>() / losses.len() as f64,
        })
    }
}

/// Median milliseconds per training step of `--bench-steps` steps (after one warm-up) of
/// the configured U-Net on random latents and contexts, for each [`TrainKernels`] choice,
/// from the same initial weights and batches.
pub fn bench_steps(a: &TrainDiffusionArgs, steps: usize) -> Result<Vec<(TrainKernels, f64)>> {
    anyhow::ensure!(steps > 0, "--bench-steps must be at least 1");
    let vq_cfg = VqConfig::from_json_file(&a.vq_config)?;
    let fr_cfg = IResNetConfig::from_json_file(&a.fr_config)?;
    let h = a.size as usize / vq_cfg.downsample_factor();
    let cfg = a.unet_config(fr_cfg.num_features, h);
    let bench = StepBench::new(a, &cfg, steps)?;
    println!(
        "U-Net {} parameters, batch {}, {h}x{h} latents, {steps} timed steps after one warm-up, {} rayon threads",
        bench.parameters(),
        a.batch_size,
        rayon::current_num_threads()
    );
    let mut results = Vec::new();
    for kernels in [TrainKernels::Composed, TrainKernels::Fused] {
        let t = bench.time(kernels)?;
        let ms = t.median_ms;
        let speedup = results
            .first()
            .map_or(String::new(), |&(_, base): &(TrainKernels, f64)| {
                format!("  ({:.2}x the composed baseline)", base / ms)
            });
        println!(
            "{:<9} {ms:>9.1} ms/step (median; min {:.1}, max {:.1}), mean loss {:.4}{speedup}",
            format!("{kernels:?}").to_lowercase(),
            t.min_ms,
            t.max_ms,
            t.mean_loss
        );
        results.push((kernels, ms));
    }
    Ok(results)
}

fn save(
    out: &Path,
    vars: &[(String, Var)],
    opt: &AdamW,
    ema: &Ema,
    log: &mut String,
) -> Result<()> {
    let mut train = optim::var_tensors(vars);
    train.extend(opt.state()?);
    let ema_t = ema.tensors();
    train.extend(ema_t.iter().map(|(k, v)| (format!("ema.{k}"), v.clone())));
    optim::save_atomic(&train, &out.join("unet_train.safetensors"))?;
    optim::save_atomic(&ema_t, &out.join("unet.safetensors"))?;
    if !log.is_empty() {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out.join("log.jsonl"))?;
        f.write_all(log.as_bytes())?;
        log.clear();
    }
    Ok(())
}

/// Writes `run/unet.safetensors` in f16 and `run/unet.json` into `dest`.
fn export_f16(run: &Path, dest: &Path, device: &Device) -> Result<()> {
    let src = run.join("unet.safetensors");
    let tensors = candle_core::safetensors::load(&src, device)
        .map_err(|e| anyhow::anyhow!("{}: {e}", src.display()))?;
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    save_f16(&tensors, &dest.join("unet.safetensors"))?;
    let json = run.join("unet.json");
    std::fs::copy(&json, dest.join("unet.json"))
        .with_context(|| format!("cannot copy {}", json.display()))?;
    eprintln!(
        "wrote {} tensors in f16 to {}",
        tensors.len(),
        dest.join("unet.safetensors").display()
    );
    Ok(())
}

/// Writes `tensors` as f16 safetensors (the shipped assets are stored in half precision).
pub fn save_f16(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let half: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
    optim::save_atomic(&half, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_abs, max_abs_diff};

    fn tiny() -> UNetConfig {
        UNetConfig {
            initial_channels: 32,
            channel_multipliers: vec![1, 2],
            is_attention: vec![false, true],
            attention_heads: -1,
            attention_head_channels: 32,
            n_blocks_per_resolution: 1,
            context_input_channels: 8,
            context_channels: 32,
            input_channels: 3,
            context_dropout_probability: 0.25,
            condition_type: "CA".into(),
            latent_size: 8,
            prediction: Prediction::Eps,
        }
    }

    #[test]
    fn every_unet_variable_gets_a_gradient() {
        let dev = Device::Cpu;
        let m = TrainableUNet::new(&tiny(), &dev).unwrap();
        let vars = optim::named_vars(&m.varmap);
        let x0 = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
        let ctx = normalise(&Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap()).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
        let batch = DiffusionBatch {
            x0,
            ctx,
            t: vec![10, 500],
            noise,
            keep: vec![1.0, 1.0],
        };
        let loss = m.loss(&Schedule::reference(), &batch, 0.0, 5.0).unwrap();
        let grads = loss.backward().unwrap();
        let missing = optim::vars_without_gradient(&vars, &grads).unwrap();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
    }

    /// The fused training layers (GEMM convolution, fused GroupNorm) and the composed
    /// baseline give the same loss and the same gradient for every U-Net parameter.
    #[test]
    fn fused_and_composed_kernels_give_the_same_gradients() {
        let dev = Device::Cpu;
        let m = TrainableUNet::new(&tiny(), &dev).unwrap();
        let vars = optim::named_vars(&m.varmap);
        let schedule = Schedule::reference();
        let x0 = Tensor::randn(0f32, 1.0, (3, 3, 8, 8), &dev).unwrap();
        let batch = DiffusionBatch {
            noise: x0.randn_like(0.0, 1.0).unwrap(),
            ctx: normalise(&Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap()).unwrap(),
            t: vec![10, 400, 990],
            keep: vec![1.0, 0.0, 1.0],
            x0,
        };
        let run = |kernels| {
            with_kernels(kernels, || {
                let loss = m.loss(&schedule, &batch, 0.0, 0.0).unwrap();
                let grads = loss.backward().unwrap();
                let g: Vec<Tensor> = vars
                    .iter()
                    .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
                    .collect();
                (loss.to_scalar::<f32>().unwrap(), g)
            })
        };
        let (fused_loss, fused) = run(TrainKernels::Fused);
        let (composed_loss, composed) = run(TrainKernels::Composed);
        assert!(
            (fused_loss - composed_loss).abs() < 1e-5 * composed_loss.abs().max(1.0),
            "{fused_loss} vs {composed_loss}"
        );
        for ((name, _), (a, b)) in vars.iter().zip(fused.iter().zip(&composed)) {
            let scale = max_abs(b);
            let diff = max_abs_diff(a, b);
            assert!(
                diff <= 1e-3 * scale.max(1e-3),
                "{name}: {diff} (scale {scale})"
            );
        }
    }

    /// A batch longer than one part: the summed parts give the whole batch's loss and
    /// gradients, bit for bit the same with one thread or two.
    #[test]
    fn batch_parts_sum_to_the_whole_batch_for_any_thread_count() {
        let dev = Device::Cpu;
        let m = TrainableUNet::new(&tiny(), &dev).unwrap();
        let vars = optim::named_vars(&m.varmap);
        let b = TRAIN_PART + 5;
        let batch = DiffusionBatch {
            x0: Tensor::randn(0f32, 1.0, (b, 3, 8, 8), &dev).unwrap(),
            ctx: normalise(&Tensor::randn(0f32, 1.0, (b, 8), &dev).unwrap()).unwrap(),
            t: (0..b).map(|i| 37 * i % 1000).collect(),
            noise: Tensor::randn(0f32, 1.0, (b, 3, 8, 8), &dev).unwrap(),
            keep: (0..b).map(|i| f32::from(u8::from(i % 4 != 0))).collect(),
        };
        let schedule = Schedule::reference();
        let whole = m.loss(&schedule, &batch, 0.0, 5.0).unwrap();
        let whole_grads = whole.backward().unwrap();
        let whole = f64::from(whole.to_scalar::<f32>().unwrap());
        let parted = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let (loss, grads) = pool
                .install(|| on_pool(|| m.loss_and_grads(&schedule, &batch, 0.0, 5.0)))
                .unwrap();
            let g: Vec<Vec<f32>> = vars
                .iter()
                .map(|(_, v)| {
                    let g = grads.get(v.as_tensor()).unwrap();
                    g.flatten_all().unwrap().to_vec1().unwrap()
                })
                .collect();
            (loss, g)
        };
        let (one_loss, one) = parted(1);
        let (two_loss, two) = parted(2);
        assert_eq!(one_loss.to_bits(), two_loss.to_bits());
        let differing: Vec<&str> = vars
            .iter()
            .zip(one.iter().zip(&two))
            .filter(|(_, (a, b))| a != b)
            .map(|((name, _), _)| name.as_str())
            .collect();
        assert!(differing.is_empty(), "thread count changes {differing:?}");
        assert!(
            (one_loss - whole).abs() < 1e-5 * whole,
            "{one_loss} vs {whole}"
        );
        for ((name, v), got) in vars.iter().zip(&one) {
            let want = whole_grads.get(v.as_tensor()).unwrap();
            let got = Tensor::from_slice(got, want.shape(), &dev).unwrap();
            let scale = max_abs(want);
            let diff = max_abs_diff(&got, want);
            assert!(
                diff <= 1e-4 * scale.max(1e-3),
                "{name}: {diff} (scale {scale})"
            );
        }
    }

    /// The loss of a batch without CPD, as f64.
    fn batch_loss(m: &TrainableUNet, s: &Schedule, b: &DiffusionBatch, gamma: f64) -> f64 {
        f64::from(
            m.loss(s, b, 0.0, gamma)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    }

    /// v-prediction: the loss is the MSE against v = √ᾱ·ε − √(1−ᾱ)·x₀ of the network's own
    /// output, weighted by `min(SNR, γ)/(SNR + 1)` per sample, computed here by hand.
    #[test]
    fn v_prediction_loss_targets_the_velocity() {
        let dev = Device::Cpu;
        let cfg = UNetConfig {
            prediction: Prediction::V,
            ..tiny()
        };
        let m = TrainableUNet::new(&cfg, &dev).unwrap();
        let schedule = Schedule::reference();
        let t = vec![5usize, 900];
        let x0 = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
        let ctx = normalise(&Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap()).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
        let gamma = 5.0;
        let mut want = 0.0;
        for (i, &s) in t.iter().enumerate() {
            let ab = f64::from(schedule.alpha_bars[s]);
            let (a, b) = (ab.sqrt(), (1.0 - ab).sqrt());
            let (x0_i, n_i) = (x0.narrow(0, i, 1).unwrap(), noise.narrow(0, i, 1).unwrap());
            let xt = ((&x0_i * a).unwrap() + (&n_i * b).unwrap()).unwrap();
            let v = ((&n_i * a).unwrap() - (&x0_i * b).unwrap()).unwrap();
            let tt = Tensor::new(&[s as i64], &dev).unwrap();
            let out = m
                .unet
                .forward(&xt, &tt, Some(&ctx.narrow(0, i, 1).unwrap()))
                .unwrap();
            let mse = f64::from(
                (out - v)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            );
            let snr = ab / (1.0 - ab);
            want += mse * snr.min(gamma) / (snr + 1.0) / 2.0;
        }
        let batch = DiffusionBatch {
            x0,
            ctx,
            t,
            noise,
            keep: vec![1.0; 2],
        };
        let got = batch_loss(&m, &schedule, &batch, gamma);
        assert!(
            (got - want).abs() < 1e-4 * want.max(1e-3),
            "{got} vs {want}"
        );
    }

    /// Min-SNR-γ: the batch loss is the mean of `min(SNR, γ)/SNR`-weighted per-sample MSEs
    /// (each computed alone), and γ = 0 is the plain mean.
    #[test]
    fn min_snr_weighting_matches_per_sample_hand_computation() {
        let dev = Device::Cpu;
        let m = TrainableUNet::new(&tiny(), &dev).unwrap();
        let schedule = Schedule::reference();
        let t = vec![5usize, 300, 900];
        let x0 = Tensor::randn(0f32, 1.0, (3, 3, 8, 8), &dev).unwrap();
        let ctx = normalise(&Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap()).unwrap();
        let noise = Tensor::randn(0f32, 1.0, (3, 3, 8, 8), &dev).unwrap();
        let row = |x: &Tensor, i: usize| x.narrow(0, i, 1).unwrap();
        let single: Vec<f64> = (0..3)
            .map(|i| {
                let b = DiffusionBatch {
                    x0: row(&x0, i),
                    ctx: row(&ctx, i),
                    t: vec![t[i]],
                    noise: row(&noise, i),
                    keep: vec![1.0],
                };
                batch_loss(&m, &schedule, &b, 0.0)
            })
            .collect();
        let batch = DiffusionBatch {
            x0,
            ctx,
            t: t.clone(),
            noise,
            keep: vec![1.0; 3],
        };
        let gamma = 5.0;
        let weighted: f64 = single
            .iter()
            .zip(&t)
            .map(|(l, &s)| {
                let ab = f64::from(schedule.alpha_bars[s]);
                let snr = ab / (1.0 - ab);
                l * snr.min(gamma) / snr
            })
            .sum::<f64>()
            / 3.0;
        let got = batch_loss(&m, &schedule, &batch, gamma);
        assert!(
            (got - weighted).abs() < 1e-4 * weighted.max(1e-3),
            "{got} vs {weighted}"
        );
        // At t = 5 the SNR is far above γ, so that sample is down-weighted.
        let plain = batch_loss(&m, &schedule, &batch, 0.0);
        let mean = single.iter().sum::<f64>() / 3.0;
        assert!((plain - mean).abs() < 1e-4 * mean, "{plain} vs {mean}");
        assert!(got < plain, "{got} !< {plain}");
    }

    /// The whole chain on tiny settings: prepare (render, encode, embed) → train → resume →
    /// a model folder that `DefaultModel` and `eval-default` read.
    #[test]
    fn end_to_end_tiny_run_resumes_and_evaluates() {
        use crate::default_model::autoencoder::{small_vq_config, vq_config_json, TrainableVq};
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // Random FR and VQ stand-ins with the shipped formats.
        let fr_cfg = IResNetConfig {
            layers: vec![1, 1, 1, 1],
            num_features: 8,
            block: "IBasicBlock".into(),
            dropout: 0.0,
            width: 64,
            input_size: 112,
        };
        let vm = VarMap::new();
        IResNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &fr_cfg).unwrap();
        optim::save_atomic(
            &optim::var_tensors(&optim::named_vars(&vm)),
            &d.join("fr.safetensors"),
        )
        .unwrap();
        std::fs::write(
            d.join("fr.json"),
            r#"{"layers":[1,1,1,1],"num_features":8}"#,
        )
        .unwrap();
        let vq_args = crate::default_model::autoencoder::TrainAutoencoderArgs {
            out: d.to_path_buf(),
            identities: 1,
            per_identity: 1,
            size: 16,
            ch: 32,
            ch_mult: vec![1, 1, 1],
            num_res_blocks: 0,
            n_embed: 8,
            embed_dim: 3,
            batch_size: 1,
            steps: 1,
            minutes: None,
            lr: 1e-3,
            beta: 0.25,
            save_every: 1,
            restart_every: 0,
            seed: 0,
        };
        let vq_cfg = small_vq_config(&vq_args);
        let vq = TrainableVq::new(&vq_cfg, &dev).unwrap();
        optim::save_atomic(
            &optim::var_tensors(&optim::named_vars(&vq.varmap)),
            &d.join("vq.safetensors"),
        )
        .unwrap();
        std::fs::write(d.join("vq.json"), vq_config_json(&vq_cfg).to_string()).unwrap();
        let mut a = TrainDiffusionArgs {
            out: d.join("run"),
            vq: d.join("vq.safetensors"),
            vq_config: d.join("vq.json"),
            fr: d.join("fr.safetensors"),
            fr_config: d.join("fr.json"),
            identities: 3,
            per_identity: 2,
            embed_per_identity: 1,
            size: 16,
            initial_channels: 32,
            channel_multipliers: vec![1, 2],
            is_attention: vec![false, true],
            n_blocks: 1,
            context_channels: 32,
            cpd: 0.25,
            uncond: 0.1,
            batch_size: 2,
            steps: 2,
            minutes: None,
            lr: 1e-3,
            ema: 0.9,
            bench_steps: None,
            min_snr_gamma: 5.0,
            prediction: Prediction::V,
            init_from: None,
            save_every: 1,
            seed: 0,
            device: "cpu".into(),
            export_f16: None,
        };
        assert_eq!(run(&a).unwrap(), 0);
        a.steps = 3;
        assert_eq!(run(&a).unwrap(), 0);
        let saved =
            candle_core::safetensors::load(a.out.join("unet_train.safetensors"), &dev).unwrap();
        assert_eq!(
            saved["adam.step"].to_vec1::<i64>().unwrap(),
            vec![3],
            "resumed at step 2 and ran one more"
        );
        for f in ["unet.safetensors", "unet.json"] {
            std::fs::copy(a.out.join(f), d.join(f)).unwrap();
        }
        let model = crate::default_model::DefaultModel::from_dir(d).unwrap();
        assert_eq!(model.unet_config.context_input_channels, 8);
        assert_eq!(
            model.unet_config.prediction,
            Prediction::V,
            "unet.json records it"
        );
        let pipeline = model.pipeline(DType::F32, &dev).unwrap();
        let fr = model.fr_model(&dev).unwrap();
        let ctx = crate::default_model::eval::eval_contexts(
            crate::default_model::eval::ContextKind::Uniform,
            2,
            &fr,
            8,
            &dev,
        )
        .unwrap();
        let settings = crate::diffusion::sampler::SamplingSettings {
            sampler: crate::diffusion::sampler::SamplerKind::Ddim { steps: 2, eta: 0.0 },
            guidance: 2.0,
            ..Default::default()
        };
        let m = crate::default_model::eval::evaluate_setting(&pipeline, &fr, &ctx, 2, &settings, 4)
            .unwrap();
        assert!(m.eer.is_finite() && m.context_cosine.abs() <= 1.0 + 1e-4);

        // A new run initialised from the first run's (f16) EMA weights starts exactly there.
        let init = d.join("init_f16.safetensors");
        save_f16(
            &candle_core::safetensors::load(a.out.join("unet.safetensors"), &dev).unwrap(),
            &init,
        )
        .unwrap();
        let b = TrainDiffusionArgs {
            out: d.join("run2"),
            steps: 0,
            init_from: Some(init.clone()),
            ..a.clone()
        };
        assert_eq!(run(&b).unwrap(), 0);
        let want = candle_core::safetensors::load(&init, &dev).unwrap();
        let got = candle_core::safetensors::load(b.out.join("unet.safetensors"), &dev).unwrap();
        assert_eq!(want.len(), got.len());
        for (k, v) in &want {
            let diff = max_abs_diff(&v.to_dtype(DType::F32).unwrap(), &got[k]);
            assert_eq!(diff, 0.0, "{k}");
        }
        // A missing initialisation file is an error naming it.
        let c = TrainDiffusionArgs {
            out: d.join("run3"),
            init_from: Some(d.join("absent.safetensors")),
            ..b
        };
        let err = format!("{:#}", run(&c).unwrap_err());
        assert!(err.contains("absent.safetensors"), "{err}");
    }

    #[test]
    fn trained_weights_load_with_the_inference_loader_and_match() {
        let dev = Device::Cpu;
        let cfg = tiny();
        let m = TrainableUNet::new(&cfg, &dev).unwrap();
        let vars = optim::named_vars(&m.varmap);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("unet.safetensors");
        optim::save_atomic(&optim::var_tensors(&vars), &p).unwrap();
        let loaded = crate::diffusion::checkpoint::load_unet(
            &p,
            &cfg,
            &Schedule::reference(),
            DType::F32,
            &dev,
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 8, 8), &dev).unwrap();
        let t = Tensor::new(&[100i64], &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (1, 8), &dev).unwrap();
        let a = m.unet.forward(&x, &t, Some(&c)).unwrap();
        let b = loaded.forward(&x, &t, Some(&c)).unwrap();
        let err = max_abs_diff(&a, &b);
        assert!(err < 1e-4, "{err}");
    }
}
