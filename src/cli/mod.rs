//! The command-line interface: every studio action as a subcommand of the same binary.

pub mod embed;

use crate::diffusion::sampler::{SamplerKind, SamplingSettings};
use crate::files::sha256_file;
use crate::generate::{
    run_generate, GenerateEvent, GenerateOutcome, GenerateRequest, IdentitySource, Shard,
};
use crate::pipeline::{enable_flush_to_zero, parse_device, parse_dtype, Pipeline, WeightPaths};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// IDiff Studio: generate, inspect, curate and train on IDiff-Face synthetic identities.
#[derive(Debug, Parser)]
#[command(name = "idiff-studio", version, about)]
pub struct Cli {
    /// The action to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one network on tensors from a safetensors file (parity checks, Python interop).
    #[command(subcommand)]
    Forward(ForwardCommand),
    /// Sample synthetic identities into an ImageFolder with a grid and a manifest.
    Generate(GenerateArgs),
    /// Time the U-Net, VQ decoder, IResNet-50, a training step and sampling on random weights
    /// (with --reference: beside PyTorch timings taken on this machine).
    Bench(crate::bench::BenchArgs),
    /// Run the reference parity checks on a device/dtype and report max abs errors.
    Parity(crate::parity::ParityArgs),
    /// Render ProcFace identities as an ImageFolder and/or a verification `.bin`.
    Procface(crate::default_model::ProcfaceArgs),
    /// Train the default model's small VQ autoencoder on ProcFace images.
    TrainAutoencoder(crate::default_model::autoencoder::TrainAutoencoderArgs),
    /// Embed an ImageFolder (or read embeddings) and write a verification/identity report.
    Analyze(crate::analysis::commands::AnalyzeArgs),
    /// pyeer statistics (EER, FMR100, AUC, d', …) of genuine/impostor score lists.
    Metrics(crate::analysis::commands::MetricsArgs),
    /// Time the all-pairs score histogram: CPU, numpy baseline and wgpu.
    BenchHistogram(crate::analysis::bench_histogram::BenchHistogramArgs),
    /// Train the default model's identity-conditioned U-Net on ProcFace VQ latents.
    TrainDiffusion(crate::default_model::diffusion_train::TrainDiffusionArgs),
    /// Measure identity metrics of the default model (or a model folder) with its FR model.
    EvalDefault(crate::default_model::eval::EvalDefaultArgs),
    /// Dataset tools: convert between formats, curate and export.
    #[command(subcommand)]
    Dataset(crate::dataset::commands::DatasetCommand),
    /// Join the outputs of `generate --shard i/N` into one dataset.
    Merge(crate::dataset::commands::MergeArgs),
    /// Measure export throughput (images/s) on ProcFace images.
    BenchExport(crate::dataset::bench_export::BenchExportArgs),
    /// Train an IResNet face-recognition model (CosFace/ArcFace) on an ImageFolder or RecordIO.
    TrainFr(crate::train::cli::TrainFrArgs),
    /// Evaluate a backbone on every InsightFace `.bin` in a folder.
    Eval(crate::train::cli::EvalArgs),
    /// Run the InsightFace 10-fold verification protocol on stored embeddings.
    Verify(crate::train::cli::VerifyArgs),
    /// One L2-normalised embedding per image (or detected, aligned face) with an ONNX or IResNet model.
    Embed(embed::EmbedArgs),
}

