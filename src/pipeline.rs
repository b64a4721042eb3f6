//! The sampling pipeline: U-Net + schedule + VQ decoder on one device, turning identity
//! contexts into RGB images. Used by the CLI's `generate`, the studio's worker and `bench`.

use crate::diffusion::checkpoint::load_unet;
use crate::diffusion::rng::ImageKey;
use crate::diffusion::sampler::{Sampler, SamplingSettings, StepProgress};
use crate::diffusion::schedule::Schedule;
use crate::models::config::{unet_config_for, ConfigSource};
use crate::models::unet::{ConditionalUNet, UNetConfig};
use crate::models::vq::{VqConfig, VqDecoder};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use std::path::PathBuf;

/// Where the pipeline's weights and configs come from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WeightPaths {
    /// U-Net checkpoint.
    pub unet: PathBuf,
    /// Explicit U-Net config (JSON/YAML with the reference's keys); else hydra or released.
    pub unet_config: Option<PathBuf>,
    /// VQ decoder state dict.
    pub decoder: PathBuf,
    /// Explicit decoder config; else the released VQ-f4 config.
    pub decoder_config: Option<PathBuf>,
}

/// A loaded sampling pipeline.
pub struct Pipeline {
    /// The denoising network.
    pub unet: ConditionalUNet,
    /// The first-stage decoder.
    pub decoder: VqDecoder,
    /// The noise schedule.
    pub schedule: Schedule,
    /// Device the models live on.
    pub device: Device,
    /// Where the U-Net architecture came from.
    pub unet_config_source: ConfigSource,
}

impl Pipeline {
    /// Loads both networks, checking weights against their configs.
    pub fn load(paths: &WeightPaths, dtype: DType, device: &Device) -> Result<Self> {
        let (cfg, source) = unet_config_for(&paths.unet, paths.unet_config.as_deref())?;
        let schedule = Schedule::reference();
        let unet = load_unet(&paths.unet, &cfg, &schedule, dtype, device)?;
        let vq_cfg = match &paths.decoder_config {
            Some(p) => crate::models::config::read_config::<VqConfig>(p)?,
            None => VqConfig::released(),
        };
        let decoder = VqDecoder::load(&paths.decoder, &vq_cfg, device)?;
        Ok(Self {
            unet,
            decoder,
            schedule,
            device: device.clone(),
            unet_config_source: source,
        })
    }

    /// The U-Net configuration.
    pub fn unet_config(&self) -> &UNetConfig {
        self.unet.config()
    }

    /// Samples and decodes one batch. Returns `None` when `on_step` cancelled.
    pub fn generate_batch(
        &self,
        contexts: &[Vec<f32>],
        keys: &[ImageKey],
        settings: &SamplingSettings,
        on_step: &mut dyn FnMut(&StepProgress) -> bool,
    ) -> Result<Option<Vec<RgbImage>>> {
        let width = self.unet_config().context_input_channels;
        anyhow::ensure!(
            contexts.len() == keys.len(),
            "contexts and keys differ in length"
        );
        for (c, k) in contexts.iter().zip(keys) {
            anyhow::ensure!(
                c.len() == width,
                "identity {} has a context of width {} but the U-Net expects {width}",
                k.identity,
                c.len()
            );
        }
        let flat: Vec<f32> = contexts.iter().flatten().copied().collect();
        let ctx = Tensor::from_vec(flat, (keys.len(), width), &self.device)?;
        let sampler = Sampler::new(&self.unet, &self.schedule);
        let Some(latents) = sampler.sample(&ctx, keys, settings, on_step)? else {
            return Ok(None);
        };
        Ok(Some(self.decode(&latents)?))
    }

    /// Decodes latents (B, 3, h, w) to RGB images.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        // One image at a time on the CPU: the decoder's im2col buffers at full resolution are
        // tens of MB per image, and larger batches only add cache misses and page faults.
        let total = latents.dim(0)?;
        let chunk = if self.device.is_cpu() {
            1
        } else {
            total.max(1)
        };
        let mut images = Vec::with_capacity(total);
        for start in (0..total).step_by(chunk) {
            let n = chunk.min(total - start);
            let unit = self
                .decoder
                .decode_to_unit(&latents.narrow(0, start, n)?, true)
                .context("VQ decode")?;
            images.extend(unit_tensor_to_images(&unit)?);
        }
        Ok(images)
    }
}

/// Converts (B, 3, H, W) values in [0, 1] to 8-bit images as torchvision's `save_image`
/// does: floor(x·255 + 0.5), clamped.
pub fn unit_tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4()?;
    anyhow::ensure!(c == 3, "expected 3 channels, got {c}");
    let data: Vec<f32> = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let base = i * 3 * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let p = y as usize * w + x as usize;
                let px =
                    |ch: usize| (data[base + ch * plane + p] * 255.0 + 0.5).clamp(0.0, 255.0) as u8;
                image::Rgb([px(0), px(1), px(2)])
            })
        })
        .collect())
}

/// Parses `cpu` or `cuda:N` (the latter only in builds with the `cuda` feature).
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map_or(Ok(0), |n| n.parse::<usize>())
                .with_context(|| format!("bad device {s:?} (expected cuda:N)"))?;
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "device {s}: this build has no CUDA support (rebuild with --features cuda)"
                );
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        other => anyhow::bail!("unknown device {other:?} (expected cpu or cuda:N)"),
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => anyhow::bail!("unknown dtype {other:?} (expected f32, bf16 or f16)"),
    }
}

/// Sets flush-to-zero and denormals-are-zero on the calling thread and every rayon worker:
/// random or nearly-converged weights otherwise spend most of their time in denormals.
pub fn enable_flush_to_zero() {
    fn set_this_thread() {
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let mut csr: u32 = 0;
            std::arch::asm!("stmxcsr [{p}]", p = in(reg) &mut csr, options(nostack));
            csr |= 0x8040; // FTZ (bit 15) | DAZ (bit 6)
            std::arch::asm!("ldmxcsr [{p}]", p = in(reg) &csr, options(nostack));
        }
    }
    set_this_thread();
    rayon::broadcast(|_| set_this_thread());
}
