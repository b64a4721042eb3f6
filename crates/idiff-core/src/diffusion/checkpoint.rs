//! Loading a U-Net checkpoint together with the noise-schedule buffers the reference stores
//! beside its weights.

use super::schedule::Schedule;
use crate::checkpoint::load_state_dict;
use crate::models::unet::{ConditionalUNet, UNetConfig};
use candle_core::{DType, Device};
use std::path::Path;

/// Loads a U-Net from a checkpoint (torch zip or safetensors), with or without the
/// `eps_model.` prefix. Schedule buffers stored beside the weights are checked against
/// `schedule` and a mismatch is refused.
pub fn load_unet(
    path: impl AsRef<Path>,
    cfg: &UNetConfig,
    schedule: &Schedule,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<ConditionalUNet> {
    cfg.validate()?;
    let mut state = load_state_dict(path.as_ref())?.strip_prefix("eps_model.");
    let file = state.path.display().to_string();
    for name in Schedule::BUFFER_NAMES {
        if let Some(buffer) = state.take(name) {
            schedule.check_buffer(name, &buffer, &file)?;
        }
    }
    ConditionalUNet::from_state_dict(&state, cfg, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    fn tiny_config() -> Option<UNetConfig> {
        let p = fixture("unet_tiny_config.json")?;
        Some(serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
    }

    #[test]
    fn mismatched_schedule_buffers_are_refused() {
        let (Some(cfg), Some(w)) = (tiny_config(), fixture("unet_tiny_ema_averaged_model.ckpt"))
        else {
            return;
        };
        let other = Schedule::linear(1000, 1e-4, 0.012);
        let err = load_unet(&w, &cfg, &other, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("schedule buffer"), "{err}");
    }
}
