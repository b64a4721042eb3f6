//! `idiff-studio bench`: timings of the project's networks on random weights — U-Net forward
//! (fixture and released configs), VQ-f4 decode, IResNet-50 forward, one training step of the
//! built-in U-Net, DDIM/DDPM sampling — plus a large-GEMM peak and the released U-Net's
//! achieved GFLOP/s against it.
//!
//! The PyTorch reference is never quoted from memory: `scripts/reference-bench.py` times the
//! same rows with the reference's own modules and writes a JSON file, and
//! `bench --reference FILE` prints each row beside the file's time with the ratio
//! ours/reference. Without `--reference` there is no reference column and no ratio.

use crate::default_model::diffusion_train::{StepBench, TrainDiffusionArgs};
use crate::diffusion::rng::ImageKey;
use crate::diffusion::sampler::{Sampler, SamplerKind, SamplingSettings};
use crate::diffusion::schedule::Schedule;
use crate::kernels::gemm::{self, Simd};
use crate::models::iresnet::{IResNet, IResNetConfig};
use crate::models::unet::{ConditionalUNet, UNetConfig, CONTEXT_TOKENS};
use crate::models::vq::{VqConfig, VqDecoder};
use crate::nn::layers::TrainKernels;
use crate::pipeline::{parse_device, parse_dtype};
use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Architecture of the built-in default model's U-Net (the `default-unet-train-step` row).
const DEFAULT_UNET_JSON: &str = include_str!("../assets/default/unet.json");

/// Batch of the `default-unet-train-step` row (as in `scripts/reference-bench.py`).
const TRAIN_BATCH: usize = 32;

/// Largest batch of the VQ decode rows.
const VQ_MAX_BATCH: usize = 8;

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// U-Net configurations to measure: `fixture` (the tiny parity config), `released`.
    #[arg(long, value_delimiter = ',', default_value = "fixture,released")]
    pub configs: Vec<String>,
    /// Batch sizes of the U-Net and IResNet-50 forwards (the VQ decode uses those ≤ 8).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    /// Timed repetitions per measurement (after one warm-up); the fastest is reported, as
    /// the reference script reports its fastest call.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Timed training steps (after one warm-up) of the built-in U-Net at batch 32; the
    /// fastest is reported (0 skips the row).
    #[arg(long, default_value_t = 3)]
    pub train_steps: usize,
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
    /// Side of the square f32 matrix product that measures the CPU's attainable GEMM peak
    /// (0 skips it).
    #[arg(long, default_value_t = 2048)]
    pub gemm_n: usize,
    /// CPU kernel instruction set: avx512, avx2 or portable (default: the best this CPU has,
    /// or `IDIFF_SIMD`).
    #[arg(long)]
    pub simd: Option<String>,
    /// JSON written by `scripts/reference-bench.py` on this machine: adds the reference's
    /// ms/image and the ratio ours/reference to every row.
    #[arg(long)]
    pub reference: Option<PathBuf>,
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

/// One row of `scripts/reference-bench.py`'s output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRow {
    /// Row name, as in [`Measurement::name`].
    pub name: String,
    /// Batch size.
    pub batch: usize,
    /// Milliseconds per image (best of the script's repeats).
    pub ms_per_image: f64,
    /// Milliseconds per training step (training rows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms_per_step: Option<f64>,
}

/// The JSON file of `scripts/reference-bench.py`.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceTimings {
    /// Always `reference-bench`.
    pub tool: String,
    /// torch version.
    pub torch: String,
    /// torch threads.
    pub threads: usize,
    /// CPU model name of the machine it ran on.
    pub cpu: String,
    /// Whether torch flushed denormals to zero.
    #[serde(default)]
    pub flush_denormal: Option<bool>,
    /// Timed calls per row (the best is kept).
    #[serde(default)]
    pub repeats: Option<usize>,
    /// The measured rows.
    pub rows: Vec<ReferenceRow>,
}

