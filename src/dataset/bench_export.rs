//! `idiff-studio bench-export`: export throughput (images/s) for PNG and JPEG, ImageFolder
//! and RecordIO, with 1, 2, … rayon threads. The source is ProcFace renders held in memory
//! (rendered before timing), so no model is needed. Each measurement is the fastest of
//! `--repeats` runs; the time includes encoding, resizing (RecordIO) and writing.

use super::curate::{curate, CurationRules, ImageId};
use super::export::{export, ExportFormat, ExportOutcome, ExportRequest, ExportSummary};
use super::source::{ImageSource, MemorySource};
use super::ImageEncoding;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Arguments of `bench-export`.
#[derive(Debug, clap::Args)]
pub struct BenchExportArgs {
    /// Images to export.
    #[arg(long, default_value_t = 2000)]
    pub images: usize,
    /// Images per identity.
    #[arg(long, default_value_t = 20)]
    pub per_identity: usize,
    /// Side of the source images (IDiff-Face writes 128; RecordIO resizes to 112).
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Rayon thread counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub threads: Vec<usize>,
    /// Formats to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "imagefolder,recordio"
    )]
    pub formats: Vec<ExportFormat>,
    /// JPEG quality of the JPEG measurements.
    #[arg(long, default_value_t = 90)]
    pub jpeg_quality: u8,
    /// Runs per measurement; the fastest is reported (robust to other load on the machine).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Scratch folder for the exports (default: the system temp folder).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct ExportMeasurement {
    /// `imagefolder` or `recordio`.
    pub format: String,
    /// `png` or `jpeg`.
    pub encoding: String,
    /// Rayon threads.
    pub threads: usize,
    /// Images exported.
    pub images: usize,
    /// Seconds.
    pub seconds: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// Process CPU seconds per wall second during the fastest run (Linux; shows whether
    /// the threads really ran in parallel on a shared machine).
    pub cpu_utilisation: Option<f64>,
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`, 100 Hz ticks).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Runs the benchmark and prints a table.
pub fn run(a: &BenchExportArgs) -> Result<Vec<ExportMeasurement>> {
    if a.images == 0 || a.per_identity == 0 || a.size == 0 {
        bail!("--images, --per-identity and --size must be positive");
    }
    let start = Instant::now();
    let items: Vec<(ImageId, Arc<image::RgbImage>)> = (0..a.images)
        .into_par_iter()
        .map(|i| {
            let id = ImageId {
                identity: i / a.per_identity,
                sample: i % a.per_identity,
            };
            let img = crate::procface::render_sample(id.identity as u64, id.sample as u64, a.size);
            (id, Arc::new(img))
        })
        .collect();
    eprintln!(
        "rendered {} ProcFace images of {}x{} in {:.1} s",
        a.images,
        a.size,
        a.size,
        start.elapsed().as_secs_f64()
    );
    let source = MemorySource::new("procface (bench)", items, None);
    let curation = curate(source.images(), None, None, &CurationRules::default())?;
    let scratch = a
        .scratch
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("idiff-bench-export-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let encodings = [
        ImageEncoding::Png,
        ImageEncoding::Jpeg {
            quality: a.jpeg_quality,
        },
    ];
    let mut results = Vec::new();
    println!(
        "{:<12} {:<5} {:>7} {:>8} {:>10} {:>6}",
        "format", "enc", "threads", "seconds", "images/s", "cpu"
    );
    for &format in &a.formats {
        for encoding in encodings {
            for &threads in &a.threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads.max(1))
                    .build()?;
                let out = scratch.join(format!("{}-{}", format.name(), threads));
                let req = ExportRequest {
                    out: out.clone(),
                    format,
                    encoding,
                    rules: CurationRules::default(),
                };
                let mut best: Option<(ExportSummary, Option<f64>)> = None;
                for _ in 0..a.repeats.max(1) {
                    let cpu0 = cpu_seconds();
                    let outcome = pool.install(|| {
                        export(
                            &source,
                            &curation,
                            None,
                            &req,
                            &AtomicBool::new(false),
                            &mut |_| {},
                        )
                    })?;
                    let _ = std::fs::remove_dir_all(&out);
                    let ExportOutcome::Complete(s) = outcome else {
                        bail!("benchmark export was cancelled");
                    };
                    let cpu = cpu0
                        .zip(cpu_seconds())
                        .map(|(a, b)| (b - a) / s.seconds.max(1e-9));
                    if best.as_ref().is_none_or(|b| s.seconds < b.0.seconds) {
                        best = Some((s, cpu));
                    }
                }
                let Some((s, cpu)) = best else {
                    bail!("no benchmark run");
                };
                let m = ExportMeasurement {
                    format: format.name().into(),
                    encoding: match encoding {
                        ImageEncoding::Png => "png".into(),
                        ImageEncoding::Jpeg { .. } => "jpeg".into(),
                    },
                    threads,
                    images: s.images,
                    seconds: s.seconds,
                    images_per_s: s.images_per_s,
                    cpu_utilisation: cpu,
                };
                let cpu = m.cpu_utilisation.map_or("–".into(), |c| format!("{c:.2}"));
                println!(
                    "{:<12} {:<5} {:>7} {:>8.2} {:>10.0} {:>6}",
                    m.format, m.encoding, m.threads, m.seconds, m.images_per_s, cpu
                );
                results.push(m);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(results)
}
