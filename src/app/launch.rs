//! Opening the studio window (`idiff-studio` with no arguments, or `idiff-studio studio …`),
//! with optional flags that preload a model and run a job (used by `scripts/screenshot.sh`).

use super::forms::SamplerChoice;
use super::frame_stats::FrameStats;
use super::session::{Session, STORAGE_KEY};
use super::StudioApp;
use crate::pipeline::WeightPaths;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// `idiff-studio studio`: open the studio window.
#[derive(Debug, Clone, Parser, Default)]
#[command(name = "idiff-studio studio", about = "Open the IDiff Studio window")]
pub struct StudioArgs {
    /// U-Net checkpoint to put in the Model panel.
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// U-Net config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// VQ decoder checkpoint.
    #[arg(long)]
    pub decoder: Option<PathBuf>,
    /// VQ decoder config.
    #[arg(long)]
    pub decoder_config: Option<PathBuf>,
    /// Session file to open at start.
    #[arg(long)]
    pub session: Option<PathBuf>,
    /// Number of random identities.
    #[arg(long, conflicts_with = "procface_identities")]
    pub identities: Option<usize>,
    /// Number of new ProcFace identities (built-in model; the default when the studio opens
    /// on the built-in model without a saved workspace).
    #[arg(long)]
    pub procface_identities: Option<usize>,
    /// Samples per identity.
    #[arg(long)]
    pub per_identity: Option<usize>,
    /// DDIM steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale.
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use the reference DDPM-1000 sampler.
    #[arg(long)]
    pub ddpm: bool,
    /// Load the model and start a run right away.
    #[arg(long)]
    pub run: bool,
    /// Touch this file once the automatic run has finished and the window has settled.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Close the window after the automatic run (after writing the ready file).
    #[arg(long)]
    pub exit_when_done: bool,
    /// Start from defaults instead of the saved workspace, and do not save it on exit.
    #[arg(long)]
    pub fresh: bool,
    /// Window size in points, e.g. 1440x900.
    #[arg(long, default_value = "1440x900")]
    pub size: String,
}

/// Parses `args` (the process arguments, program name first; `studio` may follow) and
/// opens the window. Returns the process exit code.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> i32 {
    let mut args = args;
    if args.get(1).is_some_and(|a| a == "studio") {
        args.remove(1);
    }
    let opts = match StudioArgs::try_parse_from(&args) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            1
        }
    }
}

