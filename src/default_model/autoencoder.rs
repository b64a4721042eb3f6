//! `train-autoencoder`: a small VQ autoencoder on ProcFace images, with the same
//! `VqEncoder`/`VqDecoder` code path (and key names) as the released VQ-f4 first stage.
//!
//! Losses: L1 reconstruction + codebook (‖sg[z] − e‖²) + β·commitment (‖z − sg[e]‖²), with
//! the straight-through estimator `z + sg[e − z]` into the decoder. The codebook starts from
//! encoder outputs and unused entries are restarted from current encoder outputs, which keeps
//! a tiny 3-d codebook from collapsing.

use super::data::FaceSet;
use super::optim::{self, AdamW, AdamWConfig};
use crate::models::vq::{VqConfig, VqDecoder, VqEncoder};
use crate::procface::seeds::HELD_OUT_FIRST_IDENTITY;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Name of the codebook parameter.
pub const CODEBOOK: &str = "quantize.embedding.weight";

/// Arguments of `train-autoencoder`.
#[derive(Debug, Clone, Args)]
pub struct TrainAutoencoderArgs {
    /// Run folder: `vq_train.safetensors` (weights + optimiser, resumed when present),
    /// `vq.safetensors`, `vq.json` and `log.jsonl`.
    #[arg(long)]
    pub out: PathBuf,
    /// ProcFace identity seeds 0..N used for training.
    #[arg(long, default_value_t = 2000)]
    pub identities: u64,
    /// Samples per training identity.
    #[arg(long, default_value_t = 4)]
    pub per_identity: u64,
    /// Image size (the latent is size/4).
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Base channels (multiple of 32).
    #[arg(long, default_value_t = 32)]
    pub ch: usize,
    /// Channel multipliers (length 3 = two downsamplings, f4).
    #[arg(long, value_delimiter = ',', default_value = "1,2,2")]
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level in the encoder (decoder: one more).
    #[arg(long, default_value_t = 1)]
    pub num_res_blocks: usize,
    /// Codebook entries.
    #[arg(long, default_value_t = 512)]
    pub n_embed: usize,
    /// Codebook dimension (latent channels).
    #[arg(long, default_value_t = 3)]
    pub embed_dim: usize,
    /// Images per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Total optimiser steps (including resumed ones).
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    /// Stop (and save) after this many minutes of wall time in this run.
    #[arg(long)]
    pub minutes: Option<f64>,
    /// Adam learning rate.
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    /// Commitment weight β.
    #[arg(long, default_value_t = 0.25)]
    pub beta: f64,
    /// Save a checkpoint every N steps.
    #[arg(long, default_value_t = 100)]
    pub save_every: usize,
    /// Restart codebook entries unused during the last N steps (0 = never).
    #[arg(long, default_value_t = 50)]
    pub restart_every: usize,
    /// RNG seed of batch sampling and initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The default model's VQ configuration for `size`×`size` images.
pub fn small_vq_config(a: &TrainAutoencoderArgs) -> VqConfig {
    VqConfig {
        ch: a.ch,
        ch_mult: a.ch_mult.clone(),
        num_res_blocks: a.num_res_blocks,
        z_channels: a.embed_dim,
        n_embed: a.n_embed,
        embed_dim: a.embed_dim,
        in_channels: 3,
        out_ch: 3,
        double_z: false,
        attn_resolutions: Vec::new(),
        resolution: a.size as usize,
        dropout: 0.0,
    }
}

/// The JSON form of a VQ config, with the reference's `ddconfig` key names.
pub fn vq_config_json(cfg: &VqConfig) -> serde_json::Value {
    serde_json::json!({
        "ch": cfg.ch,
        "ch_mult": cfg.ch_mult,
        "num_res_blocks": cfg.num_res_blocks,
        "z_channels": cfg.z_channels,
        "n_embed": cfg.n_embed,
        "embed_dim": cfg.embed_dim,
        "in_channels": cfg.in_channels,
        "out_ch": cfg.out_ch,
        "double_z": cfg.double_z,
        "attn_resolutions": cfg.attn_resolutions,
        "resolution": cfg.resolution,
        "dropout": cfg.dropout,
    })
}

/// A trainable VQ autoencoder: both halves built on one `VarMap`.
pub struct TrainableVq {
    /// All parameters.
    pub varmap: VarMap,
    /// Encoder half.
    pub encoder: VqEncoder,
    /// Decoder half (with the codebook).
    pub decoder: VqDecoder,
}

/// The three loss terms of one step and the codes used.
pub struct VqLosses {
    /// Total loss.
    pub total: Tensor,
    /// L1 reconstruction.
    pub recon: Tensor,
    /// Codebook loss.
    pub codebook: Tensor,
    /// Commitment loss (unweighted).
    pub commit: Tensor,
    /// Code indices `[B, h*w]`.
    pub indices: Tensor,
    /// Encoder output `[B, embed_dim, h, w]` (detached).
    pub z: Tensor,
}

impl TrainableVq {
    /// Fresh randomly initialised weights.
    pub fn new(cfg: &VqConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let encoder = VqEncoder::new(vb.clone(), cfg)?;
        let decoder = VqDecoder::new(vb, cfg)?;
        Ok(Self {
            varmap,
            encoder,
            decoder,
        })
    }

