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

/// Every parity check passes on each SIMD path of the CPU kernels this machine has (AVX-512
/// where present, and AVX2 forced), each in its own process.
#[test]
fn parity_holds_on_every_simd_path() {
    let Some(dir) =
        fixture("unet_tiny_config.json").and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return;
    };
    let paths = [
        ("avx512", idiff_studio::kernels::gemm::Simd::Avx512),
        ("avx2", idiff_studio::kernels::gemm::Simd::Avx2),
    ];
    let mut ran = 0;
    for (name, simd) in paths {
        if !simd.supported() {
            eprintln!("skipping the {name} path: this CPU lacks it");
            continue;
        }
        let tmp = tempfile::tempdir().unwrap();
        let json = tmp.path().join("parity.json");
        let out = run(&[
            "parity",
            "--fixtures",
            s(&dir),
            "--simd",
            name,
            "--json",
            s(&json),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("CPU kernels: {simd:?}")),
            "{stdout}"
        );
        let checks: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(checks.len() >= 5, "{name}: only {} checks", checks.len());
        for c in &checks {
            assert_eq!(c["pass"], true, "{name}: {c}");
        }
        ran += 1;
    }
    assert!(ran > 0, "no SIMD path could be tested");
    let out = run(&["parity", "--fixtures", s(&dir), "--simd", "avx3"]);
    assert_one_line_error(&out, "--simd");
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

