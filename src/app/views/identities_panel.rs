//! The Identities panel: random identities, a context file, an interpolation, a face from
//! a photo or new ProcFace identities; the list.

use super::widgets::{caption, path_field};
use super::ViewCtx;
use crate::app::forms::IdentitySourceKind;
use crate::app::messages::PickTarget;
use crate::app::state::AppState;
use crate::app::style;
use egui::{RichText, Ui};
use std::path::PathBuf;

/// Draws the Identities panel.
pub fn show(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let f = &mut state.identity_form;
    ui.horizontal(|ui| {
        ui.selectable_value(&mut f.kind, IdentitySourceKind::Random, "Random");
        ui.selectable_value(&mut f.kind, IdentitySourceKind::File, "File");
        ui.selectable_value(&mut f.kind, IdentitySourceKind::Interpolate, "Interpolate");
    });
    ui.horizontal(|ui| {
        ui.selectable_value(&mut f.kind, IdentitySourceKind::Photo, "From a face photo");
        ui.selectable_value(&mut f.kind, IdentitySourceKind::Procface, "ProcFace")
            .on_hover_text("New procedural identities, for the built-in model");
    });
    ui.add_space(2.0);
    match f.kind {
        IdentitySourceKind::Random => {
            egui::Grid::new("random_ids")
                .num_columns(2)
                .spacing([8.0, 4.0])
                .show(ui, |ui| {
                    count_row(ui, &mut f.count);
                    let label = ui.label("Seed");
                    ui.horizontal(|ui| {
                        ui.add(egui::DragValue::new(&mut f.seed).speed(1.0))
                            .labelled_by(label.id);
                        if ui
                            .small_button("new")
                            .on_hover_text("Draw a new identity seed")
                            .clicked()
                        {
                            f.seed = u64::from(rand::random::<u32>());
                        }
                    });
                    ui.end_row();
                    first_index_row(ui, &mut f.first);
                });
            caption(ui, "uniform on the unit sphere, reproducible per index");
        }
        IdentitySourceKind::Procface => {
            egui::Grid::new("procface_ids")
                .num_columns(2)
                .spacing([8.0, 4.0])
                .show(ui, |ui| {
                    count_row(ui, &mut f.count);
                    first_index_row(ui, &mut f.first);
                });
            caption(
                ui,
                "new ProcFace faces (seed 2,000,000 + index), embedded by the built-in FR model",
            );
        }
        IdentitySourceKind::File => {
            if let Some(t) = path_field(
                ui,
                "Context file (.npy, torch pickle, safetensors)",
                &mut f.file,
                "contexts.npy",
                PickTarget::Contexts,
                cx.dialogs_ok,
            ) {
                let start = (!f.file.is_empty()).then(|| f.file.clone().into());
                cx.pick(t, start);
            }
        }
        IdentitySourceKind::Interpolate => {
            let n = state.identities.len().saturating_sub(1);
            egui::Grid::new("interp")
                .num_columns(2)
                .spacing([8.0, 4.0])
                .show(ui, |ui| {
                    let label = ui.label("From row");
                    ui.add(egui::DragValue::new(&mut f.from).range(0..=n))
                        .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("To row");
                    ui.add(egui::DragValue::new(&mut f.to).range(0..=n))
                        .labelled_by(label.id);
                    ui.end_row();
                    let label = ui.label("Steps");
                    ui.add(egui::DragValue::new(&mut f.steps).range(2..=64))
                        .labelled_by(label.id);
                    ui.end_row();
                });
            ui.checkbox(&mut f.shared_noise, "Same noise along the path");
            caption(ui, "slerp between two rows of the current list");
        }
        IdentitySourceKind::Photo => {
            photo_source(ui, state, cx);
            list(ui, state);
            return;
        }
    }
    ui.add_space(2.0);
    ui.horizontal(|ui| {
        let busy = state.contexts_loading;
        if ui.add_enabled(!busy, egui::Button::new("Apply")).clicked() {
            state.apply_identity_form(cx.worker);
        }
        if busy {
            ui.spinner();
        }
        ui.label(
            RichText::new(format!("{} identities", state.identities.len())).color(style::MUTED),
        );
    });
    list(ui, state);
}

/// Thumbnail textures of one detection, uploaded once and kept in egui's memory.
#[derive(Clone)]
struct FaceTextures {
    detection: u64,
    textures: Vec<egui::TextureHandle>,
}

