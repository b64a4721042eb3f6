//! Embeds the shipped default model when `assets/default/` holds all of its files: sets the
//! `idiff_default_model` cfg, under which `src/default_model/assets.rs` uses `include_bytes!`.
//! Without the files the crate still builds and the default model reports that it is absent.

use std::path::Path;

const FILES: [&str; 6] = [
    "fr.safetensors",
    "fr.json",
    "vq.safetensors",
    "vq.json",
    "unet.safetensors",
    "unet.json",
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(idiff_default_model)");
    // The target triple, for the layering test's `cargo metadata --filter-platform`.
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo::rustc-env=IDIFF_BUILD_TARGET={target}");
    println!("cargo::rerun-if-changed=assets/default");
    let dir = Path::new("assets/default");
    for f in FILES {
        println!("cargo::rerun-if-changed=assets/default/{f}");
    }
    if FILES.iter().all(|f| dir.join(f).is_file()) {
        println!("cargo::rustc-cfg=idiff_default_model");
    }
}