/// Common arguments of the `forward` subcommands.
#[derive(Debug, Args)]
pub struct ForwardIo {
    /// Architecture config (JSON/YAML with the reference's key names).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Input tensors (safetensors).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Output tensors (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `forward` subcommands.
#[derive(Debug, Subcommand)]
pub enum ForwardCommand {
    /// U-Net: reads `x`, `t`, optional `context`; writes `eps`.
    Unet {
        /// U-Net checkpoint.
        #[arg(long)]
        weights: PathBuf,
        #[command(flatten)]
        io: ForwardIo,
    },
    /// Ancestral DDPM steps: reads `x`, `context`, `ddpm_noise`; writes `x`.
    DdpmSteps {
        /// U-Net checkpoint.
        #[arg(long)]
        weights: PathBuf,
        /// Steps to run, in order (e.g. 999,998,997,996).
        #[arg(long, value_delimiter = ',', required = true)]
        steps: Vec<usize>,
        #[command(flatten)]
        io: ForwardIo,
    },
    /// VQ encoder: reads `image`; writes `latent`, `code_indices`.
    VqEncode {
        /// Encoder state dict.
        #[arg(long)]
        encoder: PathBuf,
        /// File holding `quantize.embedding.weight` (the decoder state dict); default: the
        /// sibling `*decoder*` file.
        #[arg(long)]
        codebook: Option<PathBuf>,
        #[command(flatten)]
        io: ForwardIo,
    },
    /// VQ decoder: reads `latent`; writes the three decodes.
    VqDecode {
        /// Decoder state dict.
        #[arg(long)]
        decoder: PathBuf,
        #[command(flatten)]
        io: ForwardIo,
    },
    /// IResNet: reads `image`; writes `embedding`.
    Iresnet {
        /// Backbone weights.
        #[arg(long)]
        weights: PathBuf,
        #[command(flatten)]
        io: ForwardIo,
    },
}

/// Sampler choice on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SamplerArg {
    /// Reference ancestral DDPM, all 1000 steps.
    Ddpm,
    /// DDIM with --steps and --eta.
    Ddim,
}

/// Arguments of `generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// U-Net checkpoint (`ema_averaged_model.ckpt`, bare eps_model or safetensors); with
    /// neither --unet nor --decoder, the built-in default model is used.
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// U-Net config; default: `.hydra/config.yaml` beside the checkpoint, else the released one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// VQ decoder state dict (`first_stage_decoder_state_dict.pt`).
    #[arg(long)]
    pub decoder: Option<PathBuf>,
    /// Decoder config; default: released VQ-f4.
    #[arg(long)]
    pub decoder_config: Option<PathBuf>,
    /// Context file (reference torch pickle, .npy or safetensors).
    #[arg(long, conflicts_with = "random_identities")]
    pub contexts: Option<PathBuf>,
    /// Number of uniform random identities.
    #[arg(long, conflicts_with = "procface_identities")]
    pub random_identities: Option<usize>,
    /// Number of new ProcFace identities (seeds from 2,000,000 + --first-identity, never
    /// seen in training), embedded by the built-in FR model: for the built-in U-Net.
    #[arg(long, conflicts_with = "contexts")]
    pub procface_identities: Option<usize>,
    /// Global index of the first random or ProcFace identity.
    #[arg(long, default_value_t = 0)]
    pub first_identity: usize,
    /// Images per identity.
    #[arg(long, default_value_t = 4)]
    pub per_identity: usize,
    /// Sampler.
    #[arg(long, value_enum, default_value = "ddim")]
    pub sampler: SamplerArg,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// DDIM eta.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Guidance scale w (1 = plain conditional).
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f64,
    /// Inference-time context dropout p.
    #[arg(long, default_value_t = 0.0)]
    pub context_dropout: f64,
    /// Seed of the seed contract.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per forward batch (does not change the images).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Only identities p with p mod N == i (format i/N).
    #[arg(long)]
    pub shard: Option<Shard>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// U-Net dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Runs the CLI; returns the process exit code.
pub fn main_with(cli: Cli) -> Result<i32> {
    enable_flush_to_zero();
    match cli.command {
        Command::Forward(f) => forward(f).map(|_| 0),
        Command::Generate(g) => generate(g),
        Command::Bench(b) => crate::bench::run(&b).map(|_| 0),
        Command::Parity(p) => crate::parity::run(&p),
        Command::Procface(p) => crate::default_model::run_procface(&p),
        Command::TrainAutoencoder(a) => crate::default_model::autoencoder::run(&a),
        Command::TrainDiffusion(a) => crate::default_model::diffusion_train::run(&a),
        Command::EvalDefault(a) => crate::default_model::eval::run(&a),
        Command::Analyze(a) => crate::analysis::commands::run_analyze(&a),
        Command::Metrics(a) => crate::analysis::commands::run_metrics(&a),
        Command::BenchHistogram(a) => crate::analysis::bench_histogram::run(&a).map(|_| 0),
        Command::Dataset(d) => crate::dataset::commands::run_dataset(&d),
        Command::Merge(m) => crate::dataset::commands::run_merge(&m),
        Command::BenchExport(b) => crate::dataset::bench_export::run(&b).map(|_| 0),
        Command::TrainFr(a) => crate::train::cli::cli_train_fr(&a),
        Command::Eval(a) => crate::train::cli::cli_eval(&a),
        Command::Verify(a) => crate::train::cli::cli_verify(&a),
        Command::Embed(a) => embed::run_embed(&a),
    }
}

