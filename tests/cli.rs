//! End-to-end tests of the `idiff-studio` binary: tensor-level parity through the CLI,
//! `generate` (layout, determinism across batch sizes, resume, shards) and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> Option<PathBuf> {
    idiff_studio::testutil::fixture(name)
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_idiff-studio"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a failed run with exactly one line on stderr containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "stderr not one line: {err}"
    );
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

fn max_abs(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn forward_unet_cli_matches_reference() {
    let (Some(w), Some(cfg), Some(io)) = (
        fixture("unet_tiny_ema_averaged_model.ckpt"),
        fixture("unet_tiny_config.json"),
        fixture("unet_tiny_io.safetensors"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eps.safetensors");
    let o = run(&[
        "forward",
        "unet",
        "--weights",
        s(&w),
        "--config",
        s(&cfg),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dev = candle_core::Device::Cpu;
    let got = candle_core::safetensors::load(&out, &dev).unwrap();
    let want = candle_core::safetensors::load(&io, &dev).unwrap();
    assert!(max_abs(&got["eps"], &want["eps"]) <= 1e-4);

    // Without `context` the empty context is used.
    let only_xt = dir.path().join("xt.safetensors");
    let sub: std::collections::HashMap<String, candle_core::Tensor> = ["x", "t"]
        .iter()
        .map(|k| (k.to_string(), want[*k].clone()))
        .collect();
    candle_core::safetensors::save(&sub, &only_xt).unwrap();
    let o = run(&[
        "forward",
        "unet",
        "--weights",
        s(&w),
        "--config",
        s(&cfg),
        "--inputs",
        s(&only_xt),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &dev).unwrap();
    assert!(max_abs(&got["eps"], &want["eps_empty_context"]) <= 1e-4);
}

#[test]
fn forward_ddpm_steps_cli_matches_reference_chain() {
    let (Some(w), Some(cfg), Some(io)) = (
        fixture("unet_tiny_eps_model_only.ckpt"),
        fixture("unet_tiny_config.json"),
        fixture("unet_tiny_io.safetensors"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let o = run(&[
        "forward",
        "ddpm-steps",
        "--weights",
        s(&w),
        "--config",
        s(&cfg),
        "--inputs",
        s(&io),
        "--steps",
        "999,998,997,996",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dev = candle_core::Device::Cpu;
    let got = candle_core::safetensors::load(&out, &dev).unwrap();
    let want = candle_core::safetensors::load(&io, &dev).unwrap();
    assert!(max_abs(&got["x"], &want["ddpm_x_after_steps_999_to_996"]) <= 1e-3);
}

#[test]
fn forward_vq_cli_matches_reference() {
    let (Some(enc), Some(dec), Some(cfg), Some(io)) = (
        fixture("vq_tiny_first_stage_encoder_state_dict.pt"),
        fixture("vq_tiny_first_stage_decoder_state_dict.pt"),
        fixture("vq_tiny_config.json"),
        fixture("vq_tiny_io.safetensors"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dev = candle_core::Device::Cpu;
    let want = candle_core::safetensors::load(&io, &dev).unwrap();
    let out = dir.path().join("enc.safetensors");
    let o = run(&[
        "forward",
        "vq-encode",
        "--encoder",
        s(&enc),
        "--config",
        s(&cfg),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &dev).unwrap();
    assert!(max_abs(&got["latent"], &want["latent"]) <= 1e-4);
    let gi: Vec<i64> = got["code_indices"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let wi: Vec<i64> = want["code_indices"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(gi, wi);

    let out = dir.path().join("dec.safetensors");
    let o = run(&[
        "forward",
        "vq-decode",
        "--decoder",
        s(&dec),
        "--config",
        s(&cfg),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = candle_core::safetensors::load(&out, &dev).unwrap();
    for k in [
        "decoded_quantized",
        "decoded_not_quantized",
        "decoded_quantized_01",
    ] {
        assert!(max_abs(&got[k], &want[k]) <= 1e-4, "{k}");
    }
}

#[test]
fn forward_iresnet_cli_matches_reference() {
    let (Some(w), Some(cfg), Some(io)) = (
        fixture("iresnet_tiny_backbone.pth"),
        fixture("iresnet_tiny_config.json"),
        fixture("iresnet_tiny_io.safetensors"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("emb.safetensors");
    let o = run(&[
        "forward",
        "iresnet",
        "--weights",
        s(&w),
        "--config",
        s(&cfg),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dev = candle_core::Device::Cpu;
    let got = candle_core::safetensors::load(&out, &dev).unwrap();
    let want = candle_core::safetensors::load(&io, &dev).unwrap();
    assert!(max_abs(&got["embedding"], &want["embedding"]) <= 1e-4);
}

struct GenFixtures {
    unet: PathBuf,
    unet_cfg: PathBuf,
    decoder: PathBuf,
    decoder_cfg: PathBuf,
}

fn gen_fixtures() -> Option<GenFixtures> {
    Some(GenFixtures {
        unet: fixture("unet_tiny_ema_averaged_model.ckpt")?,
        unet_cfg: fixture("unet_tiny_config.json")?,
        decoder: fixture("vq_tiny_first_stage_decoder_state_dict.pt")?,
        decoder_cfg: fixture("vq_tiny_config.json")?,
    })
}

fn generate(f: &GenFixtures, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--unet",
        s(&f.unet),
        "--config",
        s(&f.unet_cfg),
        "--decoder",
        s(&f.decoder),
        "--decoder-config",
        s(&f.decoder_cfg),
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--eta",
        "1",
        "--guidance",
        "1.5",
        "--context-dropout",
        "0.2",
        "--seed",
        "7",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn tree_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn generate_writes_folders_grid_manifest_and_is_batch_invariant() {
    let Some(f) = gen_fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let common = ["--random-identities", "3", "--per-identity", "2"];
    let o = generate(&f, &a, &[&common[..], &["--batch-size", "4"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = generate(&f, &b, &[&common[..], &["--batch-size", "1"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for id in 0..3 {
        for s in 0..2 {
            let p = a.join(format!("{id:06}")).join(format!("{s:04}.png"));
            let img = image::open(&p).unwrap();
            assert_eq!((img.width(), img.height()), (128, 128));
        }
    }
    assert!(a.join("grid.png").is_file());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["status"], "complete");
    assert_eq!(manifest["seed_contract"], 1);
    assert_eq!(manifest["completed"], serde_json::json!([0, 1, 2]));
    assert_eq!(
        manifest["generation"]["unet"]["sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    // Same images whatever the batch size: the whole output is byte-identical.
    assert_eq!(tree_bytes(&a), tree_bytes(&b));
    // Different samples of one identity differ.
    assert_ne!(
        std::fs::read(a.join("000000/0000.png")).unwrap(),
        std::fs::read(a.join("000000/0001.png")).unwrap()
    );
}

#[test]
fn generate_resumes_to_identical_bytes_and_shards_cover_the_set() {
    let Some(f) = gen_fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let common = [
        "--random-identities",
        "3",
        "--per-identity",
        "2",
        "--batch-size",
        "2",
    ];
    assert!(generate(&f, &full, &common).status.success());

    // Simulate a run killed after identity 0: drop later identities and mark it partial.
    let resumed = dir.path().join("resumed");
    assert!(generate(&f, &resumed, &common).status.success());
    std::fs::remove_dir_all(resumed.join("000001")).unwrap();
    std::fs::remove_dir_all(resumed.join("000002")).unwrap();
    std::fs::remove_file(resumed.join("grid.png")).unwrap();
    std::fs::create_dir_all(resumed.join(".partial-000001")).unwrap();
    let o = generate(&f, &resumed, &common);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tree_bytes(&full), tree_bytes(&resumed));

    // Shards hold disjoint identities whose images equal the single run's.
    for i in 0..2 {
        let shard = dir.path().join(format!("shard{i}"));
        let spec = format!("{i}/2");
        assert!(
            generate(&f, &shard, &[&common[..], &["--shard", &spec]].concat())
                .status
                .success()
        );
        for id in 0..3 {
            let name = format!("{id:06}/0001.png");
            let in_shard = shard.join(&name);
            assert_eq!(in_shard.exists(), id % 2 == i, "{name} in shard {i}");
            if in_shard.exists() {
                assert_eq!(
                    std::fs::read(&in_shard).unwrap(),
                    std::fs::read(full.join(&name)).unwrap()
                );
            }
        }
    }

    // Other settings into the same folder are refused.
    let o = generate(
        &f,
        &full,
        &["--random-identities", "3", "--per-identity", "3"],
    );
    assert_one_line_error(&o, "different generation");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let Some(f) = gen_fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let io = fixture("unet_tiny_io.safetensors").unwrap();
    let out = dir.path().join("o.safetensors");

    // Missing file.
    let o = run(&[
        "forward",
        "unet",
        "--weights",
        "/nonexistent/w.ckpt",
        "--config",
        s(&f.unet_cfg),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert_one_line_error(&o, "/nonexistent/w.ckpt");

    // Truncated checkpoint.
    let bytes = std::fs::read(&f.unet).unwrap();
    let cut = dir.path().join("cut.ckpt");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let o = run(&[
        "forward",
        "unet",
        "--weights",
        s(&cut),
        "--config",
        s(&f.unet_cfg),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert_one_line_error(&o, "cut.ckpt");

    // A PNG given as a checkpoint.
    let png = dir.path().join("face.png");
    image::RgbImage::new(8, 8).save(&png).unwrap();
    let o = run(&[
        "forward",
        "unet",
        "--weights",
        s(&png),
        "--config",
        s(&f.unet_cfg),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert_one_line_error(&o, "PNG");

    // Weights that do not match the config.
    let o = run(&[
        "forward",
        "unet",
        "--weights",
        s(&f.unet),
        "--inputs",
        s(&io),
        "--out",
        s(&out),
    ]);
    assert_one_line_error(
        &o,
        "`context_emb.weight` checkpoint [64, 512] vs config [256, 512]",
    );

    // Context files with NaN or the wrong width.
    let nan = dir.path().join("nan.safetensors");
    let mut rows = vec![0.1f32; 2 * 512];
    rows[600] = f32::NAN;
    let t = candle_core::Tensor::from_vec(rows, (2, 512), &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("contexts".to_string(), t)]),
        &nan,
    )
    .unwrap();
    let o = generate(
        &f,
        &dir.path().join("g1"),
        &["--contexts", s(&nan), "--per-identity", "1"],
    );
    assert_one_line_error(&o, "nan.safetensors");

    let narrow = dir.path().join("narrow.safetensors");
    let t =
        candle_core::Tensor::zeros((2, 128), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("contexts".to_string(), t)]),
        &narrow,
    )
    .unwrap();
    let o = generate(
        &f,
        &dir.path().join("g2"),
        &["--contexts", s(&narrow), "--per-identity", "1"],
    );
    assert_one_line_error(&o, "128");
}

#[test]
fn generate_from_reference_context_file() {
    let (Some(f), Some(ctx)) = (gen_fixtures(), fixture("uniform8_contexts.npy")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ctx");
    let o = generate(
        &f,
        &out,
        &[
            "--contexts",
            s(&ctx),
            "--per-identity",
            "1",
            "--batch-size",
            "8",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for id in 0..8 {
        assert!(out.join(format!("{id:06}/0000.png")).is_file());
    }
}
