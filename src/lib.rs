//! IDiff Studio: a Rust re-implementation of IDiff-Face sampling, analysis, curation and
//! FR training, with a desktop studio on top.
//!
//! Data flows one way: settings → command → worker → events → state → view.

pub use idiff_core::{checkpoint, diffusion, errors, files, kernels, models, nn, testutil};

pub mod analysis;
pub mod app;
pub mod bench;
pub mod cli;
pub mod dataset;
pub mod default_model;
pub mod forward;
pub mod generate;
pub mod identity;
pub mod imageops;
pub mod onnx;
pub mod parity;
pub mod pipeline;
pub mod procface;
pub mod train;
pub mod worker;

#[cfg(test)]
mod layering {
    //! The one-way arrows between modules: a lower module never names a higher one.

    use std::path::Path;

    /// Every `crate::<module>` / `idiff_studio::<module>` path in the production code of the
    /// Rust files under `dir`, as (file, module).
    fn crate_paths(dir: &Path) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(crate_paths(&path));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Production code only: a file's tests follow its first `#[cfg(test)]`.
            let production = text.split("#[cfg(test)]").next().unwrap_or_default();
            for line in production
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
            {
                for prefix in ["crate::", "idiff_studio::"] {
                    for (i, _) in line.match_indices(prefix) {
                        let rest = &line[i + prefix.len()..];
                        let module: String = rest
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push((path.display().to_string(), module));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn lower_modules_never_name_higher_ones() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let core = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/idiff-core/src");
        // Inside the core crate (which cannot name the modules above it at all).
        let core_rules: [(&str, &[&str]); 3] = [
            ("kernels", &["nn", "models", "diffusion", "checkpoint"]),
            ("nn", &["models", "diffusion", "checkpoint"]),
            ("models", &["diffusion"]),
        ];
        let mut broken = Vec::new();
        for (dir, forbidden) in core_rules {
            for (file, module) in crate_paths(&core.join(dir)) {
                if forbidden.contains(&module.as_str()) {
                    broken.push(format!("{file} names crate::{module}"));
                }
            }
        }
        let rules: [(&str, &[&str]); 4] = [
            ("onnx", &["analysis", "dataset", "app", "worker", "cli"]),
            ("analysis", &["dataset", "app", "worker", "cli"]),
            (
                "imageops",
                &[
                    "dataset", "analysis", "onnx", "models", "app", "worker", "cli",
                ],
            ),
            ("worker", &["app", "cli"]),
        ];
        for (dir, forbidden) in rules {
            for (file, module) in crate_paths(&src.join(dir)) {
                if forbidden.contains(&module.as_str()) {
                    broken.push(format!("{file} names crate::{module}"));
                }
            }
        }
        assert!(broken.is_empty(), "{broken:#?}");
    }

    /// Packages that belong to front ends (windows, dialogs, argument parsing, progress bars)
    /// or to other layers' heavy machinery, and that a library crate must not reach.
    const FRONT_END_PACKAGES: [&str; 9] = [
        "eframe",
        "egui",
        "egui_plot",
        "egui_kittest",
        "rfd",
        "clap",
        "indicatif",
        "ctrlc",
        "wgpu",
    ];

    /// Every package reachable from `root` in the resolved graph of `cargo metadata`,
    /// through normal, build and development dependencies.
    fn reachable(metadata: &serde_json::Value, root: &str) -> std::collections::BTreeSet<String> {
        let nodes = metadata["resolve"]["nodes"].as_array().unwrap();
        let name_of = |id: &str| {
            metadata["packages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["id"] == id)
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .unwrap()
        };
        let deps_of = |id: &str| -> Vec<String> {
            nodes
                .iter()
                .find(|n| n["id"] == id)
                .map(|n| {
                    n["deps"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|d| d["pkg"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let start = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == root)
            .map(|p| p["id"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no package {root} in the workspace"));
        let mut seen = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        let mut todo = vec![start];
        while let Some(id) = todo.pop() {
            if seen.insert(id.clone()) {
                names.insert(name_of(&id));
                todo.extend(deps_of(&id));
            }
        }
        names
    }

    #[test]
    fn library_crates_reach_no_front_end_package() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--format-version",
                "1",
                "--offline",
                "--filter-platform",
                env!("IDIFF_BUILD_TARGET"),
                "--manifest-path",
            ])
            .arg(root.join("Cargo.toml"))
            .output()
            .expect("cargo metadata runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let libraries: Vec<String> = metadata["workspace_members"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|id| {
                let p = metadata["packages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| &p["id"] == id)?;
                let name = p["name"].as_str()?.to_owned();
                (name != "idiff-studio").then_some(name)
            })
            .collect();
        assert!(
            libraries.contains(&"idiff-core".to_owned()),
            "{libraries:?}"
        );
        for library in &libraries {
            let reached = reachable(&metadata, library);
            let mut banned: Vec<&str> = FRONT_END_PACKAGES
                .iter()
                .copied()
                .filter(|p| reached.contains(*p))
                .collect();
            if library == "idiff-core" {
                banned.extend(["tract-onnx"].iter().filter(|p| reached.contains(**p)));
            }
            assert!(banned.is_empty(), "{library} depends on {banned:?}");
        }
    }
}
