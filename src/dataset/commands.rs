//! Command-line front ends of the dataset tools: `dataset convert`, `dataset export` and
//! `merge`. Errors are one line; progress goes to stderr, results to stdout.

use super::convert::convert;
use super::curate::{curate, CurationRules, LeakageRule, ManualRejects};
use super::embeddings::{load_for_files, load_reference};
use super::export::{export, ExportFormat, ExportOutcome, ExportRequest};
use super::merge::merge;
use super::source::{FolderSource, ImageSource};
use super::staging::check_destination;
use super::ImageEncoding;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `dataset` subcommands.
#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Convert between ImageFolder, RecordIO (.rec), verification .bin and safetensors.
    Convert(ConvertArgs),
    /// Curate a generated dataset and export it as an ImageFolder or RecordIO set.
    Export(ExportArgs),
}

/// Arguments of `dataset convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input: ImageFolder DIR, X.rec (with X.idx), a folder holding train.rec, X.bin or
    /// X.safetensors.
    #[arg(long)]
    pub from: PathBuf,
    /// Output: DIR (ImageFolder), OUT.rec (+ OUT.idx and property beside it), OUT.bin or
    /// OUT.safetensors.
    #[arg(long)]
    pub to: PathBuf,
    /// Encode pixels (from safetensors) as JPEG of this quality instead of PNG.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: Option<u8>,
}

/// Arguments of `dataset export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A `generate` output folder (or any ImageFolder).
    #[arg(long)]
    pub from: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "imagefolder")]
    pub format: ExportFormat,
    /// Write JPEG of this quality instead of PNG.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub jpeg_quality: Option<u8>,
    /// Drop images less similar than this to their identity centroid.
    #[arg(long)]
    pub tau_img: Option<f32>,
    /// Drop identities whose mean genuine similarity is below this.
    #[arg(long)]
    pub tau_gen: Option<f32>,
    /// Drop the later of every two identities whose centroids are more similar than this.
    #[arg(long)]
    pub tau_uniq: Option<f32>,
    /// Manual rejects: {"images": [[identity, sample]], "identities": [..]} or a studio
    /// session file.
    #[arg(long)]
    pub rejects: Option<PathBuf>,
    /// FR embeddings of the source images (.npy or safetensors, one row per image in
    /// folder order); needed by the tau rules and the reference leakage check.
    #[arg(long)]
    pub embeddings: Option<PathBuf>,
    /// Identities flagged by a leakage check (comma-separated indices).
    #[arg(long, value_delimiter = ',', conflicts_with = "leak_reference")]
    pub leak_identities: Vec<usize>,
    /// Reference embeddings (e.g. the FR model's training identities) for the leakage check.
    #[arg(long, requires = "leak_threshold")]
    pub leak_reference: Option<PathBuf>,
    /// Cosine similarity above which an identity centroid counts as leaked.
    #[arg(long, requires = "leak_reference")]
    pub leak_threshold: Option<f32>,
    /// Print the curation counts and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Destination folder (must not exist; its parent must).
    #[arg(long, required_unless_present = "dry_run")]
    pub out: Option<PathBuf>,
}

/// Arguments of `merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shard folders written by `generate --shard i/N`, all N of them.
    #[arg(long, num_args = 1.., required = true)]
    pub from: Vec<PathBuf>,
    /// Destination folder (must not exist; its parent must).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs a `dataset` subcommand; returns the exit code.
pub fn run_dataset(cmd: &DatasetCommand) -> Result<i32> {
    match cmd {
        DatasetCommand::Convert(a) => run_convert(a),
        DatasetCommand::Export(a) => run_export(a),
    }
}

fn run_convert(a: &ConvertArgs) -> Result<i32> {
    let summary = convert(&a.from, &a.to, a.jpeg_quality)?;
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "converted {} images ({} groups) to {}",
        summary.images,
        summary.groups,
        a.to.display()
    );
    Ok(0)
}

impl ExportArgs {
    /// The curation rules these arguments describe (rejects file read here).
    pub fn rules(&self) -> Result<CurationRules> {
        let leakage = match (&self.leak_reference, self.leak_threshold) {
            (Some(path), Some(threshold)) => Some(LeakageRule::Reference {
                path: path.clone(),
                threshold,
            }),
            _ if !self.leak_identities.is_empty() => Some(LeakageRule::Flagged {
                identities: self.leak_identities.iter().copied().collect(),
            }),
            _ => None,
        };
        Ok(CurationRules {
            tau_img: self.tau_img,
            tau_gen: self.tau_gen,
            tau_uniq: self.tau_uniq,
            leakage,
            rejects: match &self.rejects {
                Some(p) => ManualRejects::load(p)?,
                None => ManualRejects::default(),
            },
        })
    }
}

fn run_export(a: &ExportArgs) -> Result<i32> {
    if let Some(out) = a.out.as_ref().filter(|_| !a.dry_run) {
        // Fail before the (possibly long) curation when the destination is unusable.
        check_destination(out)?;
    }
    let rules = a.rules()?;
    let source = FolderSource::open(&a.from)?;
    if rules.needs_embeddings() && a.embeddings.is_none() {
        anyhow::bail!("--tau-img, --tau-gen, --tau-uniq and --leak-reference need --embeddings");
    }
    let embeddings = a
        .embeddings
        .as_ref()
        .map(|p| load_for_files(p, &source.relative_files()))
        .transpose()?;
    let reference = match (&a.leak_reference, &embeddings) {
        (Some(p), Some(e)) => Some(load_reference(p, e.dim)?),
        _ => None,
    };
    let outcome = curate(
        source.images(),
        embeddings.as_ref(),
        reference.as_ref(),
        &rules,
    )?;
    println!("{}", outcome.counts);
    let Some(out) = a.out.clone().filter(|_| !a.dry_run) else {
        println!("dry run: nothing written");
        return Ok(0);
    };
    let req = ExportRequest {
        out,
        format: a.format,
        encoding: match a.jpeg_quality {
            Some(quality) => ImageEncoding::Jpeg { quality },
            None => ImageEncoding::Png,
        },
        rules,
    };
    let cancel = cancel_on_ctrl_c();
    let bar = progress_bar()?;
    let result = export(
        &source,
        &outcome,
        embeddings.as_ref(),
        &req,
        &cancel,
        &mut |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
        },
    );
    bar.finish_and_clear();
    match result? {
        ExportOutcome::Complete(s) => {
            println!(
                "exported {} images of {} identities to {} ({:.0} images/s)",
                s.images,
                s.identities,
                s.out.display(),
                s.images_per_s
            );
            Ok(0)
        }
        ExportOutcome::Cancelled => {
            eprintln!("cancelled: nothing written to {}", req.out.display());
            Ok(130)
        }
    }
}

/// Runs `merge`.
pub fn run_merge(a: &MergeArgs) -> Result<i32> {
    let s = merge(&a.from, &a.out)?;
    println!(
        "merged {} shards: {} identities, {} images in {}",
        s.shards,
        s.identities,
        s.images,
        a.out.display()
    );
    Ok(0)
}

fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    cancel
}

fn progress_bar() -> Result<ProgressBar> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} images ({per_sec}, ETA {eta})",
        )
        .context("progress template")?,
    );
    Ok(bar)
}