fn forward(cmd: ForwardCommand) -> Result<()> {
    use crate::forward as f;
    match cmd {
        ForwardCommand::Unet { weights, io } => f::unet(
            &weights,
            io.config.as_deref(),
            &io.inputs,
            &io.out,
            &parse_device(&io.device)?,
        ),
        ForwardCommand::DdpmSteps { weights, steps, io } => f::ddpm_steps(
            &weights,
            io.config.as_deref(),
            &io.inputs,
            &steps,
            &io.out,
            &parse_device(&io.device)?,
        ),
        ForwardCommand::VqEncode {
            encoder,
            codebook,
            io,
        } => f::vq_encode(
            &encoder,
            codebook.as_deref(),
            io.config.as_deref(),
            &io.inputs,
            &io.out,
            &parse_device(&io.device)?,
        ),
        ForwardCommand::VqDecode { decoder, io } => f::vq_decode(
            &decoder,
            io.config.as_deref(),
            &io.inputs,
            &io.out,
            &parse_device(&io.device)?,
        ),
        ForwardCommand::Iresnet { weights, io } => f::iresnet(
            &weights,
            io.config.as_deref(),
            &io.inputs,
            &io.out,
            &parse_device(&io.device)?,
        ),
    }
}

fn generate(a: GenerateArgs) -> Result<i32> {
    let identities = match (&a.contexts, a.random_identities, a.procface_identities) {
        (Some(path), _, _) => IdentitySource::File {
            path: path.clone(),
            sha256: sha256_file(path)?,
        },
        (None, Some(count), _) => IdentitySource::Random {
            count,
            first: a.first_identity,
            seed: a.seed,
        },
        (None, None, Some(count)) => IdentitySource::Procface {
            count,
            first: a.first_identity,
        },
        (None, None, None) => {
            anyhow::bail!("give --contexts FILE, --random-identities N or --procface-identities N")
        }
    };
    let sampler = match a.sampler {
        SamplerArg::Ddpm => SamplerKind::Ddpm,
        SamplerArg::Ddim => SamplerKind::Ddim {
            steps: a.steps,
            eta: a.eta,
        },
    };
    let req = GenerateRequest {
        weights: match (a.unet, a.decoder) {
            (Some(unet), Some(decoder)) => WeightPaths {
                unet,
                unet_config: a.config,
                decoder,
                decoder_config: a.decoder_config,
            },
            (None, None) => crate::default_model::assets::default_weight_paths()?,
            _ => anyhow::bail!(
                "give both --unet and --decoder, or neither to use the built-in default model"
            ),
        },
        identities,
        per_identity: a.per_identity,
        settings: SamplingSettings {
            sampler,
            guidance: a.guidance,
            context_dropout: a.context_dropout,
            seed: a.seed,
        },
        batch_size: a.batch_size,
        out: a.out,
        shard: a.shard,
    };
    req.settings.validate()?;
    let device = parse_device(&a.device)?;
    let pipeline = Pipeline::load(&req.weights, parse_dtype(&a.dtype)?, &device)?;
    // Ctrl-C sets the flag; a second Ctrl-C exits at once.
    let cancel = crate::default_model::optim::cancel_flag();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} images ({per_sec}, ETA {eta}) {msg}",
        )
        .context("progress template")?,
    );
    let mut images_done = 0u64;
    let outcome = run_generate(&req, &pipeline, &cancel, &mut |e| match e {
        GenerateEvent::Started {
            pending,
            resumed,
            images,
        } => {
            bar.set_length(images as u64);
            if resumed > 0 {
                bar.println(format!(
                    "resuming: {resumed} identities already done, {pending} to go"
                ));
            }
        }
        GenerateEvent::Step { done, total, batch } => {
            bar.set_message(format!("step {done}/{total}"));
            if done == total {
                images_done += batch as u64;
                bar.set_position(images_done);
            }
        }
        GenerateEvent::IdentityDone { .. } => {}
    })?;
    bar.finish_and_clear();
    match outcome {
        GenerateOutcome::Complete => {
            println!("done: {}", req.out.display());
            Ok(0)
        }
        GenerateOutcome::Cancelled { completed } => {
            eprintln!(
                "cancelled: {completed} complete identities kept in {}; run the same command again to resume",
                req.out.display()
            );
            Ok(130)
        }
    }
}