/// Opens the studio window and blocks until it closes.
pub fn run(opts: StudioArgs) -> anyhow::Result<()> {
    crate::pipeline::enable_flush_to_zero();
    let (w, h) = opts
        .size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<f32>().ok()?, h.parse::<f32>().ok()?)))
        .unwrap_or((1440.0, 900.0));
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("IDiff Studio")
            .with_app_id("idiff-studio")
            .with_inner_size([w, h])
            .with_min_inner_size([900.0, 600.0]),
        persist_window: !opts.fresh,
        ..Default::default()
    };
    let builtin = if opts.unet.is_none() {
        builtin_default_paths()
    } else {
        None
    };
    let procface = procface_start_count(&opts, builtin.is_some());
    eframe::run_native(
        "idiff-studio",
        native,
        Box::new(move |cc| {
            let mut app = StudioApp::new();
            let mut restored = false;
            if !opts.fresh {
                if let Some(s) = cc
                    .storage
                    .and_then(|st| st.get_string(STORAGE_KEY))
                    .and_then(|j| Session::from_json(&j).ok())
                {
                    s.restore(&mut app.state);
                    restored = true;
                }
            }
            if use_builtin_default(&mut app, builtin.as_ref()) && !opts.run {
                app.state.load_model(&app.worker);
            }
            if let Some(n) = procface.filter(|_| opts.procface_identities.is_some() || !restored) {
                start_procface_identities(&mut app, n);
            }
            if !restored && builtin.as_ref().is_some_and(|b| b.is_ok()) {
                app.state.sampling.guidance = BUILTIN_GUIDANCE;
                app.state.sampling.steps = BUILTIN_STEPS;
            }
            apply_flags(&mut app, &opts);
            Ok(Box::new(Launched::new(app, opts)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the studio window: {e}"))
}

/// The built-in default model's files (U-Net, decoder, configs; FR backbone), written once
/// to the cache folder. Called before the window opens, so no weights are read or written on
/// the UI thread. `None` when this binary embeds no default model.
pub fn builtin_default_paths() -> Option<anyhow::Result<(WeightPaths, PathBuf)>> {
    use crate::default_model::assets;
    assets::is_embedded().then(|| {
        let weights = assets::default_weight_paths()?;
        let (fr, _) = assets::default_fr_paths()?;
        Ok((weights, fr))
    })
}

/// When no U-Net is named (no flag, nothing restored), puts the built-in default model's
/// files into the Model panel (the FR field too, when empty). Returns whether it did; a
/// failure to prepare them becomes an error message.
pub fn use_builtin_default(
    app: &mut StudioApp,
    builtin: Option<&anyhow::Result<(WeightPaths, PathBuf)>>,
) -> bool {
    let m = &mut app.state.model;
    if !m.unet.trim().is_empty() {
        return false;
    }
    match builtin {
        None => false,
        Some(Ok((w, fr))) => {
            let text = |p: &std::path::Path| p.display().to_string();
            m.unet = text(&w.unet);
            m.unet_config = w.unet_config.as_deref().map(text).unwrap_or_default();
            m.decoder = text(&w.decoder);
            m.decoder_config = w.decoder_config.as_deref().map(text).unwrap_or_default();
            if m.fr_model.trim().is_empty() {
                m.fr_model = text(fr);
            }
            app.state.notice = Some("loading the built-in default model (ProcFace)".into());
            true
        }
        Some(Err(e)) => {
            app.state.error = Some(format!("built-in default model: {e:#}"));
            false
        }
    }
}

/// The guidance scale the studio starts with on the built-in model (without a saved
/// workspace): its unconditional branch is trained, and guidance makes its identities far
/// more consistent (`assets/MODEL_CARD.md`, metrics). `--guidance` overrides it.
pub const BUILTIN_GUIDANCE: f64 = 3.0;

/// The DDIM step count the studio starts with on the built-in model (without a saved
/// workspace): the model card's setting — at 5 steps its identities score higher than at 10
/// or 25 and look the same, in a fifth of DDIM-25's time. `--steps` overrides it.
pub const BUILTIN_STEPS: usize = 5;

/// How many ProcFace identities to start with: `--procface-identities N`, else 8 when the
/// studio opens on the built-in model with no `--identities`.
pub fn procface_start_count(opts: &StudioArgs, builtin: bool) -> Option<usize> {
    match (
        opts.procface_identities,
        builtin && opts.identities.is_none(),
    ) {
        (Some(n), _) => Some(n),
        (None, true) => Some(8),
        (None, false) => None,
    }
}

/// Puts the Identities panel on its ProcFace source with `n` identities from index 0 and
/// applies it, as its Apply button does: the contexts are computed on a background thread
/// and arrive as an event (an automatic run waits for them).
pub fn start_procface_identities(app: &mut StudioApp, n: usize) {
    let f = &mut app.state.identity_form;
    f.kind = super::forms::IdentitySourceKind::Procface;
    f.first = 0;
    f.count = n;
    app.apply_identity_form();
}

/// Puts the command-line choices into the state.
pub fn apply_flags(app: &mut StudioApp, o: &StudioArgs) {
    let s = &mut app.state;
    if let Some(p) = &o.session {
        s.session_path = p.display().to_string();
        s.open_session_now();
    }
    let text = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    if let Some(p) = text(&o.unet) {
        s.model.unet = p;
    }
    if let Some(p) = text(&o.config) {
        s.model.unet_config = p;
    }
    if let Some(p) = text(&o.decoder) {
        s.model.decoder = p;
    }
    if let Some(p) = text(&o.decoder_config) {
        s.model.decoder_config = p;
    }
    if let Some(n) = o.identities {
        s.identity_form.count = n;
        s.identities = crate::worker::identities::random_identities(
            s.identity_form.seed,
            s.identity_form.first,
            n,
            s.context_dim(),
        )
        .unwrap_or_default();
    }
    if let Some(n) = o.per_identity {
        s.sampling.per_identity = n;
    }
    if let Some(n) = o.steps {
        s.sampling.steps = n;
    }
    if let Some(g) = o.guidance {
        s.sampling.guidance = g;
    }
    if let Some(seed) = o.seed {
        s.sampling.seed = seed;
    }
    if o.ddpm {
        s.sampling.sampler = SamplerChoice::Ddpm;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Off,
    Load,
    WaitLoad,
    WaitRun,
    Settle(u32),
    Done,
}

/// The studio plus the automatic load-and-run of the launch flags.
struct Launched {
    app: StudioApp,
    opts: StudioArgs,
    stage: Stage,
    running_frames: FrameStats,
}

impl Launched {
    fn new(app: StudioApp, opts: StudioArgs) -> Self {
        let stage = if opts.run { Stage::Load } else { Stage::Off };
        Self {
            app,
            opts,
            stage,
            running_frames: FrameStats::with_capacity(100_000),
        }
    }

    fn advance(&mut self, ctx: &egui::Context) {
        let s = &mut self.app.state;
        self.stage = match self.stage {
            Stage::Load => {
                s.load_model(&self.app.worker);
                Stage::WaitLoad
            }
            Stage::WaitLoad if s.is_idle() && !s.contexts_loading => {
                if s.model_info().is_some() {
                    s.run(&self.app.worker);
                    Stage::WaitRun
                } else {
                    Stage::Settle(20)
                }
            }
            Stage::WaitRun if s.is_idle() => Stage::Settle(20),
            Stage::Settle(0) => {
                self.finish(ctx);
                Stage::Done
            }
            Stage::Settle(n) => Stage::Settle(n - 1),
            other => other,
        };
        if matches!(self.stage, Stage::Settle(_)) {
            ctx.request_repaint_after(Duration::from_millis(30));
        }
    }

    fn finish(&mut self, ctx: &egui::Context) {
        let r = &self.running_frames;
        if let (Some(p50), Some(p99)) = (r.quantile_ms(0.5), r.quantile_ms(0.99)) {
            println!(
                "ui frame time while sampling: p50 {p50:.2} ms, p99 {p99:.2} ms over {} frames",
                r.len()
            );
        }
        if let Some(f) = &self.opts.ready_file {
            let status = crate::app::views::status_bar::status_text(&self.app.state, true).1;
            let _ = std::fs::write(f, format!("{status}\n"));
        }
        if self.opts.exit_when_done {
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }
}

impl eframe::App for Launched {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let running = self.app.state.is_running();
        let start = std::time::Instant::now();
        eframe::App::ui(&mut self.app, ui, frame);
        if running {
            self.running_frames.record(start.elapsed());
        }
        if self.stage != Stage::Off {
            self.advance(ui.ctx());
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        if !self.opts.fresh {
            self.app.save(storage);
        }
    }

    fn auto_save_interval(&self) -> Duration {
        self.app.auto_save_interval()
    }

    fn on_exit(&mut self) {
        self.app.on_exit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::forms::IdentitySourceKind;

    /// The studio starts on ProcFace identities only with the built-in model (and no
    /// `--identities`), or when asked to; they arrive from the background like the panel's.
    #[test]
    fn procface_identities_at_start() {
        let none = StudioArgs::default();
        assert_eq!(procface_start_count(&none, false), None);
        let random = StudioArgs {
            identities: Some(3),
            ..Default::default()
        };
        assert_eq!(procface_start_count(&random, true), None);
        assert_eq!(procface_start_count(&none, true), Some(8));
        let asked = StudioArgs {
            procface_identities: Some(2),
            ..Default::default()
        };
        assert_eq!(procface_start_count(&asked, false), Some(2));
        let mut app = StudioApp::new();
        start_procface_identities(&mut app, 2);
        assert!(app.state.contexts_loading);
        let start = std::time::Instant::now();
        while app.state.contexts_loading {
            assert!(start.elapsed().as_secs() < 60, "no ProcFace identities");
            std::thread::sleep(std::time::Duration::from_millis(5));
            app.pump_events();
        }
        let s = &app.state;
        assert_eq!(s.identity_form.kind, IdentitySourceKind::Procface);
        assert_eq!(s.identities.len(), 2);
        let rows = crate::default_model::eval::builtin_procface_contexts(0, 2).unwrap();
        assert_eq!(
            *s.identities[1].context, rows[1],
            "same identity, same context"
        );
    }
}
