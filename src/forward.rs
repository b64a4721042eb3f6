//! Tensor-level forwards for parity checks and for Python users: read named tensors from a
//! safetensors file, run one network, write named tensors.

use crate::diffusion::checkpoint::load_unet;
use crate::diffusion::sampler::Sampler;
use crate::diffusion::schedule::Schedule;
use crate::models::config::{read_config, unet_config_for};
use crate::models::iresnet::{IResNet, IResNetConfig};
use crate::models::vq::{VqConfig, VqDecoder, VqEncoder};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Reads all tensors of a safetensors input file onto `device`.
pub fn read_inputs(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        anyhow::bail!("cannot open {}: no such file", path.display());
    }
    candle_core::safetensors::load(path, device)
        .map_err(|e| anyhow::anyhow!("{}: invalid safetensors input: {e}", path.display()))
}

/// Takes a required input tensor, naming the file and tensor when it is absent.
pub fn require<'a>(
    inputs: &'a HashMap<String, Tensor>,
    name: &str,
    file: &Path,
) -> Result<&'a Tensor> {
    inputs
        .get(name)
        .with_context(|| format!("{}: input tensor `{name}` is missing", file.display()))
}

/// Writes tensors (moved to the CPU) atomically to a safetensors file.
pub fn write_outputs(path: &Path, tensors: Vec<(&str, Tensor)>) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k.to_owned(), t.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    crate::files::write_atomic_with(path, |tmp| Ok(candle_core::safetensors::save(&map, tmp)?))
}

fn check_finite(t: &Tensor, name: &str, file: &Path) -> Result<()> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        anyhow::bail!(
            "{}: input tensor `{name}` holds a non-finite value at flat index {i}",
            file.display()
        );
    }
    Ok(())
}

/// `forward unet`: reads `x`, `t` (int64) and optional `context` (absent → the empty
/// context), writes `eps`.
pub fn unet(
    weights: &Path,
    config: Option<&Path>,
    inputs: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let (cfg, _) = unet_config_for(weights, config)?;
    let model = load_unet(weights, &cfg, &Schedule::reference(), DType::F32, device)?;
    let io = read_inputs(inputs, device)?;
    let x = require(&io, "x", inputs)?;
    check_finite(x, "x", inputs)?;
    let t = require(&io, "t", inputs)?;
    let eps = model.forward(x, t, io.get("context"))?;
    write_outputs(out, vec![("eps", eps)])
}

/// `forward ddpm-steps`: runs the given ancestral steps from `x` with `context` (optional)
/// and `ddpm_noise[k]` as z of the k-th listed step; writes `x`.
pub fn ddpm_steps(
    weights: &Path,
    config: Option<&Path>,
    inputs: &Path,
    steps: &[usize],
    out: &Path,
    device: &Device,
) -> Result<()> {
    let (cfg, _) = unet_config_for(weights, config)?;
    let schedule = Schedule::reference();
    let model = load_unet(weights, &cfg, &schedule, DType::F32, device)?;
    let io = read_inputs(inputs, device)?;
    let mut x = require(&io, "x", inputs)?.clone();
    let b = x.dim(0)?;
    let c = match io.get("context") {
        Some(ctx) => model.project_context(ctx)?,
        None => model.empty_context(b, DType::F32, device)?,
    };
    let noise = io.get("ddpm_noise");
    let sampler = Sampler::new(&model, &schedule);
    for (k, &t) in steps.iter().enumerate() {
        anyhow::ensure!(
            t < schedule.len(),
            "step {t} is outside 0..{}",
            schedule.len()
        );
        let eps = sampler.guided_eps(&x, t, &c, 1.0)?;
        let z = match noise {
            Some(n) if t > 1 => Some(n.get(k).with_context(|| {
                format!(
                    "{}: `ddpm_noise` has no entry {k} for step {t}",
                    inputs.display()
                )
            })?),
            None if t > 1 => anyhow::bail!("{}: step {t} needs `ddpm_noise`", inputs.display()),
            _ => None,
        };
        x = sampler.ddpm_step(&x, &eps, t, z.as_ref())?;
    }
    write_outputs(out, vec![("x", x)])
}

/// `forward vq-encode`: reads `image`, writes `latent` and `code_indices`. The codebook
/// lives in the decoder's state dict (`quantize.embedding.weight`): `codebook` names it, else
/// the sibling file with `decoder` in place of `encoder` in its name is used.
pub fn vq_encode(
    weights: &Path,
    codebook: Option<&Path>,
    config: Option<&Path>,
    inputs: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let cfg = vq_config(config)?;
    let encoder = VqEncoder::load(weights, &cfg, device)?;
    let codebook = match codebook {
        Some(p) => p.to_path_buf(),
        None => sibling_decoder(weights).with_context(|| {
            format!(
                "{}: the codebook is in the decoder state dict; pass --codebook DECODER",
                weights.display()
            )
        })?,
    };
    let decoder = VqDecoder::load(&codebook, &cfg, device)?;
    let io = read_inputs(inputs, device)?;
    let image = require(&io, "image", inputs)?;
    check_finite(image, "image", inputs)?;
    let latent = encoder.encode(image)?;
    let indices = decoder.quantizer().indices(&latent)?.to_dtype(DType::I64)?;
    write_outputs(out, vec![("latent", latent), ("code_indices", indices)])
}

fn sibling_decoder(encoder: &Path) -> Option<std::path::PathBuf> {
    let name = encoder.file_name()?.to_str()?;
    let candidate = encoder.with_file_name(name.replace("encoder", "decoder"));
    (candidate != encoder && candidate.is_file()).then_some(candidate)
}

/// `forward vq-decode`: reads `latent`, writes `decoded_quantized`,
/// `decoded_not_quantized` and `decoded_quantized_01`.
pub fn vq_decode(
    weights: &Path,
    config: Option<&Path>,
    inputs: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let cfg = vq_config(config)?;
    let decoder = VqDecoder::load(weights, &cfg, device)?;
    let io = read_inputs(inputs, device)?;
    let latent = require(&io, "latent", inputs)?;
    let q = decoder.decode(latent, true)?;
    let nq = decoder.decode(latent, false)?;
    let q01 = ((q.clamp(-1f32, 1f32)? + 1.0)? / 2.0)?;
    write_outputs(
        out,
        vec![
            ("decoded_quantized", q),
            ("decoded_not_quantized", nq),
            ("decoded_quantized_01", q01),
        ],
    )
}

/// `forward iresnet`: reads `image`, writes `embedding` (raw, not normalised).
pub fn iresnet(
    weights: &Path,
    config: Option<&Path>,
    inputs: &Path,
    out: &Path,
    device: &Device,
) -> Result<()> {
    let cfg: IResNetConfig = match config {
        Some(p) => read_config(p)?,
        None => IResNetConfig::iresnet100(),
    };
    let model = IResNet::load(weights, &cfg, device)?;
    let io = read_inputs(inputs, device)?;
    let image = require(&io, "image", inputs)?;
    let emb = model.forward(image)?;
    write_outputs(out, vec![("embedding", emb)])
}

fn vq_config(config: Option<&Path>) -> Result<VqConfig> {
    match config {
        Some(p) => read_config(p),
        None => Ok(VqConfig::released()),
    }
}
