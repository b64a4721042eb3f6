//! IDiff Studio: a Rust re-implementation of IDiff-Face sampling, analysis, curation and
//! FR training, with a desktop studio on top.
//!
//! Data flows one way: settings → command → worker → events → state → view.

pub mod analysis;
pub mod app;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod dataset;
pub mod default_model;
pub mod diffusion;
pub mod files;
pub mod forward;
pub mod generate;
pub mod identity;
pub mod imageops;
pub mod kernels;
pub mod models;
pub mod nn;
pub mod onnx;
pub mod parity;
pub mod pipeline;
pub mod procface;
pub mod testutil;
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
        let rules: [(&str, &[&str]); 7] = [
            (
                "kernels",
                &[
                    "nn",
                    "models",
                    "diffusion",
                    "default_model",
                    "train",
                    "app",
                    "worker",
                    "cli",
                ],
            ),
            (
                "nn",
                &[
                    "models",
                    "diffusion",
                    "default_model",
                    "train",
                    "app",
                    "worker",
                    "cli",
                ],
            ),
            (
                "models",
                &[
                    "diffusion",
                    "default_model",
                    "train",
                    "app",
                    "worker",
                    "cli",
                    "generate",
                ],
            ),
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
        let mut broken = Vec::new();
        for (dir, forbidden) in rules {
            for (file, module) in crate_paths(&src.join(dir)) {
                if forbidden.contains(&module.as_str()) {
                    broken.push(format!("{file} names crate::{module}"));
                }
            }
        }
        assert!(broken.is_empty(), "{broken:#?}");
    }
}