    /// Training losses on images `x` in [-1, 1].
    pub fn losses(&self, x: &Tensor, beta: f64) -> Result<VqLosses> {
        let z = self.encoder.encode(x)?;
        let (_, _, h, w) = z.dims4()?;
        let q = self.decoder.quantizer();
        let indices = q.indices(&z.detach())?;
        let zq = q.lookup(&indices, h, w)?;
        let codebook = (&zq - z.detach())?.sqr()?.mean_all()?;
        let commit = (&z - zq.detach())?.sqr()?.mean_all()?;
        let z_st = (&z + (zq.detach() - z.detach())?)?;
        let xr = self.decoder.decode(&z_st, false)?;
        let recon = (xr - x)?.abs()?.mean_all()?;
        let total = ((&recon + &codebook)? + (&commit * beta)?)?;
        Ok(VqLosses {
            total,
            recon,
            codebook,
            commit,
            indices,
            z: z.detach(),
        })
    }
}

fn codebook_var(vars: &[(String, Var)]) -> Result<Var> {
    vars.iter()
        .find(|(n, _)| n == CODEBOOK)
        .map(|(_, v)| v.clone())
        .context("the model has no codebook variable")
}

/// Rows of `z: [B, d, h, w]` as `[B*h*w, d]` vectors.
fn latent_rows(z: &Tensor) -> Result<Vec<Vec<f32>>> {
    let (b, d, h, w) = z.dims4()?;
    Ok(z.permute((0, 2, 3, 1))?
        .reshape((b * h * w, d))?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?)
}

/// Replaces the codebook rows in `which` by random encoder outputs (plus small noise).
fn restart_codes(codebook: &Var, which: &[usize], z: &Tensor, rng: &mut impl Rng) -> Result<()> {
    if which.is_empty() {
        return Ok(());
    }
    let rows = latent_rows(z)?;
    let mut cb = codebook.as_tensor().to_vec2::<f32>()?;
    for &k in which {
        let src = &rows[rng.random_range(0..rows.len())];
        for (dst, s) in cb[k].iter_mut().zip(src) {
            *dst = s + rng.random_range(-0.01f32..0.01);
        }
    }
    let n = cb.len();
    let d = cb.first().map_or(0, |r| r.len());
    codebook.set(&Tensor::from_vec(cb.concat(), (n, d), codebook.device())?)?;
    Ok(())
}

/// Peak signal-to-noise ratio (dB) between two `[B, 3, H, W]` tensors in [-1, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = ((a.clamp(-1f32, 1f32)? + 1.0)? / 2.0)?;
    let b = ((b.clamp(-1f32, 1f32)? + 1.0)? / 2.0)?;
    let mse = (a - b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok(-10.0 * mse.max(1e-12).log10())
}

/// Runs `train-autoencoder`; returns the exit code (130 when cancelled).
pub fn run(a: &TrainAutoencoderArgs) -> Result<i32> {
    let device = Device::Cpu;
    let cfg = small_vq_config(a);
    cfg.validate()?;
    anyhow::ensure!(
        (a.size as usize).is_multiple_of(cfg.downsample_factor()),
        "image size {} is not a multiple of the downsampling factor {}",
        a.size,
        cfg.downsample_factor()
    );
    anyhow::ensure!(a.batch_size > 0, "batch size must be positive");
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    crate::files::remove_stale_temps(&a.out);
    let t0 = Instant::now();
    let data = FaceSet::render(0..a.identities, a.per_identity, a.size)?;
    let held_out = FaceSet::render(
        HELD_OUT_FIRST_IDENTITY..HELD_OUT_FIRST_IDENTITY + 32,
        2,
        a.size,
    )?;
    eprintln!(
        "rendered {} training images in {:.1}s",
        data.len(),
        t0.elapsed().as_secs_f64()
    );

    let model = TrainableVq::new(&cfg, &device)?;
    let vars = optim::named_vars(&model.varmap);
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWConfig {
            lr: a.lr,
            ..Default::default()
        },
    )?;
    let ckpt = a.out.join("vq_train.safetensors");
    let mut rng = ChaCha20Rng::seed_from_u64(a.seed);
    let codebook = codebook_var(&vars)?;
    if ckpt.exists() {
        let saved = candle_core::safetensors::load(&ckpt, &device)?;
        optim::load_vars(&vars, &saved)?;
        opt.load_state(&saved)?;
        rng = ChaCha20Rng::seed_from_u64(a.seed ^ (opt.step as u64).wrapping_mul(0x9E37));
        eprintln!("resumed {} at step {}", ckpt.display(), opt.step);
    } else {
        // Start the codebook at encoder outputs so that every entry is near the data.
        let idx = data.random_indices(&mut rng, a.batch_size.max(8));
        let z = model.encoder.encode(&data.batch(&idx, &device)?)?;
        let all: Vec<usize> = (0..cfg.n_embed).collect();
        restart_codes(&codebook, &all, &z, &mut rng)?;
    }
    std::fs::write(
        a.out.join("vq.json"),
        serde_json::to_string_pretty(&vq_config_json(&cfg))?,
    )?;