impl ReferenceTimings {
    /// Parses the script's JSON; refuses other JSON (no `"tool": "reference-bench"`) and
    /// rows without a positive time.
    pub fn parse(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| anyhow!("not valid JSON ({e})"))?;
        match value.get("tool").and_then(|t| t.as_str()) {
            Some("reference-bench") => {}
            Some(other) => anyhow::bail!(
                "not an output of scripts/reference-bench.py (its \"tool\" is {other:?})"
            ),
            None => {
                anyhow::bail!("not an output of scripts/reference-bench.py (no \"tool\" field)")
            }
        }
        let timings: Self = serde_json::from_value(value)
            .map_err(|e| anyhow!("malformed reference-bench output ({e})"))?;
        for r in &timings.rows {
            let ok = |v: f64| v.is_finite() && v > 0.0;
            anyhow::ensure!(
                ok(r.ms_per_image) && r.ms_per_step.is_none_or(ok) && r.batch > 0,
                "malformed reference-bench output (row {} batch {} has no positive time)",
                r.name,
                r.batch
            );
        }
        Ok(timings)
    }

    /// Reads and parses `path`; every error is one line naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("cannot read reference timings {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow!("reference timings {}: {e}", path.display()))
    }

    /// The row `name` at `batch`, if the script measured it.
    pub fn row(&self, name: &str, batch: usize) -> Option<&ReferenceRow> {
        self.rows
            .iter()
            .find(|r| r.name == name && r.batch == batch)
    }
}

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// What was measured (the reference script's row name where it has one).
    pub name: String,
    /// Batch size.
    pub batch: usize,
    /// Milliseconds per image (fastest of the repeats).
    pub ms_per_image: f64,
    /// Milliseconds per training step (training rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_per_step: Option<f64>,
    /// The reference's row, from `--reference` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceRow>,
    /// ms_per_image / the reference's ms_per_image, when there is a reference row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

impl Measurement {
    /// A row with its reference (looked up by name and batch) when `reference` is given.
    pub fn new(
        name: impl Into<String>,
        batch: usize,
        ms_per_image: f64,
        ms_per_step: Option<f64>,
        reference: Option<&ReferenceTimings>,
    ) -> Self {
        let name = name.into();
        let reference = reference.and_then(|r| r.row(&name, batch)).cloned();
        let ratio = reference.as_ref().map(|r| ms_per_image / r.ms_per_image);
        Self {
            name,
            batch,
            ms_per_image,
            ms_per_step,
            reference,
            ratio,
        }
    }
}

/// The attainable GEMM rate the achieved rate is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct GemmPeak {
    /// GFLOP/s of one `n × n × n` f32 product (best of the repeats).
    pub gflops: f64,
    /// Matrix side.
    pub n: usize,
    /// Threads the product used.
    pub threads: usize,
    /// Instruction set of the kernels.
    pub simd: String,
}

/// The released U-Net's forward at batch 8 in FLOP terms.
#[derive(Debug, Clone, Serialize)]
pub struct Achieved {
    /// Row it is computed from.
    pub name: String,
    /// Its batch.
    pub batch: usize,
    /// Analytic GFLOP of one forward per image ([`unet_forward_flops`]).
    pub gflop_per_image: f64,
    /// gflop_per_image / seconds per image.
    pub gflops: f64,
    /// gflops / the large-GEMM peak, when the peak was measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction_of_peak: Option<f64>,
    /// The same FLOPs over the reference's time, when it has the row.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_gflops: Option<f64>,
}

/// The machine a reference file was measured on, for the JSON report.
#[derive(Debug, Clone, Serialize)]
struct ReferenceSource {
    file: PathBuf,
    torch: String,
    threads: usize,
    cpu: String,
}

/// What `--json` writes.
#[derive(Debug, Serialize)]
struct Report<'a> {
    tool: &'static str,
    device: String,
    dtype: String,
    threads: usize,
    simd: String,
    cpu: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<ReferenceSource>,
    rows: &'a [Measurement],
    #[serde(skip_serializing_if = "Option::is_none")]
    gemm_peak: Option<GemmPeak>,
    #[serde(skip_serializing_if = "Option::is_none")]
    achieved: Option<Achieved>,
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

/// The built-in default model's U-Net architecture.
pub fn default_unet_config() -> Result<UNetConfig> {
    serde_json::from_str(DEFAULT_UNET_JSON)
        .map_err(|e| anyhow!("assets/default/unet.json: invalid U-Net config: {e}"))
}

