//! Loading the sampling pipeline on the worker thread.

use super::guard::on_ui_thread;
use super::protocol::{LoadRequest, ModelInfo};
use crate::checkpoint::parameter_specs;
use crate::models::unet::ConditionalUNet;
use crate::models::vq::VqDecoder;
use crate::pipeline::{parse_device, parse_dtype, Pipeline};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;

/// Loads the pipeline described by `req` and summarises it.
///
/// Never call this on the UI thread (checked in debug builds).
pub fn load_pipeline(req: &LoadRequest) -> Result<(Pipeline, ModelInfo)> {
    debug_assert!(!on_ui_thread(), "model loading on the UI thread");
    let start = Instant::now();
    let device = parse_device(req.device.trim())?;
    let dtype = parse_dtype(req.dtype.trim())?;
    for (what, p) in [
        ("U-Net", &req.weights.unet),
        ("decoder", &req.weights.decoder),
    ] {
        anyhow::ensure!(
            !p.as_os_str().is_empty(),
            "no {what} checkpoint chosen: pick a file or type its path"
        );
    }
    let pipeline = Pipeline::load(&req.weights, dtype, &device)
        .with_context(|| format!("cannot load {}", file_name(&req.weights.unet)))?;
    let unet_cfg = pipeline.unet_config().clone();
    let vq_cfg = pipeline.decoder.config().clone();
    let count = |specs: Vec<crate::checkpoint::ParameterSpec>| -> usize {
        specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>())
            .sum()
    };
    let unet_parameters = count(parameter_specs(|vb| ConditionalUNet::new(vb, &unet_cfg))?);
    let decoder_parameters = count(parameter_specs(|vb| VqDecoder::new(vb, &vq_cfg))?);
    let info = ModelInfo {
        unet_file: file_name(&req.weights.unet),
        decoder_file: file_name(&req.weights.decoder),
        unet_parameters,
        decoder_parameters,
        device: device_label(&pipeline.device),
        dtype: format!("{dtype:?}").to_lowercase(),
        context_dim: unet_cfg.context_input_channels,
        image_size: unet_cfg.latent_size * vq_cfg.downsample_factor(),
        config_source: pipeline.unet_config_source.to_string(),
        load_seconds: start.elapsed().as_secs_f64(),
    };
    Ok((pipeline, info))
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn device_label(d: &candle_core::Device) -> String {
    match d {
        candle_core::Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()).to_lowercase(),
    }
}
