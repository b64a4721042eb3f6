//! The Model panel: weights, configs, device and dtype; Load; what is loaded.

use super::widgets::{caption, path_field, primary_button};
use super::ViewCtx;
use crate::app::forms::WeightSource;
use crate::app::messages::PickTarget;
use crate::app::state::{format_count, AppState, Busy};
use crate::app::style;
use egui::{RichText, Ui};

/// Draws the Model panel.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let m = &mut state.model;
    ui.horizontal(|ui| {
        let label = ui.label("Weights");
        egui::ComboBox::from_id_salt("weight_source")
            .selected_text(match m.source {
                WeightSource::Files => "Checkpoint files",
            })
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut m.source, WeightSource::Files, "Checkpoint files");
            })
            .response
            .labelled_by(label.id);
    });
    let ok = cx.dialogs_ok;
    let picks = [
        path_field(
            ui,
            "U-Net checkpoint",
            &mut m.unet,
            "ema_averaged_model.ckpt",
            PickTarget::Unet,
            ok,
        ),
        path_field(
            ui,
            "U-Net config (optional)",
            &mut m.unet_config,
            "default: .hydra beside it, else released",
            PickTarget::UnetConfig,
            ok,
        ),
        path_field(
            ui,
            "VQ decoder",
            &mut m.decoder,
            "first_stage_decoder_state_dict.pt",
            PickTarget::Decoder,
            ok,
        ),
        path_field(
            ui,
            "Decoder config (optional)",
            &mut m.decoder_config,
            "default: released VQ-f4",
            PickTarget::DecoderConfig,
            ok,
        ),
        path_field(
            ui,
            "FR model (used by Analyze)",
            &mut m.fr_model,
            "optional, for later analysis",
            PickTarget::FrModel,
            ok,
        ),
    ];
    for target in picks.into_iter().flatten() {
        cx.pick(target, state_path(m, target));
    }
    ui.add_space(2.0);
    ui.horizontal(|ui| {
        let label = ui.label("Device");
        egui::ComboBox::from_id_salt("device")
            .width(80.0)
            .selected_text(m.device.clone())
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut m.device, "cpu".to_string(), "cpu");
                if cfg!(feature = "cuda") {
                    ui.selectable_value(&mut m.device, "cuda:0".to_string(), "cuda:0");
                }
            })
            .response
            .labelled_by(label.id);
        let label = ui.label("dtype");
        egui::ComboBox::from_id_salt("dtype")
            .width(60.0)
            .selected_text(m.dtype.clone())
            .show_ui(ui, |ui| {
                for d in ["f32", "bf16", "f16"] {
                    ui.selectable_value(&mut m.dtype, d.to_string(), d);
                }
            })
            .response
            .labelled_by(label.id);
    });
    ui.add_space(4.0);
    let loading = matches!(state.busy, Busy::Loading);
    let label = if loading { "Loading…" } else { "Load model" };
    if primary_button(ui, state.is_idle(), label).clicked() {
        state.load_model(cx.worker);
    }
    ui.add_space(2.0);
    if loading {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label("loading on the worker thread…");
        });
    } else if let Some(e) = &state.model_error {
        ui.label(RichText::new(format!("Load failed: {e}")).color(style::DANGER));
    } else if let Some(info) = state.model_info() {
        egui::Grid::new("model_info")
            .num_columns(2)
            .spacing([8.0, 2.0])
            .show(ui, |ui| {
                let mut kv = |k: &str, v: String| {
                    caption(ui, k);
                    ui.label(v);
                    ui.end_row();
                };
                kv("status", "loaded".into());
                kv("U-Net", info.unet_file.clone());
                kv("decoder", info.decoder_file.clone());
                kv(
                    "parameters",
                    format!(
                        "{} (U-Net {})",
                        format_count(info.parameters()),
                        format_count(info.unet_parameters)
                    ),
                );
                kv("device", format!("{} · {}", info.device, info.dtype));
                kv("images", format!("{0}×{0} px", info.image_size));
            });
    } else {
        ui.label(RichText::new("No model loaded.").color(style::WARN));
    }
}

fn state_path(m: &crate::app::forms::ModelForm, target: PickTarget) -> Option<std::path::PathBuf> {
    let s = match target {
        PickTarget::Unet => &m.unet,
        PickTarget::UnetConfig => &m.unet_config,
        PickTarget::Decoder => &m.decoder,
        PickTarget::DecoderConfig => &m.decoder_config,
        _ => &m.fr_model,
    };
    (!s.is_empty()).then(|| s.into())
}