/// Multiply-add FLOPs (2 per multiply-add) of one U-Net forward for one image, counted from
/// the architecture the way [`ConditionalUNet::new`] builds it: convolutions
/// 2·Cout·Cin·k²·Ho·Wo, transposed convolutions 2·Cin·Cout·k²·Hin·Win, linears and 1×1
/// projections 2·in·out per token, attention 2·2·Nq·Nk·C (scores and weighted sum).
/// GroupNorm, activations and other element-wise work are not counted.
pub fn unet_forward_flops(cfg: &UNetConfig) -> f64 {
    let f = |x: usize| x as f64;
    let c0 = cfg.initial_channels;
    let tc = cfg.time_channels();
    let cc = cfg.context_channels;
    let tokens = CONTEXT_TOKENS;
    let chans = cfg.level_channels();
    let levels = chans.len();
    // Side of each level: 3×3 stride-2 padding-1 convolutions go down, 4×4 stride-2
    // padding-1 transposed convolutions come back up.
    let mut sides = vec![cfg.latent_size];
    for l in 1..levels {
        sides.push((sides[l - 1] - 1) / 2 + 1);
    }
    let conv = |cin: usize, cout: usize, k: usize, side: usize| {
        2.0 * f(cout) * f(cin) * f(k * k) * f(side * side)
    };
    let res = |cin: usize, cout: usize, side: usize| {
        let shortcut = if cin != cout {
            conv(cin, cout, 1, side)
        } else {
            0.0
        };
        conv(cin, cout, 3, side)
            + conv(cout, cout, 3, side)
            + shortcut
            + 2.0 * f(tc) * f(cout) // time_emb
            + 2.0 * 2.0 * f(cout) * f(cout) // scale_emb, shift_emb
    };
    let attn = |ch: usize, side: usize| {
        let n = f(side * side);
        let (ch, cc, t) = (f(ch), f(cc), f(tokens));
        let c_proj_in = 2.0 * cc * cc * t;
        let x_proj = 2.0 * 2.0 * ch * ch * n; // x_proj_in, x_proj_out
        let self_attn = 4.0 * 2.0 * ch * ch * n + 2.0 * 2.0 * n * n * ch;
        let cross_attn = 2.0 * 2.0 * ch * ch * n // to_q, proj_out
            + 2.0 * 2.0 * cc * ch * t // to_k, to_v
            + 2.0 * 2.0 * n * t * ch;
        let ff = 2.0 * 2.0 * ch * (4.0 * ch) * n;
        c_proj_in + x_proj + self_attn + cross_attn + ff
    };
    let block = |cin: usize, cout: usize, level: usize| {
        let a = if cfg.is_attention.get(level).copied().unwrap_or(false) {
            attn(cout, sides[level])
        } else {
            0.0
        };
        res(cin, cout, sides[level]) + a
    };

    let mut total = conv(cfg.input_channels, c0, 3, cfg.latent_size) // image_proj
        + 2.0 * f(c0) * f(tc) + 2.0 * f(tc) * f(tc) // time_emb lin1, lin2
        + 2.0 * f(cfg.context_input_channels) * f(cc); // context_emb
    let mut cin = c0;
    for (level, &cout) in chans.iter().enumerate() {
        for _ in 0..cfg.n_blocks_per_resolution {
            total += block(cin, cout, level);
            cin = cout;
        }
        if level + 1 < levels {
            total += conv(cin, cin, 3, sides[level + 1]);
        }
    }
    let bottom = sides[levels - 1];
    total += 2.0 * res(cin, cin, bottom) + attn(cin, bottom);
    let mut cur = cin;
    for level in (0..levels).rev() {
        let cout = chans[level];
        for _ in 0..cfg.n_blocks_per_resolution {
            total += block(cur + cout, cout, level);
            cur = cout;
        }
        let skip = if level > 0 { chans[level - 1] } else { c0 };
        let reduced = cout / cfg.channel_multipliers[level];
        total += block(cur + skip, reduced, level);
        cur = reduced;
        if level > 0 {
            total += 2.0 * f(cur) * f(cur) * 16.0 * f(sides[level] * sides[level]);
        }
    }
    total + conv(cur, cfg.input_channels, 3, cfg.latent_size) // final
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

fn best_ms(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut times = Vec::new();
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(times.into_iter().fold(f64::INFINITY, f64::min))
}

/// CPU model name from `/proc/cpuinfo` (as the reference script reports it), else the
/// architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

fn simd_name(simd: Simd) -> String {
    format!("{simd:?}").to_lowercase()
}

/// `train-diffusion`'s default settings (learning rate, EMA, CPD, empty-context rate, seed)
/// with the given batch and device.
fn train_settings(batch: usize, device: &str) -> Result<TrainDiffusionArgs> {
    use clap::{Args, FromArgMatches};
    let cmd = TrainDiffusionArgs::augment_args(clap::Command::new("train-diffusion"));
    let matches = cmd.try_get_matches_from(["train-diffusion", "--out", "unused"])?;
    let mut a = TrainDiffusionArgs::from_arg_matches(&matches)?;
    a.batch_size = batch;
    a.device = device.to_owned();
    Ok(a)
}

/// The column titles of [`format_row`].
fn header(reference_column: bool) -> String {
    let ours = format!("{:<28} {:>5} {:>11}", "name", "batch", "ms/image");
    if reference_column {
        format!("{ours} {:>11} {:>9}", "reference", "ours/ref")
    } else {
        ours
    }
}

/// One table row: ours, and with `reference_column` the reference's ms/image and the ratio
/// ours/reference ("—" where the reference lacks the row).
fn format_row(m: &Measurement, reference_column: bool) -> String {
    let mut line = format!("{:<28} {:>5} {:>11.1}", m.name, m.batch, m.ms_per_image);
    if reference_column {
        match (&m.reference, m.ratio) {
            (Some(r), Some(ratio)) => {
                line += &format!(" {:>11.1} {:>8.2}×", r.ms_per_image, ratio);
            }
            _ => line += &format!(" {:>11} {:>9}", "—", "—"),
        }
    }
    if let Some(step) = m.ms_per_step {
        line += &format!("   ms/step {step:.1}");
        if let Some(r) = m.reference.as_ref().and_then(|r| r.ms_per_step) {
            line += &format!(" vs {r:.1}");
        }
    }
    line
}

fn record(results: &mut Vec<Measurement>, m: Measurement, reference_column: bool) {
    println!("{}", format_row(&m, reference_column));
    results.push(m);
}

/// Runs the benchmark and prints a table.
pub fn run(args: &BenchArgs) -> Result<Vec<Measurement>> {
    let reference = match &args.reference {
        Some(path) => Some(ReferenceTimings::load(path)?),
        None => None,
    };
    if let Some(name) = &args.simd {
        let simd = Simd::parse(name).map_err(|e| anyhow!("--simd: {e}"))?;
        gemm::set_simd(simd).map_err(|e| anyhow!("--simd: {e}"))?;
    }
    for name in &args.configs {
        anyhow::ensure!(
            matches!(name.as_str(), "fixture" | "released"),
            "unknown bench config {name:?} (fixture, released)"
        );
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let simd = simd_name(gemm::active_simd());
    let cpu = cpu_model();
    let threads = rayon::current_num_threads();
    println!("device {device:?}, dtype {dtype:?}, {threads} rayon threads, simd {simd}, cpu {cpu}");
    let with_ref = reference.is_some();
    if let (Some(r), Some(path)) = (&reference, &args.reference) {
        println!(
            "reference {}: torch {}, {} threads, cpu {}, flush_denormal {}, best of {} calls \
             (ours: best of {})",
            path.display(),
            r.torch,
            r.threads,
            r.cpu,
            r.flush_denormal.map_or("?".into(), |b| b.to_string()),
            r.repeats.map_or("?".into(), |n| n.to_string()),
            args.repeats.max(1)
        );
        if r.cpu != cpu {
            println!(
                "warning: {} was measured on {:?}, this machine is {cpu:?}: the ratios compare \
                 different CPUs",
                path.display(),
                r.cpu
            );
        }
        if r.threads != threads {
            println!(
                "warning: the reference ran on {} threads, this run on {threads}",
                r.threads
            );
        }
    }

    let gemm_peak = if args.gemm_n > 0 && device.is_cpu() {
        let active = gemm::active_simd();
        let threads = gemm::kernel_threads();
        let gflops = gemm::large_gemm_gflops(active, args.gemm_n, threads, args.repeats);
        println!(
            "large GEMM peak: {gflops:.1} GFLOP/s (n={}, {threads} threads, simd {})",
            args.gemm_n,
            simd_name(active)
        );
        Some(GemmPeak {
            gflops,
            n: args.gemm_n,
            threads,
            simd: simd_name(active),
        })
    } else {
        None
    };

    println!("{}", header(with_ref));
    let mut results = Vec::new();
    let mut achieved = None;
    for name in &args.configs {
        let cfg = if name == "fixture" {
            fixture_config()
        } else {
            UNetConfig::released()
        };
        let unet = random_unet(&cfg, dtype, &device)?;
        let row = format!("unet-{name}-forward");
        for &b in &args.batches {
            let s = cfg.latent_size;
            let x = Tensor::randn(0f32, 1.0, (b, cfg.input_channels, s, s), &device)?
                .to_dtype(dtype)?;
            let t = Tensor::from_vec(vec![500i64; b], b, &device)?;
            let ctx = Tensor::randn(0f32, 1.0, (b, cfg.context_input_channels), &device)?
                .to_dtype(dtype)?;
            let ms = best_ms(args.repeats, || {
                let eps = unet.forward(&x, &t, Some(&ctx))?;
                device.synchronize()?;
                drop(eps);
                Ok(())
            })? / b as f64;
            let m = Measurement::new(&row, b, ms, None, reference.as_ref());
            if name == "released" && b == 8 {
                let gflop = unet_forward_flops(&cfg) / 1e9;
                let gflops = gflop / (ms / 1000.0);
                achieved = Some(Achieved {
                    name: row.clone(),
                    batch: b,
                    gflop_per_image: gflop,
                    gflops,
                    fraction_of_peak: gemm_peak.as_ref().map(|p| gflops / p.gflops),
                    reference_gflops: m
                        .reference
                        .as_ref()
                        .map(|r| gflop / (r.ms_per_image / 1000.0)),
                });
            }
            record(&mut results, m, with_ref);
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
            let m = Measurement::new(
                format!("ddim{}-{name}-sampling", args.ddim_steps),
                n,
                secs * 1000.0 / n as f64,
                None,
                reference.as_ref(),
            );
            record(&mut results, m, with_ref);
            println!("    = {:.3} images/s", n as f64 / secs);
        }
        if args.ddpm_images > 0 {
            let m = bench_ddpm(&unet, &cfg, name, args, &device, reference.as_ref())?;
            let images_per_s = 1000.0 / m.ms_per_image;
            record(&mut results, m, with_ref);
            println!("    = {images_per_s:.4} images/s");
        }
    }

    // post_quant_conv + decoder, without the codebook quantiser (as the reference script).
    let vq = VqConfig::released();
    let decoder = with_random_weights(DType::F32, &device, |vb| VqDecoder::new(vb, &vq))?;
    for &b in args.batches.iter().filter(|b| **b <= VQ_MAX_BATCH) {
        let z = Tensor::randn(0f32, 1.0, (b, vq.embed_dim, 32, 32), &device)?;
        let ms = best_ms(args.repeats, || {
            decoder.decode(&z, false)?;
            device.synchronize()?;
            Ok(())
        })? / b as f64;
        let m = Measurement::new("vq-f4-decode-128px", b, ms, None, reference.as_ref());
        record(&mut results, m, with_ref);
    }
    drop(decoder);

    let fr_cfg = IResNetConfig::iresnet50();
    let fr = with_random_weights(DType::F32, &device, |vb| IResNet::new(vb, &fr_cfg))?;
    for &b in &args.batches {
        let s = fr_cfg.input_size;
        let x = Tensor::randn(0f32, 1.0, (b, 3, s, s), &device)?;
        let ms = best_ms(args.repeats, || {
            fr.forward(&x)?;
            device.synchronize()?;
            Ok(())
        })? / b as f64;
        let m = Measurement::new("iresnet50-forward", b, ms, None, reference.as_ref());
        record(&mut results, m, with_ref);
    }
    drop(fr);

    if args.train_steps > 0 {
        let cfg = default_unet_config()?;
        let settings = train_settings(TRAIN_BATCH, &args.device)?;
        let steps = StepBench::new(&settings, &cfg, args.train_steps)?;
        let ms = steps.time(TrainKernels::Fused)?.min_ms;
        let m = Measurement::new(
            "default-unet-train-step",
            TRAIN_BATCH,
            ms / TRAIN_BATCH as f64,
            Some(ms),
            reference.as_ref(),
        );
        record(&mut results, m, with_ref);
    }

    match &achieved {
        Some(a) => {
            let mut line = format!(
                "{} batch {}: {:.2} GFLOP/image, achieved {:.1} GFLOP/s",
                a.name, a.batch, a.gflop_per_image, a.gflops
            );
            if let Some(f) = a.fraction_of_peak {
                line += &format!(" = {:.0}% of the large-GEMM peak", f * 100.0);
            }
            if let Some(r) = a.reference_gflops {
                line += &format!(" (reference {r:.1} GFLOP/s)");
            }
            println!("{line}");
        }
        None => println!(
            "achieved GFLOP/s: not measured (needs --configs released with batch 8 in --batches)"
        ),
    }

    if let Some(path) = &args.json {
        let report = Report {
            tool: "idiff-studio bench",
            device: format!("{device:?}"),
            dtype: format!("{dtype:?}"),
            threads,
            simd,
            cpu,
            reference: reference
                .as_ref()
                .zip(args.reference.as_ref())
                .map(|(r, p)| ReferenceSource {
                    file: p.clone(),
                    torch: r.torch.clone(),
                    threads: r.threads,
                    cpu: r.cpu.clone(),
                }),
            rows: &results,
            gemm_peak,
            achieved,
        };
        crate::files::write_json_atomic(path, &report)?;
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
    reference: Option<&ReferenceTimings>,
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
    let name = if steps < schedule.len() {
        format!("ddpm1000-{name}-sampling (extrapolated from {steps} steps)")
    } else {
        format!("ddpm1000-{name}-sampling")
    };
    Ok(Measurement::new(
        name,
        n,
        secs * 1000.0 / n as f64,
        None,
        reference,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "tool": "reference-bench", "torch": "2.15.0", "threads": 2,
      "cpu": "Some CPU", "flush_denormal": true, "repeats": 3,
      "rows": [
        {"name": "unet-fixture-forward", "batch": 1, "ms_per_image": 40.0},
        {"name": "default-unet-train-step", "batch": 32, "ms_per_image": 25.0,
         "ms_per_step": 800.0}
      ],
      "params": {"unet-fixture-forward": 7589155}
    }"#;

    #[test]
    fn reference_json_parses_and_rows_are_found_by_name_and_batch() {
        let r = ReferenceTimings::parse(GOOD).unwrap();
        assert_eq!(
            (r.torch.as_str(), r.threads, r.cpu.as_str()),
            ("2.15.0", 2, "Some CPU")
        );
        assert_eq!(r.repeats, Some(3));
        assert_eq!(r.row("unet-fixture-forward", 1).unwrap().ms_per_image, 40.0);
        assert!(r.row("unet-fixture-forward", 8).is_none());
        assert!(r.row("vq-f4-decode-128px", 1).is_none());
        let train = r.row("default-unet-train-step", 32).unwrap();
        assert_eq!(train.ms_per_step, Some(800.0));
    }

    #[test]
    fn foreign_or_malformed_reference_json_is_refused() {
        let foreign = r#"{"tool": "something-else", "rows": []}"#;
        let e = ReferenceTimings::parse(foreign).unwrap_err().to_string();
        assert!(e.contains("something-else"), "{e}");
        let no_tool = r#"[{"name": "unet-fixture-forward"}]"#;
        let e = ReferenceTimings::parse(no_tool).unwrap_err().to_string();
        assert!(e.contains("no \"tool\""), "{e}");
        let e = ReferenceTimings::parse("{not json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        let missing_rows = r#"{"tool": "reference-bench", "torch": "x", "threads": 1, "cpu": "c"}"#;
        let e = ReferenceTimings::parse(missing_rows)
            .unwrap_err()
            .to_string();
        assert!(e.contains("malformed"), "{e}");
        let zero = GOOD.replace("40.0", "0.0");
        let e = ReferenceTimings::parse(&zero).unwrap_err().to_string();
        assert!(e.contains("no positive time"), "{e}");
        // Every error is one line naming the file.
        let dir = std::env::temp_dir().join(format!("idiff-bench-ref-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("foreign.json");
        std::fs::write(&path, foreign).unwrap();
        for p in [path.clone(), dir.join("missing.json")] {
            let e = format!("{:#}", ReferenceTimings::load(&p).unwrap_err());
            assert!(
                e.contains(&p.display().to_string()) && !e.contains('\n'),
                "{e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ratio_is_printed_only_with_a_reference() {
        let r = ReferenceTimings::parse(GOOD).unwrap();
        let alone = Measurement::new("unet-fixture-forward", 1, 20.0, None, None);
        assert!(alone.reference.is_none() && alone.ratio.is_none());
        let row = format_row(&alone, false);
        assert!(!row.contains('×') && !row.contains('—'), "{row}");
        assert!(!header(false).contains("ref"));
        let json = serde_json::to_string(&alone).unwrap();
        assert!(
            !json.contains("ratio") && !json.contains("reference"),
            "{json}"
        );

        let with = Measurement::new("unet-fixture-forward", 1, 20.0, None, Some(&r));
        assert_eq!(with.ratio, Some(0.5));
        let row = format_row(&with, true);
        assert!(row.contains("40.0") && row.contains("0.50×"), "{row}");
        assert!(header(true).contains("ours/ref"));

        let lacking = Measurement::new("iresnet50-forward", 1, 20.0, None, Some(&r));
        let row = format_row(&lacking, true);
        assert!(row.contains('—') && !row.contains('×'), "{row}");

        let train = Measurement::new("default-unet-train-step", 32, 20.0, Some(640.0), Some(&r));
        let row = format_row(&train, true);
        assert!(
            row.contains("0.80×") && row.contains("640.0 vs 800.0"),
            "{row}"
        );
    }

    /// One level, no attention in the levels, one block per level, 4×4 latents: every term
    /// written out by hand.
    #[test]
    fn flop_count_of_a_hand_counted_unet() {
        let cfg = UNetConfig {
            initial_channels: 32,
            channel_multipliers: vec![1],
            is_attention: vec![false],
            n_blocks_per_resolution: 1,
            context_input_channels: 8,
            context_channels: 32,
            latent_size: 4,
            ..UNetConfig::released()
        };
        let n = 16.0; // tokens (4×4)
        let image_proj = 2.0 * 32.0 * 3.0 * 9.0 * n;
        let time = 2.0 * 32.0 * 128.0 + 2.0 * 128.0 * 128.0;
        let context = 2.0 * 8.0 * 32.0;
        // time_emb (128 → C) and scale/shift (C → C) of a residual block with C = 32.
        let modulation = 2.0 * 128.0 * 32.0 + 2.0 * 2.0 * 32.0 * 32.0;
        let res_32_32 = 2.0 * (2.0 * 32.0 * 32.0 * 9.0 * n) + modulation;
        let res_64_32 = 2.0 * 32.0 * 64.0 * 9.0 * n // conv1
            + 2.0 * 32.0 * 32.0 * 9.0 * n // conv2
            + 2.0 * 32.0 * 64.0 * n // 1×1 shortcut
            + modulation;
        let middle_attn = 2.0 * 32.0 * (32.0 * 32.0) // c_proj_in: 32 → 32 tokens × 32
            + 2.0 * 2.0 * 32.0 * 32.0 * n // x_proj_in, x_proj_out
            + 4.0 * 2.0 * 32.0 * 32.0 * n // self q, k, v, out
            + 2.0 * 2.0 * n * n * 32.0 // self scores + weighted sum
            + 2.0 * 2.0 * 32.0 * 32.0 * n // cross q, out
            + 2.0 * 2.0 * 32.0 * 32.0 * 32.0 // cross k, v over 32 context tokens
            + 2.0 * 2.0 * n * 32.0 * 32.0 // cross scores + weighted sum
            + 2.0 * 2.0 * 32.0 * 128.0 * n; // feed-forward 32 → 128 → 32
        let final_conv = 2.0 * 3.0 * 32.0 * 9.0 * n;
        let expected = image_proj
            + time
            + context
            + res_32_32 // down.0
            + 2.0 * res_32_32 + middle_attn // middle
            + 2.0 * res_64_32 // up.0 (with the down.0 skip), up.1 (with the image_proj skip)
            + final_conv;
        assert_eq!(expected, 4_647_424.0);
        assert_eq!(unet_forward_flops(&cfg), expected);
    }

    /// The released U-Net: about 18 GFLOP per image is what the reference's throughput
    /// implies (≈283 GFLOP/s at 64.5 ms/image); the analytic count must be of that order.
    #[test]
    fn flop_count_of_the_released_unet_is_plausible() {
        let gflop = unet_forward_flops(&UNetConfig::released()) / 1e9;
        assert!((10.0..30.0).contains(&gflop), "{gflop} GFLOP/image");
        let fixture = unet_forward_flops(&fixture_config()) / 1e9;
        assert!(fixture < gflop / 10.0, "{fixture} GFLOP/image");
        let default = unet_forward_flops(&default_unet_config().unwrap());
        assert!(default > 0.0);
    }

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

    #[test]
    fn train_settings_are_train_diffusions_defaults() {
        let a = train_settings(32, "cpu").unwrap();
        assert_eq!((a.batch_size, a.device.as_str()), (32, "cpu"));
        assert!(a.lr > 0.0 && a.bench_steps.is_none());
    }
}