    let cancel = optim::cancel_flag();
    let start = Instant::now();
    let deadline = a.minutes.map(|m| m * 60.0);
    let mut usage = vec![0u32; cfg.n_embed];
    let mut log = String::new();
    let mut last_log = Instant::now();
    let mut interrupted = false;
    let mut latent_std = 1.0f64;
    let mut first_step = true;
    let first_step_index = opt.step;
    while opt.step < a.steps {
        if cancel.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        if deadline.is_some_and(|d| start.elapsed().as_secs_f64() > d) {
            break;
        }
        let idx = data.random_indices(&mut rng, a.batch_size);
        let x = data.batch(&idx, &device)?;
        let l = model.losses(&x, a.beta)?;
        let grads = l.total.backward()?;
        let gn = opt.grad_norm(&grads)?;
        let scale = if gn > 1.0 { 1.0 / gn } else { 1.0 };
        opt.step_scaled(&grads, scale)?;
        let std_now =
            l.z.flatten_all()?
                .var_keepdim(0)?
                .sqrt()?
                .to_vec1::<f32>()?[0] as f64;
        latent_std = if first_step {
            std_now
        } else {
            0.98 * latent_std + 0.02 * std_now
        };
        first_step = false;
        for &k in &l.indices.flatten_all()?.to_vec1::<u32>()? {
            usage[k as usize] += 1;
        }
        let step = opt.step;
        if a.restart_every > 0 && step % a.restart_every == 0 {
            let dead: Vec<usize> = (0..cfg.n_embed).filter(|&k| usage[k] == 0).collect();
            restart_codes(&codebook, &dead, &l.z, &mut rng)?;
            let used = cfg.n_embed - dead.len();
            usage.iter_mut().for_each(|u| *u = 0);
            let line = serde_json::json!({
                "step": step,
                "loss": l.total.to_scalar::<f32>()?,
                "recon_l1": l.recon.to_scalar::<f32>()?,
                "codebook": l.codebook.to_scalar::<f32>()?,
                "commit": l.commit.to_scalar::<f32>()?,
                "grad_norm": gn,
                "codes_used": used,
                "restarted": dead.len(),
                "latent_std": latent_std,
                "elapsed_s": start.elapsed().as_secs_f64(),
            });
            log.push_str(&format!("{line}\n"));
        }
        if last_log.elapsed().as_secs_f64() > 30.0 || step == 1 {
            eprintln!(
                "step {step}: loss {:.4} l1 {:.4} cb {:.5} commit {:.5} |g| {gn:.3} ({:.2}s/step)",
                l.total.to_scalar::<f32>()?,
                l.recon.to_scalar::<f32>()?,
                l.codebook.to_scalar::<f32>()?,
                l.commit.to_scalar::<f32>()?,
                start.elapsed().as_secs_f64() / (step - first_step_index).max(1) as f64
            );
            last_log = Instant::now();
        }
        if step % a.save_every == 0 {
            save(&a.out, &vars, &opt, latent_std, &mut log)?;
        }
    }
    save(&a.out, &vars, &opt, latent_std, &mut log)?;
    // Held-out reconstruction quality (quantised decode, as at generation time).
    let idx: Vec<usize> = (0..held_out.len()).collect();
    let x = held_out.batch(&idx, &device)?;
    let (encoder, decoder) = load_exported(&a.out.join("vq.safetensors"), &cfg, &device)?;
    let z = encoder.encode(&x)?;
    let xr = decoder.decode(&z, true)?;
    let exported_std = z.flatten_all()?.var_keepdim(0)?.sqrt()?.to_vec1::<f32>()?[0];
    let p = psnr(&x, &xr)?;
    let used = distinct_codes(&decoder.quantizer().indices(&z)?)?;
    let summary = serde_json::json!({
        "step": opt.step,
        "heldout_psnr_db": p,
        "heldout_codes_used": used,
        "heldout_latent_std": exported_std,
        "run_wall_s": start.elapsed().as_secs_f64(),
    });
    std::fs::write(
        a.out.join("vq_eval.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    eprintln!(
        "step {}: held-out PSNR {p:.2} dB, {used} codes used",
        opt.step
    );
    Ok(if interrupted { 130 } else { 0 })
}

fn distinct_codes(indices: &Tensor) -> Result<usize> {
    let mut v = indices.flatten_all()?.to_vec1::<u32>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v.len())
}

