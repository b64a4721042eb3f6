//! `idiff-studio bench`: U-Net forward, VQ decode and DDIM throughput on random weights,
//! printed beside the reference PyTorch numbers measured on the same kind of machine.

use crate::diffusion::rng::ImageKey;
use crate::diffusion::sampler::{Sampler, SamplerKind, SamplingSettings};
use crate::diffusion::schedule::Schedule;
use crate::models::unet::{ConditionalUNet, UNetConfig};
use crate::models::vq::{VqConfig, VqDecoder};
use crate::pipeline::{parse_device, parse_dtype};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// U-Net configurations to measure: `fixture` (the tiny parity config), `released`.
    #[arg(long, value_delimiter = ',', default_value = "fixture,released")]
    pub configs: Vec<String>,
    /// Batch sizes of the U-Net forward.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Timed repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// DDIM steps for the images/s measurement (0 skips it).
    #[arg(long, default_value_t = 50)]
    pub ddim_steps: usize,
    /// Images in the DDIM measurement (one batch).
    #[arg(long, default_value_t = 8)]
    pub ddim_images: usize,
    /// Images (one identity) in the DDPM-1000 measurement (0 skips it).
    #[arg(long, default_value_t = 0)]
    pub ddpm_images: usize,
    /// Steps actually run for the DDPM measurement; images/s is extrapolated to 1000 steps
    /// (and labelled so) when fewer.
    #[arg(long, default_value_t = 1000)]
    pub ddpm_steps: usize,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// dtype of the U-Net: f32, bf16, f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// What was measured.
    pub name: String,
    /// Batch size.
    pub batch: usize,
    /// Milliseconds per image (median over repeats).
    pub ms_per_image: f64,
    /// The reference's ms/image on the same kind of machine, where known.
    pub reference_ms_per_image: Option<f64>,
}

/// The tiny configuration of the parity fixtures.
pub fn fixture_config() -> UNetConfig {
    UNetConfig {
        initial_channels: 32,
        channel_multipliers: vec![1, 1, 2, 2],
        context_channels: 64,
        ..UNetConfig::released()
    }
}

/// Reference PyTorch ms/image (2 threads, FTZ on), from the core issue.
fn reference_ms(config: &str, batch: usize) -> Option<f64> {
    match (config, batch) {
        ("fixture", 1) => Some(259.0),
        ("fixture", 16) => Some(52.0),
        ("released", 1) => Some(3000.0),
        ("released", 8) => Some(860.0),
        _ => None,
    }
}

/// Builds a network twice: once on a `VarMap` to draw its default random initialisation,
/// then on plain (detached) copies of those tensors. Networks built on `Var`s record every
/// operation for backpropagation, so a sampling loop on them keeps each step's whole graph
/// alive (about 1 GB per DDIM step at the fixture size) — inference must never run on them.
pub fn with_random_weights<M>(
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder) -> candle_core::Result<M>,
) -> Result<M> {
    let map = VarMap::new();
    build(VarBuilder::from_varmap(&map, dtype, device))?;
    let tensors: std::collections::HashMap<String, Tensor> = map
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
        .collect();
    Ok(build(VarBuilder::from_tensors(tensors, dtype, device))?)
}

fn random_unet(cfg: &UNetConfig, dtype: DType, device: &Device) -> Result<ConditionalUNet> {
    with_random_weights(dtype, device, |vb| ConditionalUNet::new(vb, cfg))
}

fn median_ms(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut times = Vec::new();
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Runs the benchmark and prints a table.
pub fn run(args: &BenchArgs) -> Result<Vec<Measurement>> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let mut results = Vec::new();
    println!(
        "device {:?}, dtype {:?}, {} rayon threads",
        device,
        dtype,
        rayon::current_num_threads()
    );
    for name in &args.configs {
        let cfg = match name.as_str() {
            "fixture" => fixture_config(),
            "released" => UNetConfig::released(),
            other => anyhow::bail!("unknown bench config {other:?} (fixture, released)"),
        };
        let unet = random_unet(&cfg, dtype, &device)?;
        for &b in &args.batches {
            let s = cfg.latent_size;
            let x = Tensor::randn(0f32, 1.0, (b, cfg.input_channels, s, s), &device)?
                .to_dtype(dtype)?;
            let t = Tensor::from_vec(vec![500i64; b], b, &device)?;
            let ctx = Tensor::randn(0f32, 1.0, (b, cfg.context_input_channels), &device)?
                .to_dtype(dtype)?;
            let ms = median_ms(args.repeats, || {
                let eps = unet.forward(&x, &t, Some(&ctx))?;
                device.synchronize()?;
                drop(eps);
                Ok(())
            })? / b as f64;
            let m = Measurement {
                name: format!("unet-{name}-forward"),
                batch: b,
                ms_per_image: ms,
                reference_ms_per_image: reference_ms(name, b),
            };
            print_row(&m);
            results.push(m);
        }
        if args.ddim_steps > 0 {
            let schedule = Schedule::reference();
            let sampler = Sampler::new(&unet, &schedule);
            let n = args.ddim_images.max(1);
            let ctx = Tensor::randn(0f32, 1.0, (n, cfg.context_input_channels), &device)?;
            let keys: Vec<ImageKey> = (0..n as u64)
                .map(|s| ImageKey {
                    identity: 0,
                    sample: s,
                })
                .collect();
            let settings = SamplingSettings {
                sampler: SamplerKind::Ddim {
                    steps: args.ddim_steps,
                    eta: 0.0,
                },
                ..Default::default()
            };
            let start = Instant::now();
            sampler.sample(&ctx, &keys, &settings, &mut |_| true)?;
            let secs = start.elapsed().as_secs_f64();
            let m = Measurement {
                name: format!("ddim{}-{name}-sampling", args.ddim_steps),
                batch: n,
                ms_per_image: secs * 1000.0 / n as f64,
                reference_ms_per_image: None,
            };
            print_row(&m);
            println!("    = {:.3} images/s", n as f64 / secs);
            results.push(m);
        }
        if args.ddpm_images > 0 {
            results.push(bench_ddpm(&unet, &cfg, name, args, &device)?);
        }
    }
    let vq = VqConfig::released();
    let decoder = with_random_weights(DType::F32, &device, |vb| VqDecoder::new(vb, &vq))?;
    for &b in args.batches.iter().filter(|b| **b <= 8) {
        let z = Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &device)?;
        let ms = median_ms(args.repeats, || {
            decoder.decode(&z, true)?;
            device.synchronize()?;
            Ok(())
        })? / b as f64;
        let m = Measurement {
            name: "vq-f4-decode-128px".into(),
            batch: b,
            ms_per_image: ms,
            reference_ms_per_image: None,
        };
        print_row(&m);
        results.push(m);
    }
    if let Some(path) = &args.json {
        crate::generate::write_json_atomic(path, &results)?;
    }
    Ok(results)
}

