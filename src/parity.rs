//! `idiff-studio parity`: runs the reference parity checks on any device and dtype and
//! reports the max abs error of each, so a GPU machine (or a bf16 run) can be checked
//! without the test harness.

use crate::diffusion::checkpoint::load_unet;
use crate::diffusion::sampler::Sampler;
use crate::diffusion::schedule::Schedule;
use crate::models::config::read_config;
use crate::models::iresnet::{IResNet, IResNetConfig};
use crate::models::unet::UNetConfig;
use crate::models::vq::{VqConfig, VqDecoder, VqEncoder};
use crate::pipeline::{parse_device, parse_dtype};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Arguments of `parity`.
#[derive(Debug, clap::Args)]
pub struct ParityArgs {
    /// Folder with the reference fixtures (default: $IDIFF_FIXTURES or ../shared/fixtures).
    #[arg(long)]
    pub fixtures: Option<PathBuf>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// dtype of the U-Net forward: f32, bf16, f16 (the decoders and IResNet stay f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// CPU kernel instruction set: avx512, avx2 or portable (default: the best this CPU
    /// has, or `IDIFF_SIMD`).
    #[arg(long)]
    pub simd: Option<String>,
}

/// One parity check.
#[derive(Debug, Clone, Serialize)]
pub struct ParityCheck {
    /// What was compared.
    pub name: String,
    /// Max abs error against the reference.
    pub max_abs_error: f64,
    /// The tolerance of the f32 test suite.
    pub tolerance: f64,
    /// Whether the error is within the tolerance.
    pub pass: bool,
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

fn check(name: &str, got: &Tensor, want: &Tensor, tolerance: f64) -> Result<ParityCheck> {
    let err = max_abs(got, want)?;
    Ok(ParityCheck {
        name: name.to_owned(),
        max_abs_error: err,
        tolerance,
        pass: err <= tolerance,
    })
}

fn load_io(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Runs every parity check found in `dir`.
pub fn run_checks(dir: &Path, device: &Device, dtype: DType) -> Result<Vec<ParityCheck>> {
    let f = |n: &str| dir.join(n);
    let mut out = Vec::new();
    let schedule = Schedule::reference();

    let cfg: UNetConfig = read_config(&f("unet_tiny_config.json"))?;
    let io = load_io(&f("unet_tiny_io.safetensors"), device)?;
    for ckpt in [
        "unet_tiny_ema_averaged_model.ckpt",
        "unet_tiny_eps_model_only.ckpt",
    ] {
        let unet = load_unet(f(ckpt), &cfg, &schedule, dtype, device)?;
        let x = io["x"].to_dtype(dtype)?;
        let eps = unet.forward(&x, &io["t"], Some(&io["context"]))?;
        out.push(check(&format!("{ckpt}: eps"), &eps, &io["eps"], 1e-4)?);
        let eps0 = unet.forward(&x, &io["t"], None)?;
        out.push(check(
            &format!("{ckpt}: eps_empty_context"),
            &eps0,
            &io["eps_empty_context"],
            1e-4,
        )?);
        if ckpt.contains("eps_model_only") {
            let sampler = Sampler::new(&unet, &schedule);
            let c = unet.project_context(&io["context"].to_dtype(dtype)?)?;
            let mut xt = io["x"].clone();
            for (k, t) in (996..=999).rev().enumerate() {
                let eps = sampler.guided_eps(&xt, t, &c, 1.0)?;
                xt = sampler.ddpm_step(&xt, &eps, t, Some(&io["ddpm_noise"].get(k)?))?;
            }
            out.push(check(
                "ddpm steps 999..996",
                &xt,
                &io["ddpm_x_after_steps_999_to_996"],
                1e-3,
            )?);
        }
    }

    let vq: VqConfig = read_config(&f("vq_tiny_config.json"))?;
    let io = load_io(&f("vq_tiny_io.safetensors"), device)?;
    let enc = VqEncoder::load(f("vq_tiny_first_stage_encoder_state_dict.pt"), &vq, device)?;
    let dec = VqDecoder::load(f("vq_tiny_first_stage_decoder_state_dict.pt"), &vq, device)?;
    let latent = enc.encode(&io["image"])?;
    out.push(check("vq latent", &latent, &io["latent"], 1e-4)?);
    let idx = dec.quantizer().indices(&latent)?.to_dtype(DType::I64)?;
    out.push(check("vq code_indices", &idx, &io["code_indices"], 0.0)?);
    let q = dec.decode(&io["latent"], true)?;
    out.push(check(
        "vq decoded_quantized",
        &q,
        &io["decoded_quantized"],
        1e-4,
    )?);
    let nq = dec.decode(&io["latent"], false)?;
    out.push(check(
        "vq decoded_not_quantized",
        &nq,
        &io["decoded_not_quantized"],
        1e-4,
    )?);

    let ir: IResNetConfig = read_config(&f("iresnet_tiny_config.json"))?;
    let io = load_io(&f("iresnet_tiny_io.safetensors"), device)?;
    let net = IResNet::load(f("iresnet_tiny_backbone.pth"), &ir, device)?;
    out.push(check(
        "iresnet embedding",
        &net.forward(&io["image"])?,
        &io["embedding"],
        1e-4,
    )?);
    let flipped = io["image"].flip(&[3]).context("flip")?;
    out.push(check(
        "iresnet embedding_of_flipped",
        &net.forward(&flipped)?,
        &io["embedding_of_flipped"],
        1e-4,
    )?);
    Ok(out)
}

/// The `parity` subcommand: prints a table; exit code 1 when a check fails.
pub fn run(args: &ParityArgs) -> Result<i32> {
    let dir = match &args.fixtures {
        Some(d) => d.clone(),
        None => crate::testutil::fixtures_dir()
            .context("no fixtures folder: pass --fixtures DIR or set IDIFF_FIXTURES")?,
    };
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    if let Some(name) = &args.simd {
        let simd =
            crate::kernels::gemm::Simd::parse(name).map_err(|e| anyhow::anyhow!("--simd: {e}"))?;
        crate::kernels::gemm::set_simd(simd).map_err(|e| anyhow::anyhow!("--simd: {e}"))?;
    }
    println!("CPU kernels: {:?}", crate::kernels::gemm::active_simd());
    let checks = run_checks(&dir, &device, dtype)?;
    for c in &checks {
        println!(
            "{:<52} max abs error {:>11.3e}  (f32 tolerance {:.0e})  {}",
            c.name,
            c.max_abs_error,
            c.tolerance,
            if c.pass { "ok" } else { "OVER" }
        );
    }
    if let Some(path) = &args.json {
        crate::files::write_json_atomic(path, &checks)?;
    }
    let all_pass = checks.iter().all(|c| c.pass);
    Ok(if all_pass || dtype != DType::F32 {
        0
    } else {
        1
    })
}
