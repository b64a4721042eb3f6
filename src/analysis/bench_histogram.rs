//! `bench-histogram`: times the all-pairs genuine/impostor histogram on the CPU, against
//! the numpy baseline script (when python3 with numpy is available) and on the wgpu
//! compute shader (whatever adapter is present; lavapipe without a GPU).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::embed::normalise_rows;
use super::gpu::GpuHistogram;
use super::histogram::{all_pairs_histogram, PairHistogram};

/// Arguments of `bench-histogram`.
#[derive(Debug, Clone, Args)]
pub struct BenchHistogramArgs {
    /// Embeddings.
    #[arg(long, default_value_t = 20_000)]
    pub n: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// Identities (labels `i * ids / n`, like the numpy script).
    #[arg(long, default_value_t = 400)]
    pub ids: usize,
    /// Histogram bins.
    #[arg(long, default_value_t = 100)]
    pub bins: usize,
    /// Timed runs of each path (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Skip the wgpu path.
    #[arg(long)]
    pub no_gpu: bool,
    /// Skip the numpy baseline.
    #[arg(long)]
    pub no_numpy: bool,
    /// numpy method of the baseline script: histogram or bincount.
    #[arg(long, default_value = "histogram")]
    pub numpy_method: String,
    /// Python interpreter.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Baseline script; default: scripts/numpy_histogram_baseline.py of the source tree.
    #[arg(long)]
    pub numpy_script: Option<PathBuf>,
}

/// Timings of one benchmark run, in seconds (best of the repeats).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramBench {
    /// Pairs per run.
    pub pairs: u64,
    /// CPU path.
    pub cpu_seconds: f64,
    /// numpy baseline, when it ran.
    pub numpy_seconds: Option<f64>,
    /// wgpu path including upload and readback, and its adapter, when it ran.
    pub gpu: Option<(String, f64)>,
    /// Counts the GPU binned differently from the CPU (sum of |difference|).
    pub gpu_moved: Option<u64>,
}

/// Uniform random unit vectors and the numpy script's labels.
pub fn bench_data(n: usize, dim: usize, ids: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut emb: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    normalise_rows(&mut emb, dim);
    let labels = (0..n).map(|i| (i * ids.max(1) / n.max(1)) as u32).collect();
    (emb, labels)
}

fn best_of<T>(repeat: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let v = f()?;
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(v);
    }
    Ok((best, last.expect("at least one run")))
}

fn moved(a: &PairHistogram, b: &PairHistogram) -> u64 {
    a.genuine
        .iter()
        .chain(&a.impostor)
        .zip(b.genuine.iter().chain(&b.impostor))
        .map(|(x, y)| x.abs_diff(*y))
        .sum()
}