/// Times ancestral DDPM steps for one identity × `ddpm_images` samples in one batch.
fn bench_ddpm(
    unet: &ConditionalUNet,
    cfg: &UNetConfig,
    name: &str,
    args: &BenchArgs,
    device: &Device,
) -> Result<Measurement> {
    let schedule = Schedule::reference();
    let sampler = Sampler::new(unet, &schedule);
    let n = args.ddpm_images;
    let steps = args.ddpm_steps.clamp(1, schedule.len());
    let ctx = Tensor::randn(0f32, 1.0, (1, cfg.context_input_channels), device)?
        .broadcast_as((n, cfg.context_input_channels))?
        .contiguous()?;
    let c = unet.project_context(&ctx.to_dtype(unet.dtype())?)?;
    let s = cfg.latent_size;
    let mut x = Tensor::randn(0f32, 1.0, (n, cfg.input_channels, s, s), device)?;
    let start = Instant::now();
    for t in (schedule.len() - steps..schedule.len()).rev() {
        let eps = sampler.guided_eps(&x, t, &c, 1.0)?;
        let z = Tensor::randn(0f32, 1.0, x.shape(), device)?;
        x = sampler.ddpm_step(&x, &eps, t, Some(&z))?;
    }
    device.synchronize()?;
    let secs = start.elapsed().as_secs_f64() * schedule.len() as f64 / steps as f64;
    let m = Measurement {
        name: if steps < schedule.len() {
            format!("ddpm1000-{name}-sampling (extrapolated from {steps} steps)")
        } else {
            format!("ddpm1000-{name}-sampling")
        },
        batch: n,
        ms_per_image: secs * 1000.0 / n as f64,
        reference_ms_per_image: None,
    };
    print_row(&m);
    println!("    = {:.4} images/s", n as f64 / secs);
    Ok(m)
}

fn print_row(m: &Measurement) {
    let reference = match m.reference_ms_per_image {
        Some(r) => format!(
            "reference {r:>8.1} ms/image  ratio {:.2}×",
            m.ms_per_image / r
        ),
        None => String::new(),
    };
    println!(
        "{:<28} batch {:>3}: {:>9.1} ms/image  {}",
        m.name, m.batch, m.ms_per_image, reference
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Benchmarked networks hold plain tensors: a forward pass records no backprop graph
    /// (on `Var` weights each DDIM step's graph stayed alive and the DDIM benchmark ran out
    /// of memory), and the weights are the random initialisation, not zeros.
    #[test]
    fn benchmark_networks_do_not_track_gradients() {
        let cfg = fixture_config();
        let device = Device::Cpu;
        let unet = random_unet(&cfg, DType::F32, &device).unwrap();
        let s = cfg.latent_size;
        let x = Tensor::randn(0f32, 1.0, (1, cfg.input_channels, s, s), &device).unwrap();
        let t = Tensor::from_vec(vec![10i64], 1, &device).unwrap();
        let ctx = Tensor::randn(0f32, 1.0, (1, cfg.context_input_channels), &device).unwrap();
        let eps = unet.forward(&x, &t, Some(&ctx)).unwrap();
        // Backprop from the output finds no recorded graph: only the root gets a gradient.
        let grads = eps.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get_ids().count(),
            1,
            "the forward pass recorded a graph"
        );
        let lin =
            with_random_weights(DType::F32, &device, |vb| candle_nn::linear(4, 3, vb)).unwrap();
        assert!(!lin.weight().is_variable(), "weights are still Vars");
        let std = eps
            .flatten_all()
            .unwrap()
            .var(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            std > 1e-6,
            "output is constant: random weights were not drawn"
        );
    }
}
