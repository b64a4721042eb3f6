//! Writing an analysis report folder: `metrics.json`, pyeer score files, per-identity
//! and histogram CSVs and the plots. Shared by the CLI and the studio's export buttons.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::metrics::{roc_curve, write_scores};
use super::plots;
use super::report::Report;

/// File names inside a report folder.
pub mod files {
    /// The serialised [`super::Report`] (metrics, histogram, per-identity statistics).
    pub const METRICS: &str = "metrics.json";
    /// Genuine scores, one per line (pyeer).
    pub const GENUINE: &str = "genuine.txt";
    /// Impostor scores, one per line (pyeer).
    pub const IMPOSTOR: &str = "impostor.txt";
    /// Per-identity table.
    pub const PER_IDENTITY: &str = "per_identity.csv";
    /// Exact all-pairs histogram counts.
    pub const HISTOGRAM_CSV: &str = "histogram.csv";
    /// Density plot.
    pub const HISTOGRAM_PNG: &str = "histogram.png";
    /// ROC plot.
    pub const ROC_PNG: &str = "roc.png";
    /// DET plot.
    pub const DET_PNG: &str = "det.png";
}

/// Writes the whole report into `dir` (created when missing); returns the files written.
/// ROC and DET plots need both genuine and impostor scores and are skipped otherwise.
///
/// # Errors
/// When a file cannot be written.
pub fn write_report_dir(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    let mut put = |name: &str, f: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let p = dir.join(name);
        f(&p)?;
        written.push(p);
        Ok(())
    };
    put(files::METRICS, &|p| write_metrics_json(report, p))?;
    put(files::GENUINE, &|p| write_scores(p, &report.genuine))?;
    put(files::IMPOSTOR, &|p| write_scores(p, &report.impostor))?;
    put(files::PER_IDENTITY, &|p| {
        write_text(p, &per_identity_csv(report))
    })?;
    put(files::HISTOGRAM_CSV, &|p| {
        write_text(p, &histogram_csv(report))
    })?;
    written.extend(write_plots(report, dir)?);
    Ok(written)
}

/// Writes the plots (`histogram.png`, and `roc.png` / `det.png` when both score lists
/// are non-empty) into `dir`; returns the files written.
///
/// # Errors
/// When a file cannot be written.
pub fn write_plots(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let thr = report.metrics.map(|m| m.eer_threshold);
    let eer = report.metrics.map(|m| m.eer);
    let mut out = vec![dir.join(files::HISTOGRAM_PNG)];
    plots::histogram_png(&report.histogram, thr, &out[0])?;
    if !report.genuine.is_empty() && !report.impostor.is_empty() {
        let roc = roc_curve(&report.genuine, &report.impostor);
        let (r, d) = (dir.join(files::ROC_PNG), dir.join(files::DET_PNG));
        plots::roc_png(&roc, eer, &r)?;
        plots::det_png(&roc, eer, &d)?;
        out.extend([r, d]);
    }
    Ok(out)
}

/// Writes the serialised report (pretty JSON).
///
/// # Errors
/// When the file cannot be written.
pub fn write_metrics_json(report: &Report, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("serialising the report")?;
    write_text(path, &(json + "\n"))
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    crate::files::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// CSV field, quoted when it holds a comma, quote or line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.6}")).unwrap_or_default()
}

/// Header of [`per_identity_csv`].
pub const PER_IDENTITY_HEADER: &str = "label,identity,samples,centroid_mean,centroid_std,\
centroid_min,genuine_mean,nearest_identity,nearest_similarity,outliers,outlier_files,\
leak_similarity,leak_reference,leaked,context_mean";

/// One row per identity (outlier files joined by `;`).
pub fn per_identity_csv(report: &Report) -> String {
    let mut s = String::from(PER_IDENTITY_HEADER);
    s.push('\n');
    for r in &report.per_identity {
        let outlier_files: Vec<&str> = r.outliers.iter().map(|o| o.file.as_str()).collect();
        let _ = writeln!(
            s,
            "{},{},{},{:.6},{:.6},{:.6},{},{},{},{},{},{},{},{},{}",
            r.label,
            field(&r.name),
            r.samples,
            r.centroid_mean,
            r.centroid_std,
            r.centroid_min,
            opt(r.genuine_mean),
            field(r.nearest_name.as_deref().unwrap_or("")),
            opt(r.nearest_similarity),
            r.outliers.len(),
            field(&outlier_files.join(";")),
            opt(r.leak_similarity),
            r.leak_reference.map(|v| v.to_string()).unwrap_or_default(),
            r.leaked,
            opt(r.context_mean),
        );
    }
    s
}

/// `bin_lo,bin_hi,genuine,impostor` per histogram bin.
pub fn histogram_csv(report: &Report) -> String {
    let h = &report.histogram;
    let edges = h.bin_edges();
    let mut s = String::from("bin_lo,bin_hi,genuine,impostor\n");
    for k in 0..h.bins() {
        let _ = writeln!(
            s,
            "{:.4},{:.4},{},{}",
            edges[k],
            edges[k + 1],
            h.genuine[k],
            h.impostor[k]
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::embed::Embeddings;
    use crate::analysis::report::{analyze, ReportOptions};

    #[test]
    fn report_folder_has_every_file() {
        let emb = Embeddings {
            dim: 2,
            data: vec![1.0, 0.0, 0.8, 0.6, 0.0, 1.0, 0.6, 0.8, -1.0, 0.0],
            labels: vec![0, 0, 1, 1, 2],
            identities: vec!["a".into(), "b,c".into(), "d".into()],
            files: (0..5).map(|i| format!("{i}.png")).collect(),
        };
        let r = analyze(&emb, None, &ReportOptions::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("report");
        let written = write_report_dir(&r, &out).unwrap();
        assert_eq!(written.len(), 8);
        for p in &written {
            assert!(p.is_file(), "{}", p.display());
        }
        let csv = std::fs::read_to_string(out.join(files::PER_IDENTITY)).unwrap();
        assert_eq!(csv.lines().count(), 4);
        assert!(csv.contains("\"b,c\""), "{csv}");
        let g = crate::analysis::metrics::read_scores(out.join(files::GENUINE)).unwrap();
        assert_eq!(g, r.genuine);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(files::METRICS)).unwrap())
                .unwrap();
        assert_eq!(json["images"], 5);
        let hist = std::fs::read_to_string(out.join(files::HISTOGRAM_CSV)).unwrap();
        assert_eq!(hist.lines().count(), 101);
    }
}