/// The "From a face photo" source: photo and models folder, Detect faces, the face picker.
fn photo_source(ui: &mut Ui, state: &mut AppState, cx: &mut ViewCtx) {
    let f = &mut state.identity_form;
    if let Some(t) = path_field(
        ui,
        "Photo (JPEG, PNG)",
        &mut f.photo,
        "portrait.jpg",
        PickTarget::Photo,
        cx.dialogs_ok,
    ) {
        let start = (!f.photo.is_empty()).then(|| f.photo.clone().into());
        cx.pick(t, start);
    }
    if let Some(t) = path_field(
        ui,
        "Models folder (fr_detect, fr_landmark, fr_feature .onnx)",
        &mut f.models_dir,
        "~/.cache/idiff-studio/models",
        PickTarget::ModelsDir,
        cx.dialogs_ok,
    ) {
        let start = (!f.models_dir.is_empty()).then(|| PathBuf::from(&f.models_dir).join("x"));
        cx.pick(t, start);
    }
    ui.checkbox(&mut f.photo_replace, "Replace the list");
    ui.horizontal(|ui| {
        let busy = state.photo_faces.running.is_some();
        if ui
            .add_enabled(!busy, egui::Button::new("Detect faces"))
            .clicked()
        {
            state.detect_faces(cx.worker);
        }
        if busy {
            ui.spinner();
        }
        ui.label(
            RichText::new(format!("{} identities", state.identities.len())).color(style::MUTED),
        );
    });
    if let Some(e) = &state.photo_faces.error {
        ui.label(RichText::new(e).color(style::DANGER));
    }
    let Some((detection, photo)) = &state.photo_faces.result else {
        caption(ui, "detect the faces of a photo, then pick one");
        return;
    };
    let id = egui::Id::unique("photo_face_textures");
    let cached = ui
        .ctx()
        .data(|d| d.get_temp::<FaceTextures>(id))
        .filter(|t| t.detection == *detection);
    let textures = cached.unwrap_or_else(|| {
        let textures = photo
            .faces
            .iter()
            .enumerate()
            .map(|(k, face)| {
                let (w, h) = face.crop.dimensions();
                let image =
                    egui::ColorImage::from_rgb([w as usize, h as usize], face.crop.as_raw());
                ui.ctx().load_texture(
                    format!("photo-face-{detection}-{k}"),
                    image,
                    egui::TextureOptions::LINEAR,
                )
            })
            .collect();
        let t = FaceTextures {
            detection: *detection,
            textures,
        };
        ui.ctx().data_mut(|d| d.insert_temp(id, t.clone()));
        t
    });
    caption(
        ui,
        &format!(
            "{} face(s) in {}; click one to use it",
            photo.faces.len(),
            photo.path.file_name().map_or_else(
                || photo.path.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            )
        ),
    );
    let mut chosen = None;
    ui.horizontal_wrapped(|ui| {
        for (k, (face, tex)) in photo.faces.iter().zip(&textures.textures).enumerate() {
            ui.vertical(|ui| {
                let image = egui::Image::new(egui::load::SizedTexture::new(
                    tex.id(),
                    egui::vec2(64.0, 64.0),
                ))
                .corner_radius(3)
                .sense(egui::Sense::click());
                let resp = ui.add(image).on_hover_text(format!(
                    "face {k}: score {:.2}, alignment residual {:.1} px",
                    face.score, face.residual
                ));
                if resp.clicked() {
                    chosen = Some(k);
                }
                if ui.small_button(format!("Use face {k}")).clicked() {
                    chosen = Some(k);
                }
                ui.label(
                    RichText::new(format!("score {:.2}", face.score))
                        .small()
                        .color(style::MUTED),
                );
            });
        }
    });
    if let Some(k) = chosen {
        state.use_photo_face(k);
    }
}

fn list(ui: &mut Ui, state: &AppState) {
    let row_h = ui.text_style_height(&egui::TextStyle::Body);
    egui::Frame::group(ui.style())
        .inner_margin(4.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt("identity_list")
                .max_height(130.0)
                .auto_shrink([false, true])
                .show_rows(ui, row_h, state.identities.len(), |ui, range| {
                    for i in range {
                        let id = &state.identities[i];
                        ui.horizontal(|ui| {
                            ui.label(
                                RichText::new(format!("{i:>3}"))
                                    .monospace()
                                    .color(style::MUTED),
                            );
                            ui.label(&id.name);
                            ui.label(RichText::new(&id.origin).small().color(style::MUTED));
                        });
                    }
                });
        });
}

/// A "Count" row of a source's grid.
fn count_row(ui: &mut Ui, count: &mut usize) {
    let label = ui.label("Count");
    ui.add(egui::DragValue::new(count).range(1..=10_000).speed(1.0))
        .labelled_by(label.id);
    ui.end_row();
}

/// A "First index" row of a source's grid.
fn first_index_row(ui: &mut Ui, first: &mut usize) {
    let label = ui.label("First index");
    ui.add(egui::DragValue::new(first).range(0..=10_000_000).speed(1.0))
        .labelled_by(label.id);
    ui.end_row();
}