/// `generate --procface-identities` on the built-in model: ProcFace folders and a manifest
/// that names the source, and a grid whose rows start with each identity's reference render.
#[test]
fn generate_procface_identities_with_reference_column() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pf");
    let o = run(&[
        "generate",
        "--procface-identities",
        "2",
        "--first-identity",
        "3",
        "--per-identity",
        "2",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["generation"]["identities"]["source"], "procface");
    assert_eq!(manifest["completed"], serde_json::json!([3, 4]));
    let sample = image::open(out.join("000004/0001.png")).unwrap().to_rgb8();
    let side = sample.width();
    let grid = image::open(out.join("grid.png")).unwrap().to_rgb8();
    // Reference + 2 samples per row, 2 rows, 2-pixel gaps.
    assert_eq!(grid.dimensions(), (3 * (side + 2) + 2, 2 * (side + 2) + 2));
    let tile = |col: u32, row: u32| {
        image::imageops::crop_imm(
            &grid,
            2 + col * (side + 2),
            2 + row * (side + 2),
            side,
            side,
        )
        .to_image()
    };
    let reference = image::imageops::resize(
        &idiff_studio::default_model::eval::procface_reference(4),
        side,
        side,
        image::imageops::FilterType::Triangle,
    );
    assert_eq!(tile(0, 1), reference);
    assert_eq!(tile(2, 1), sample);

    // Analysing a generate output scores its images against the contexts in its manifest.
    let rep = dir.path().join("rep");
    let o = run(&["analyze", "--images", s(&out), "--out", s(&rep)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("context cosine"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rep.join("metrics.json")).unwrap()).unwrap();
    let per: Vec<f64> = report["per_identity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r["context_mean"]
                .as_f64()
                .expect("per-identity context cosine")
        })
        .collect();
    let overall = report["context_cosine"].as_f64().unwrap();
    assert_eq!(per.len(), 2);
    assert!(
        (overall - (per[0] + per[1]) / 2.0).abs() < 1e-9,
        "{per:?} {overall}"
    );
    let csv = std::fs::read_to_string(rep.join("per_identity.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",context_mean"));
    assert!(csv
        .lines()
        .nth(1)
        .unwrap()
        .rsplit(',')
        .next()
        .unwrap()
        .parse::<f64>()
        .is_ok());
}

// ---- analysis: `metrics`, `analyze` ----

/// Compares a `metrics --json` output with pyeer's expected values (1 ulp).
fn assert_metrics_json(stdout: &[u8], want: &serde_json::Value, case: &str) {
    let got: serde_json::Value = serde_json::from_slice(stdout).expect("metrics prints JSON");
    let want = want.as_object().unwrap();
    assert_eq!(got.as_object().unwrap().len(), want.len(), "{case}: keys");
    for (key, w) in want {
        let (g, w) = (got[key].as_f64().unwrap(), w.as_f64().unwrap());
        let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
        assert!(ulps <= 1, "{case}.{key}: got {g}, want {w}");
    }
}

#[test]
fn metrics_cli_matches_pyeer_fixture() {
    let (Some(scores), Some(expected)) = (
        fixture("eer_dev_scores.safetensors"),
        fixture("eer_dev_expected.json"),
    ) else {
        return;
    };
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(expected).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (case, want) in json["cases"].as_object().unwrap() {
        let o = run(&[
            "metrics",
            "--scores",
            s(&scores),
            "--prefix",
            case,
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_metrics_json(&o.stdout, want, case);
        // The same scores through pyeer text files.
        let (g, i) =
            idiff_studio::analysis::commands::read_score_tensors(&scores, Some(case)).unwrap();
        let (gp, ip) = (dir.path().join("g.txt"), dir.path().join("i.txt"));
        idiff_studio::analysis::metrics::write_scores(&gp, &g).unwrap();
        idiff_studio::analysis::metrics::write_scores(&ip, &i).unwrap();
        let o = run(&[
            "metrics",
            "--genuine",
            s(&gp),
            "--impostor",
            s(&ip),
            "--json",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_metrics_json(&o.stdout, want, case);
        let o = run(&["metrics", "--genuine", s(&gp), "--impostor", s(&ip)]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains("EER threshold"),
            "{text}"
        );
    }
    let o = run(&["metrics", "--scores", s(&scores), "--json"]);
    assert_one_line_error(&o, "no tensor `genuine`");
    let missing = dir.path().join("nope.txt");
    let o = run(&[
        "metrics",
        "--genuine",
        s(&missing),
        "--impostor",
        s(&missing),
    ]);
    assert_one_line_error(&o, "nope.txt");
}

const REPORT_FILES: [&str; 8] = [
    "metrics.json",
    "genuine.txt",
    "impostor.txt",
    "per_identity.csv",
    "histogram.csv",
    "histogram.png",
    "roc.png",
    "det.png",
];

#[test]
fn analyze_images_writes_every_report_file_and_reuses_the_cache() {
    let (Some(w), Some(cfg)) = (
        fixture("iresnet_tiny_backbone.pth"),
        fixture("iresnet_tiny_config.json"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    // 128 x 128 images, resized to 112 for the FR model like generated ones.
    idiff_studio::procface::write_image_folder(&images, 0..6, 3, 128).unwrap();
    let cache = dir.path().join("cache");
    let analyze = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "analyze",
            "--images",
            s(&images),
            "--fr-model",
            s(&w),
            "--cache-dir",
            s(&cache),
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let out = dir.path().join("report");
    let o = analyze(&out, &["--fr-config", s(&cfg), "--flip"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("18 images of 6 identities"), "{stdout}");
    for f in REPORT_FILES.iter().chain(&["embeddings.safetensors"]) {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    for f in ["histogram.png", "roc.png", "det.png"] {
        assert!(image::open(out.join(f)).is_ok(), "{f}");
    }
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(
        (m["images"].as_u64(), m["dim"].as_u64()),
        (Some(18), Some(64))
    );
    assert_eq!(m["genuine_pairs"], 18);
    assert_eq!(m["histogram_device"], "cpu");
    assert!(m["metrics"]["eer"].is_number());
    let csv = std::fs::read_to_string(out.join("per_identity.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    assert!(csv.lines().nth(1).unwrap().starts_with("0,000000,3,"));
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    // Second run: the architecture is read off the weights and every row is cached.
    let again = dir.path().join("again");
    let o = analyze(&again, &["--flip"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["genuine.txt", "impostor.txt", "per_identity.csv"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }
    // Without the flip the cache holds other rows: different scores.
    let plain = dir.path().join("plain");
    assert!(analyze(&plain, &[]).status.success());
    assert_ne!(
        std::fs::read(out.join("genuine.txt")).unwrap(),
        std::fs::read(plain.join("genuine.txt")).unwrap()
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
}

#[test]
fn analyze_embeddings_with_sampling_and_leakage() {
    use idiff_studio::analysis::embed::Embeddings;
    let dir = tempfile::tempdir().unwrap();
    // 8 identities x 4 samples around orthogonal axes of R^8, plus a little noise.
    let mut data = Vec::new();
    let mut labels = Vec::new();
    for k in 0..8u32 {
        for j in 0..4 {
            let mut row = vec![0.05 * j as f32; 8];
            row[k as usize] = 1.0;
            data.extend(row);
            labels.push(k);
        }
    }
    idiff_studio::analysis::embed::normalise_rows(&mut data, 8);
    let emb = Embeddings {
        dim: 8,
        data,
        labels,
        identities: (0..8).map(|k| format!("id{k}")).collect(),
        files: (0..32).map(|i| format!("f{i}.png")).collect(),
    };
    let path = dir.path().join("emb.safetensors");
    emb.save(&path).unwrap();
    // Reference: identity 2's axis exactly (leaks), in .npy form.
    let mut r = vec![0.0f32; 8];
    r[2] = 1.0;
    let reference = dir.path().join("ref.npy");
    idiff_studio::identity::Contexts::from_rows(&[r])
        .unwrap()
        .save_npy(&reference)
        .unwrap();
    let out = dir.path().join("report");
    let o = run(&[
        "analyze",
        "--embeddings",
        s(&path),
        "--impostor-samples",
        "100",
        "--reference-embeddings",
        s(&reference),
        "--leak-threshold",
        "0.99",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("leakage: 1 of 8 identities"), "{stdout}");
    for f in REPORT_FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!out.join("embeddings.safetensors").exists());
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["impostor_sampled"], true);
    assert_eq!(m["impostor_scored"], 100);
    assert_eq!(m["impostor_pairs"], 32 * 31 / 2 - 8 * 6);
    assert_eq!(m["per_identity"][2]["leaked"], true);
    assert_eq!(m["leakage"]["flagged"], 1);
    let imp = idiff_studio::analysis::metrics::read_scores(out.join("impostor.txt")).unwrap();
    assert_eq!(imp.len(), 100);
    // Bad inputs: one line naming the file.
    let o = run(&["analyze", "--embeddings", s(&reference), "--out", s(&out)]);
    assert_one_line_error(&o, "ref.npy");
    // A folder without identity sub-folders of images (the built-in FR model embeds).
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = run(&["analyze", "--images", s(&empty), "--out", s(&out)]);
    assert_one_line_error(&o, "empty");
}

// ---- Datasets: export, convert, merge, resume after a kill ----

/// `generate` arguments of the fixture run with `steps` DDIM steps.
fn ds_generate_args(f: &GenFixtures, out: &Path, steps: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
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
        steps,
        "--eta",
        "1",
        "--guidance",
        "1.5",
        "--seed",
        "11",
        "--out",
        s(out),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn ds_ok(o: &Output) {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs the fixture `generate` into `out` and checks that it succeeded.
fn ds_generate(f: &GenFixtures, out: &Path, steps: &str, extra: &[&str]) {
    ds_ok(
        &bin()
            .args(ds_generate_args(f, out, steps, extra))
            .output()
            .unwrap(),
    );
}

fn ds_decode(path: &Path) -> image::RgbImage {
    idiff_studio::imageops::decode_rgb(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn dataset_export_recordio_reads_back_curated_images_and_labels() {
    use idiff_studio::dataset::embeddings::Embeddings;
    use idiff_studio::dataset::export::{read_export_manifest, resize_112};
    use idiff_studio::dataset::recordio::RecordReader;
    let Some(f) = gen_fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("gen");
    ds_generate(
        &f,
        &gen,
        "2",
        &["--random-identities", "3", "--per-identity", "3"],
    );

    // Identity 1's images (1,0), (0,1), (-1,0) have mean genuine similarity -1/3 < tau_gen;
    // image (2, 1) is rejected by hand. Kept: identity 0 (3 images) -> label 0, identity 2
    // samples 0 and 2 -> label 1.
    let emb = dir.path().join("emb.npy");
    let rows = [
        1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0,
        1.0f32,
    ];
    std::fs::write(
        &emb,
        Embeddings::new(2, rows.to_vec())
            .unwrap()
            .to_npy_bytes()
            .unwrap(),
    )
    .unwrap();
    let rejects = dir.path().join("rejects.json");
    std::fs::write(&rejects, r#"{"images": [[2, 1]], "identities": []}"#).unwrap();
    let out = dir.path().join("rec");
    let curation = [
        "--tau-gen",
        "0.5",
        "--embeddings",
        s(&emb),
        "--rejects",
        s(&rejects),
    ];
    let mut export = vec![
        "dataset",
        "export",
        "--from",
        s(&gen),
        "--format",
        "recordio",
    ];
    export.extend_from_slice(&curation);

    // Dry run: counts only, nothing written.
    let o = run(&[&export[..], &["--dry-run"]].concat());
    ds_ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("kept:") && text.contains("5 images"),
        "{text}"
    );
    assert!(!out.exists());

    ds_ok(&run(&[&export[..], &["--out", s(&out)]].concat()));
    let reader = RecordReader::open_dir(&out).unwrap();
    assert_eq!(reader.labels().unwrap(), vec![0, 0, 0, 1, 1]);
    let want = [
        "000000/0000.png",
        "000000/0001.png",
        "000000/0002.png",
        "000002/0000.png",
        "000002/0002.png",
    ];
    for (k, name) in want.iter().enumerate() {
        let (img, _) = reader.get(k).unwrap();
        assert_eq!(img, resize_112(&ds_decode(&gen.join(name))), "{name}");
    }
    let m = read_export_manifest(&out).unwrap();
    assert_eq!(m.identity_map, vec![0, 2]);
    assert_eq!(m.curation.counts.tau_gen.identities, 1);
    assert_eq!(m.curation.counts.manual.images, 1);
    assert_eq!(m.curation.rules.tau_gen, Some(0.5));
    let source: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gen.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m.generation.as_ref(), Some(&source["generation"]));
    assert_eq!(m.seed_contract, Some(1));
    assert_eq!(
        Embeddings::load(out.join("embeddings.npy")).unwrap().len(),
        5
    );

    // ImageFolder with JPEG: renumbered identities, source sample numbers.
    let folder = dir.path().join("folder");
    let o = run(&[
        "dataset",
        "export",
        "--from",
        s(&gen),
        "--jpeg-quality",
        "80",
        "--rejects",
        s(&rejects),
        "--out",
        s(&folder),
    ]);
    ds_ok(&o);
    assert!(folder.join("000002/0000.jpg").is_file());
    assert!(!folder.join("000002/0001.jpg").exists());
    assert_eq!(
        ds_decode(&folder.join("000001/0001.jpg")).dimensions(),
        (128, 128)
    );

    // The same destination again is refused in one line.
    let o = run(&[&export[..], &["--out", s(&out)]].concat());
    assert_one_line_error(&o, "already exists");
    // A tau rule without embeddings is refused.
    let o = run(&[
        "dataset",
        "export",
        "--from",
        s(&gen),
        "--tau-img",
        "0.3",
        "--out",
        s(&dir.path().join("x")),
    ]);
    assert_one_line_error(&o, "--embeddings");
}

#[test]
fn dataset_export_to_unwritable_destination_fails_cleanly() {
    let Some(f) = gen_fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("gen");
    ds_generate(
        &f,
        &gen,
        "2",
        &["--random-identities", "2", "--per-identity", "1"],
    );
    let file = dir.path().join("file.txt");
    std::fs::write(&file, b"not a folder").unwrap();
    let before: Vec<_> = tree_bytes(dir.path());
    // Root ignores permission bits, so unwritable places are a path under a regular file,
    // a missing parent and /proc.
    let cases = [
        (file.join("out"), "is not a folder"),
        (dir.path().join("missing/out"), "does not exist"),
        (
            PathBuf::from("/proc/idiff-export-test"),
            "/proc/idiff-export-test",
        ),
    ];
    for format in ["imagefolder", "recordio"] {
        for (out, needle) in &cases {
            let o = run(&[
                "dataset",
                "export",
                "--from",
                s(&gen),
                "--format",
                format,
                "--out",
                s(out),
            ]);
            assert_one_line_error(&o, needle);
            assert!(!out.exists());
        }
        let o = run(&[
            "dataset",
            "convert",
            "--from",
            s(&gen),
            "--to",
            s(&cases[0].0),
        ]);
        assert_one_line_error(&o, "is not a folder");
    }
    assert!(!Path::new("/proc/idiff-export-test.partial").exists());
    // Nothing was added next to the source or the file.
    assert_eq!(tree_bytes(dir.path()), before);
}

#[test]
fn merged_shards_equal_a_single_run_byte_for_byte() {
    let Some(f) = gen_fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    let common = [
        "--random-identities",
        "4",
        "--per-identity",
        "2",
        "--first-identity",
        "5",
    ];
    let single = dir.path().join("single");
    ds_generate(&f, &single, "2", &common);
    let mut shards = Vec::new();
    for i in 0..3 {
        let out = dir.path().join(format!("shard{i}"));
        let spec = format!("{i}/3");
        ds_generate(&f, &out, "2", &[&common[..], &["--shard", &spec]].concat());
        shards.push(out);
    }
    let merged = dir.path().join("merged");
    // Order of --from does not matter.
    let o = run(&[
        "merge",
        "--from",
        s(&shards[2]),
        s(&shards[0]),
        s(&shards[1]),
        "--out",
        s(&merged),
    ]);
    ds_ok(&o);
    assert_eq!(tree_bytes(&merged), tree_bytes(&single));

    // A missing shard, a duplicated one, an incomplete one and a foreign one are refused.
    let o = run(&[
        "merge",
        "--from",
        s(&shards[0]),
        s(&shards[2]),
        "--out",
        s(&dir.path().join("m1")),
    ]);
    assert_one_line_error(&o, "missing shards: 1/3");
    let o = run(&[
        "merge",
        "--from",
        s(&shards[0]),
        s(&shards[0]),
        s(&shards[2]),
        "--out",
        s(&dir.path().join("m2")),
    ]);
    assert_one_line_error(&o, "given twice");
    let partial = dir.path().join("partial1");
    std::fs::create_dir(&partial).unwrap();
    let text = std::fs::read_to_string(shards[1].join("manifest.json")).unwrap();
    std::fs::write(
        partial.join("manifest.json"),
        text.replace("\"complete\"", "\"partial\""),
    )
    .unwrap();
    let o = run(&[
        "merge",
        "--from",
        s(&shards[0]),
        s(&partial),
        s(&shards[2]),
        "--out",
        s(&dir.path().join("m3")),
    ]);
    assert_one_line_error(&o, "incomplete");
    let foreign = dir.path().join("foreign");
    ds_generate(
        &f,
        &foreign,
        "3",
        &[&common[..], &["--shard", "1/3"]].concat(),
    );
    let o = run(&[
        "merge",
        "--from",
        s(&shards[0]),
        s(&foreign),
        s(&shards[2]),
        "--out",
        s(&dir.path().join("m4")),
    ]);
    assert_one_line_error(&o, "different generations");
    let o = run(&[
        "merge",
        "--from",
        s(&single),
        "--out",
        s(&dir.path().join("m5")),
    ]);
    assert_one_line_error(&o, "not a shard");
    for m in ["m1", "m2", "m3", "m4", "m5"] {
        assert!(!dir.path().join(m).exists() && !dir.path().join(format!("{m}.partial")).exists());
    }
}

#[test]
fn generate_killed_mid_run_resumes_to_identical_bytes() {
    let Some(f) = gen_fixtures() else { return };
    let dir = tempfile::tempdir().unwrap();
    // 8 DDIM steps per image keep the run busy for seconds after the first identity lands
    // (DDPM's 1000 steps take minutes per image on a 2-core CPU). Batches of one image
    // make the kill land while later identities are half done.
    let common = [
        "--random-identities",
        "3",
        "--per-identity",
        "2",
        "--batch-size",
        "1",
    ];
    let killed = dir.path().join("killed");
    let args = ds_generate_args(&f, &killed, "8", &common);
    let mut child = bin()
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !killed.join("000000").is_dir() {
        assert!(
            start.elapsed().as_secs() < 600,
            "no identity folder after 10 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "generate exited early");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let manifest = std::fs::read_to_string(killed.join("manifest.json")).unwrap();
    assert!(
        manifest.contains("\"partial\""),
        "the run finished before it was killed; the test needs a slower run"
    );

    ds_ok(&bin().args(&args).output().unwrap());
    let full = dir.path().join("full");
    ds_generate(&f, &full, "8", &common);
    assert_eq!(tree_bytes(&killed), tree_bytes(&full));
}

#[test]
fn dataset_convert_round_trips_fixtures() {
    use idiff_studio::dataset::recordio::RecordReader;
    let (Some(rec), Some(expected), Some(bin_file), Some(bin_expected)) = (
        fixture("tiny_train.rec"),
        fixture("tiny_train_rec_expected.safetensors"),
        fixture("tiny_pairs.bin"),
        fixture("tiny_pairs_bin_expected.safetensors"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let load = |p: &Path| std::fs::read(p).unwrap();
    let exp_bytes = load(&expected);
    let exp = safetensors::SafeTensors::deserialize(&exp_bytes).unwrap();

    // .rec -> DIR -> .rec keeps images and labels.
    let folder = dir.path().join("folder");
    ds_ok(&run(&[
        "dataset",
        "convert",
        "--from",
        s(&rec),
        "--to",
        s(&folder),
    ]));
    let back = dir.path().join("back.rec");
    ds_ok(&run(&[
        "dataset",
        "convert",
        "--from",
        s(&folder),
        "--to",
        s(&back),
    ]));
    let reader = RecordReader::open(&back, dir.path().join("back.idx")).unwrap();
    let want_labels: Vec<i64> = exp
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(reader.labels().unwrap(), want_labels);
    let pixels: Vec<u8> = (0..reader.len())
        .flat_map(|i| reader.get(i).unwrap().0.into_raw())
        .collect();
    assert_eq!(pixels, exp.tensor("images_hwc_rgb").unwrap().data());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("property"))
            .unwrap()
            .trim(),
        std::fs::read_to_string(fixture("tiny_train_property").unwrap())
            .unwrap()
            .trim()
    );

    // .rec -> safetensors holds the fixture's pixels and labels.
    let st = dir.path().join("train.safetensors");
    ds_ok(&run(&[
        "dataset",
        "convert",
        "--from",
        s(&rec),
        "--to",
        s(&st),
    ]));
    let got_bytes = load(&st);
    let got = safetensors::SafeTensors::deserialize(&got_bytes).unwrap();
    assert_eq!(
        got.tensor("images_hwc_rgb").unwrap().data(),
        exp.tensor("images_hwc_rgb").unwrap().data()
    );
    assert_eq!(
        got.tensor("labels").unwrap().data(),
        exp.tensor("labels").unwrap().data()
    );

    // .bin -> safetensors has the fixture's pixels and issame; and back to .bin.
    let pairs = dir.path().join("pairs.safetensors");
    ds_ok(&run(&[
        "dataset",
        "convert",
        "--from",
        s(&bin_file),
        "--to",
        s(&pairs),
    ]));
    let (got_bytes, exp_bytes) = (load(&pairs), load(&bin_expected));
    let got = safetensors::SafeTensors::deserialize(&got_bytes).unwrap();
    let exp = safetensors::SafeTensors::deserialize(&exp_bytes).unwrap();
    assert_eq!(
        got.tensor("images_hwc_rgb").unwrap().shape(),
        &[12, 112, 112, 3]
    );
    assert_eq!(
        got.tensor("images_hwc_rgb").unwrap().data(),
        exp.tensor("images_hwc_rgb").unwrap().data()
    );
    let flags =
        |t: safetensors::tensor::TensorView| t.data().iter().map(|&b| b != 0).collect::<Vec<_>>();
    assert_eq!(
        flags(got.tensor("issame").unwrap()),
        flags(exp.tensor("issame").unwrap())
    );
    let back_bin = dir.path().join("back.bin");
    ds_ok(&run(&[
        "dataset",
        "convert",
        "--from",
        s(&pairs),
        "--to",
        s(&back_bin),
    ]));
    let (imgs, _) =
        idiff_studio::dataset::verification_bin::load_verification_bin(&back_bin).unwrap();
    let px: Vec<u8> = imgs.into_iter().flat_map(|i| i.into_raw()).collect();
    assert_eq!(px, exp.tensor("images_hwc_rgb").unwrap().data());

    // Pairs cannot become an ImageFolder.
    let o = run(&[
        "dataset",
        "convert",
        "--from",
        s(&bin_file),
        "--to",
        s(&dir.path().join("pairs_dir")),
    ]);
    assert_one_line_error(&o, "verification pairs");
}

#[test]
fn dataset_convert_warns_when_all_labels_are_equal() {
    let dir = tempfile::tempdir().unwrap();
    let dev = candle_core::Device::Cpu;
    let images = candle_core::Tensor::from_vec(
        (0..3 * 8 * 8 * 3)
            .map(|v| (v % 251) as u8)
            .collect::<Vec<u8>>(),
        (3, 8, 8, 3),
        &dev,
    )
    .unwrap();
    let labels = candle_core::Tensor::from_vec(vec![4i64; 3], 3, &dev).unwrap();
    let st = dir.path().join("same.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("images_hwc_rgb".to_string(), images),
            ("labels".to_string(), labels),
        ]),
        &st,
    )
    .unwrap();
    let rec = dir.path().join("same.rec");
    let o = run(&["dataset", "convert", "--from", s(&st), "--to", s(&rec)]);
    ds_ok(&o);
    let o = run(&[
        "dataset",
        "convert",
        "--from",
        s(&rec),
        "--to",
        s(&dir.path().join("out")),
    ]);
    ds_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("same label"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// FR training: `train-fr`, `eval`, `verify`

#[test]
fn verify_cli_matches_insightface_fixture() {
    let (Some(emb), Some(expected)) = (
        fixture("verif_dev_verification.safetensors"),
        fixture("verif_dev_verification_expected.json"),
    ) else {
        return;
    };
    let o = run(&["verify", "--embeddings", s(&emb)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(expected).unwrap()).unwrap();
    for key in ["accuracy_mean", "accuracy_std", "best_thresholds"] {
        assert_eq!(got[key], want[key], "{key}");
    }
}

#[test]
fn verify_cli_rejects_bad_embedding_files() {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let only_emb = dir.path().join("only.safetensors");
    let emb = Tensor::zeros((40, 4), candle_core::DType::F32, &dev).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings", emb.clone())]),
        &only_emb,
    )
    .unwrap();
    assert_one_line_error(
        &run(&["verify", "--embeddings", s(&only_emb)]),
        "`issame` is missing",
    );
    let wrong = dir.path().join("wrong.safetensors");
    let same = Tensor::zeros(7, candle_core::DType::U8, &dev).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("embeddings", emb), ("issame", same)]),
        &wrong,
    )
    .unwrap();
    assert_one_line_error(
        &run(&["verify", "--embeddings", s(&wrong)]),
        "`issame` has shape [7]",
    );
}

#[test]
fn train_fr_then_eval_on_procface() {
    use idiff_studio::dataset::verification_bin::VerificationPairs;
    use idiff_studio::dataset::ImageEncoding;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("faces");
    idiff_studio::procface::write_image_folder(&data, 0..4, 4, 32).unwrap();
    // 20 held-out pairs at 112×112: alternately same identity and different identities.
    let bins = dir.path().join("bins");
    std::fs::create_dir(&bins).unwrap();
    let (mut images, mut issame) = (Vec::new(), Vec::new());
    for k in 0..20u64 {
        let id = 100 + k;
        let other = if k % 2 == 0 { id } else { id + 50 };
        images.push(idiff_studio::procface::render_sample(id, 0, 112));
        images.push(idiff_studio::procface::render_sample(other, 1, 112));
        issame.push(k % 2 == 0);
    }
    let val = bins.join("heldout.bin");
    VerificationPairs::from_images(&images, issame, ImageEncoding::Png)
        .unwrap()
        .save(&val)
        .unwrap();
    let out = dir.path().join("run");
    let args = [
        "train-fr",
        "--data",
        s(&data),
        "--backbone",
        "1,1,1,1",
        "--width",
        "8",
        "--input-size",
        "32",
        "--num-features",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.1",
        "--no-lr-scaling",
        "--rand-ops",
        "2",
        "--loss",
        "arcface",
        "--out",
        s(&out),
        "--val",
        s(&val),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "backbone.safetensors",
        "best_backbone.safetensors",
        "metrics.csv",
        "latest.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics.as_array().unwrap().len(), 2);
    assert_eq!(metrics[1]["val"]["name"], "heldout");

    // The same output folder again needs --resume; with it the finished run is a no-op.
    assert_one_line_error(&run(&args), "--resume");
    let mut resume = args.to_vec();
    resume.push("--resume");
    let o = run(&resume);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let o = run(&[
        "eval",
        "--model",
        s(&out.join("backbone.safetensors")),
        "--bins",
        s(&bins),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["sets"][0]["name"], "heldout");
    assert_eq!(report["sets"][0]["pairs"], 20);
    let acc = report["sets"][0]["accuracy_mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(String::from_utf8_lossy(&o.stderr).contains("heldout"));

    assert_one_line_error(
        &run(&[
            "eval",
            "--model",
            s(&out.join("backbone.safetensors")),
            "--bins",
            s(&data),
        ]),
        "no *.bin",
    );
    assert_one_line_error(
        &run(&[
            "train-fr",
            "--data",
            s(&data),
            "--backbone",
            "resnet9",
            "--out",
            s(&out),
        ]),
        "unknown backbone",
    );
}

#[test]
fn embed_cli_real_photos_aligned_onnx_safetensors_npy_and_no_face_error() {
    use idiff_studio::onnx::cached_model_file;
    let Some(fr) = cached_model_file("fr_feature.onnx") else {
        return;
    };
    let names = ["biden", "obama", "obama2", "obama3"];
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    for n in names {
        let Some(p) = cached_model_file(&format!("photos/{n}.jpg")) else {
            return;
        };
        std::fs::copy(p, photos.join(format!("{n}.jpg"))).unwrap();
    }
    // Folder in, safetensors out: one aligned embedding per photo, names sorted.
    let out = dir.path().join("e.safetensors");
    let o = run(&[
        "embed",
        "--images",
        s(&photos),
        "--fr-model",
        s(&fr),
        "--align",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = idiff_studio::analysis::embed::Embeddings::load(&out).unwrap();
    assert_eq!(
        e.files,
        ["biden.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg"]
    );
    assert_eq!(e.dim, 512);
    let cos =
        |i: usize, j: usize| -> f32 { e.row(i).iter().zip(e.row(j)).map(|(a, b)| a * b).sum() };
    for i in 0..4 {
        assert!((cos(i, i) - 1.0).abs() < 1e-5);
    }
    for (i, j) in [(1, 2), (1, 3), (2, 3)] {
        assert!(cos(i, j) > 0.5, "obama pair {i}-{j}: {}", cos(i, j));
    }
    for i in 1..4 {
        assert!(cos(0, i) < 0.25, "biden vs {i}: {}", cos(0, i));
    }
    // Files in, .npy out (+ the names beside it); same rows as the safetensors.
    let npy = dir.path().join("e.npy");
    let files: Vec<String> = ["obama2", "biden"]
        .iter()
        .map(|n| photos.join(format!("{n}.jpg")).display().to_string())
        .collect();
    let o = run(&[
        "embed",
        "--images",
        &files[0],
        &files[1],
        "--fr-model",
        s(&fr),
        "--align",
        "--out",
        s(&npy),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = idiff_studio::identity::Contexts::load(&npy, 512).unwrap();
    assert_eq!((c.len(), c.dim), (2, 512));
    for (k, src) in [(0, 2), (1, 0)] {
        let d = c
            .row(k)
            .iter()
            .zip(e.row(src))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 1e-6, "row {k}: {d}");
    }
    let listed = std::fs::read_to_string(dir.path().join("e.files.txt")).unwrap();
    assert_eq!(listed.lines().collect::<Vec<_>>(), files);
    // The same faces through an IResNet checkpoint (the tiny parity fixture, 64-d).
    if let (Some(w), Some(cfg)) = (
        fixture("iresnet_tiny_backbone.pth"),
        fixture("iresnet_tiny_config.json"),
    ) {
        let out64 = dir.path().join("e64.safetensors");
        let o = run(&[
            "embed",
            "--images",
            s(&photos),
            "--fr-model",
            s(&w),
            "--fr-config",
            s(&cfg),
            "--align",
            "--out",
            s(&out64),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let e64 = idiff_studio::analysis::embed::Embeddings::load(&out64).unwrap();
        assert_eq!((e64.len(), e64.dim), (4, 64));
        for i in 0..4 {
            let n: f32 = e64.row(i).iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-5);
        }
    }
    // A photo without a face under --align: one line naming the file.
    let flat = photos.join("wall.png");
    image::RgbImage::from_pixel(200, 150, image::Rgb([90, 90, 90]))
        .save(&flat)
        .unwrap();
    assert_one_line_error(
        &run(&[
            "embed",
            "--images",
            s(&photos),
            "--fr-model",
            s(&fr),
            "--align",
            "--out",
            s(&out),
        ]),
        "wall.png: no face found",
    );
}