/// Runs the benchmark, printing one line per path; returns the timings.
///
/// # Errors
/// On invalid sizes; a missing numpy or GPU only prints a note.
pub fn run(a: &BenchHistogramArgs) -> Result<HistogramBench> {
    let (emb, labels) = bench_data(a.n, a.dim, a.ids, 0);
    let pairs = (a.n as u64) * (a.n as u64).saturating_sub(1) / 2;
    super::commands::emit(&format!(
        "data: {} x {}, {} identities, {pairs} pairs, {} bins, best of {}\n",
        a.n, a.dim, a.ids, a.bins, a.repeat
    ));
    let (cpu_seconds, cpu) = best_of(a.repeat, || {
        all_pairs_histogram(&emb, a.dim, &labels, a.bins)
    })?;
    super::commands::emit(&format!(
        "cpu  (gemm tiles, {} threads): {cpu_seconds:.3} s ({:.1} Mpairs/s)\n",
        rayon::current_num_threads(),
        pairs as f64 / cpu_seconds / 1e6
    ));
    let numpy_seconds = if a.no_numpy { None } else { numpy_baseline(a) };
    if let Some(s) = numpy_seconds {
        super::commands::emit(&format!(
            "numpy ({}): {s:.3} s -> cpu path is {:.2}x faster\n",
            a.numpy_method,
            s / cpu_seconds
        ));
    }
    let mut gpu_result = None;
    let mut gpu_moved = None;
    if !a.no_gpu {
        let t = Instant::now();
        match GpuHistogram::new() {
            Ok(gpu) => {
                let init = t.elapsed().as_secs_f64();
                // A software adapter (lavapipe) is timed once: it is slow and steady.
                let repeat = if gpu.is_software() { 1 } else { a.repeat };
                let (s, h) = best_of(repeat, || gpu.histogram(&emb, a.dim, &labels, a.bins))?;
                let m = moved(&h, &cpu);
                super::commands::emit(&format!(
                    "wgpu {}: {s:.3} s incl. upload/readback (device init {init:.2} s), \
                     {m} counts differ from cpu ({:.2} per million pairs)\n",
                    gpu.adapter_name(),
                    m as f64 / pairs.max(1) as f64 * 1e6
                ));
                gpu_result = Some((gpu.adapter_name(), s));
                gpu_moved = Some(m);
            }
            Err(e) => super::commands::emit(&format!("wgpu: skipped ({e})\n")),
        }
    }
    Ok(HistogramBench {
        pairs,
        cpu_seconds,
        numpy_seconds,
        gpu: gpu_result,
        gpu_moved,
    })
}

/// Best wall time of the numpy script, or `None` (with a note) when it cannot run.
fn numpy_baseline(a: &BenchHistogramArgs) -> Option<f64> {
    let script = a.numpy_script.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/numpy_histogram_baseline.py")
    });
    let has_numpy = Command::new(&a.python)
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_numpy || !script.is_file() {
        super::commands::emit(&format!(
            "numpy: skipped ({} with numpy or {} not available)\n",
            a.python,
            script.display()
        ));
        return None;
    }
    let out = Command::new(&a.python)
        .arg(&script)
        .args(["--n", &a.n.to_string(), "--dim", &a.dim.to_string()])
        .args(["--ids", &a.ids.to_string(), "--bins", &a.bins.to_string()])
        .args([
            "--method",
            &a.numpy_method,
            "--repeat",
            &a.repeat.to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", script.display()));
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let best = parse_wall_seconds(&text);
            if best.is_none() {
                super::commands::emit("numpy: no timings in the script's output\n");
            }
            best
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            super::commands::emit(&format!(
                "numpy: failed ({})\n",
                err.lines().last().unwrap_or("no output")
            ));
            None
        }
        Err(e) => {
            super::commands::emit(&format!("numpy: failed ({e:#})\n"));
            None
        }
    }
}

/// Smallest `<seconds> s wall` value in the script's output.
fn parse_wall_seconds(text: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| {
            let (head, _) = l.split_once(" s wall")?;
            head.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .reduce(f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_script_output_and_runs_small() {
        let text = "20000x512 histogram: 4.250 s wall, 8.10 s cpu, total 1 genuine 0\n\
                    20000x512 histogram: 3.900 s wall, 7.90 s cpu, total 1 genuine 0\n";
        assert_eq!(parse_wall_seconds(text), Some(3.9));
        assert_eq!(parse_wall_seconds("nothing"), None);
        let (emb, labels) = bench_data(10, 4, 3, 1);
        assert_eq!(labels, vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert!((emb[..4].iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-5);
        let b = run(&BenchHistogramArgs {
            n: 300,
            dim: 16,
            ids: 10,
            bins: 100,
            repeat: 1,
            no_gpu: true,
            no_numpy: true,
            numpy_method: "histogram".into(),
            python: "python3".into(),
            numpy_script: None,
        })
        .unwrap();
        assert_eq!(b.pairs, 300 * 299 / 2);
        assert!(b.numpy_seconds.is_none() && b.gpu.is_none());
    }
}
