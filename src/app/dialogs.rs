//! Native file dialogs, run on short-lived background threads so the UI never blocks.
//! They are skipped when there is no display (neither `DISPLAY` nor `WAYLAND_DISPLAY`):
//! the path text fields always work.

use super::messages::{AppMessage, PickTarget};
use crate::worker::EventSender;
use std::path::PathBuf;

/// True when a display is available for native dialogs.
pub fn dialogs_available() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

fn filters(target: PickTarget) -> (&'static str, &'static [&'static str]) {
    match target {
        PickTarget::Unet | PickTarget::Decoder | PickTarget::FrModel => {
            ("Checkpoints", &["ckpt", "pt", "pth", "safetensors", "onnx"])
        }
        PickTarget::UnetConfig | PickTarget::DecoderConfig => ("Configs", &["json", "yaml", "yml"]),
        PickTarget::Contexts => ("Context files", &["npy", "safetensors", "pkl", "pt"]),
        PickTarget::OpenSession | PickTarget::SaveSession => ("Sessions", &["json"]),
        PickTarget::ExportPng => ("PNG images", &["png"]),
        PickTarget::DatasetEmbeddings | PickTarget::DatasetReference => {
            ("Embeddings", &["safetensors", "npy", "pkl", "pt"])
        }
        PickTarget::DatasetRejects => ("Rejects / sessions", &["json"]),
        PickTarget::DatasetSource
        | PickTarget::DatasetOut
        | PickTarget::TrainData
        | PickTarget::TrainOut => ("Folders", &[]),
        PickTarget::TrainVal => ("Verification pairs", &["bin"]),
        PickTarget::Photo => ("Images", &["jpg", "jpeg", "png", "bmp", "webp"]),
        PickTarget::ModelsDir => ("Folders", &[]),
    }
}

/// Opens a dialog for `target` on a background thread; the answer arrives as
/// [`AppMessage::FilePicked`]. Does nothing (sends `None`) without a display.
pub fn spawn_pick(target: PickTarget, start: Option<PathBuf>, events: EventSender) {
    if !dialogs_available() {
        events.send(AppMessage::FilePicked { target, path: None }.into_event());
        return;
    }
    std::thread::spawn(move || {
        let (name, exts) = filters(target);
        let mut dialog = rfd::FileDialog::new();
        if !exts.is_empty() {
            dialog = dialog.add_filter(name, exts);
        }
        if let Some(dir) = start
            .as_ref()
            .and_then(|p| p.parent())
            .filter(|d| d.is_dir())
        {
            dialog = dialog.set_directory(dir);
        }
        let path = match target {
            PickTarget::DatasetSource
            | PickTarget::TrainData
            | PickTarget::TrainOut
            | PickTarget::ModelsDir => dialog.pick_folder(),
            PickTarget::SaveSession | PickTarget::ExportPng | PickTarget::DatasetOut => {
                dialog.save_file()
            }
            _ => dialog.pick_file(),
        };
        events.send(AppMessage::FilePicked { target, path }.into_event());
    });
}