fn save(
    out: &Path,
    vars: &[(String, Var)],
    opt: &AdamW,
    latent_std: f64,
    log: &mut String,
) -> Result<()> {
    let weights = optim::var_tensors(vars);
    let mut train = weights.clone();
    train.extend(opt.state()?);
    optim::save_atomic(&train, &out.join("vq_train.safetensors"))?;
    optim::save_atomic(
        &rescale_latent(&weights, 1.0 / latent_std.max(1e-6))?,
        &out.join("vq.safetensors"),
    )?;
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

/// Reparametrises a VQ state dict so that its latent is multiplied by `s`: `quant_conv`
/// weight and bias and the codebook are scaled by `s`, `post_quant_conv`'s weight by `1/s`.
/// Nearest-codebook quantisation is invariant under the uniform scaling, so decodes are
/// unchanged while the diffusion model sees latents of about unit variance (the reference
/// has no latent scale factor, so the scale lives in the weights).
pub fn rescale_latent(
    weights: &std::collections::HashMap<String, Tensor>,
    s: f64,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let mut out = weights.clone();
    for name in ["quant_conv.weight", "quant_conv.bias", CODEBOOK] {
        if let Some(t) = weights.get(name) {
            out.insert(name.to_owned(), (t * s)?);
        }
    }
    if let Some(t) = weights.get("post_quant_conv.weight") {
        out.insert("post_quant_conv.weight".to_owned(), (t / s)?);
    }
    Ok(out)
}

/// Loads the encoder and decoder halves from one exported `vq.safetensors`.
pub fn load_exported(
    weights: &Path,
    cfg: &VqConfig,
    device: &Device,
) -> Result<(VqEncoder, VqDecoder)> {
    Ok((
        VqEncoder::load(weights, cfg, device)?,
        VqDecoder::load(weights, cfg, device)?,
    ))
}

/// Mean squared difference between two equally shaped tensors.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_args() -> TrainAutoencoderArgs {
        TrainAutoencoderArgs {
            out: PathBuf::new(),
            identities: 2,
            per_identity: 1,
            size: 16,
            ch: 32,
            ch_mult: vec![1, 1, 1],
            num_res_blocks: 1,
            n_embed: 16,
            embed_dim: 3,
            batch_size: 2,
            steps: 1,
            minutes: None,
            lr: 1e-3,
            beta: 0.25,
            save_every: 1,
            restart_every: 0,
            seed: 0,
        }
    }

    #[test]
    fn every_vq_variable_gets_a_gradient() {
        let cfg = small_vq_config(&tiny_args());
        let dev = Device::Cpu;
        let model = TrainableVq::new(&cfg, &dev).unwrap();
        let vars = optim::named_vars(&model.varmap);
        let data = FaceSet::render(0..2, 1, 16).unwrap();
        let x = data.batch(&[0, 1], &dev).unwrap();
        // As in training, the codebook starts at encoder outputs (an all-zero codebook would
        // starve `post_quant_conv` of gradient).
        let z = model.encoder.encode(&x).unwrap();
        let all: Vec<usize> = (0..cfg.n_embed).collect();
        let mut rng = ChaCha20Rng::seed_from_u64(0);
        restart_codes(&codebook_var(&vars).unwrap(), &all, &z, &mut rng).unwrap();
        let l = model.losses(&x, 0.25).unwrap();
        let grads = l.total.backward().unwrap();
        let missing = optim::vars_without_gradient(&vars, &grads).unwrap();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
        // The names are the reference's, so the loaders read an export.
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        for prefix in [
            "encoder.",
            "quant_conv.",
            CODEBOOK,
            "post_quant_conv.",
            "decoder.",
        ] {
            assert!(names.iter().any(|n| n.starts_with(prefix)), "{prefix}");
        }
    }

    #[test]
    fn export_round_trips_through_the_released_loaders() {
        let cfg = small_vq_config(&tiny_args());
        let dev = Device::Cpu;
        let model = TrainableVq::new(&cfg, &dev).unwrap();
        let vars = optim::named_vars(&model.varmap);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vq.safetensors");
        optim::save_atomic(&optim::var_tensors(&vars), &path).unwrap();
        let (enc, dec) = load_exported(&path, &cfg, &dev).unwrap();
        let data = FaceSet::render(0..1, 1, 16).unwrap();
        let x = data.batch(&[0], &dev).unwrap();
        let z = enc.encode(&x).unwrap();
        let a = dec.decode(&z, true).unwrap();
        let b = model
            .decoder
            .decode(&model.encoder.encode(&x).unwrap(), true)
            .unwrap();
        assert!(mse(&a, &b).unwrap() < 1e-10);
    }
}
