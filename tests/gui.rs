//! GUI tests of the studio (one binary): egui_kittest drives the real app with the wgpu
//! renderer on a software adapter, and the real worker loads the tiny fixture model.
//!
//! Snapshots live in `tests/snapshots/`; refresh them with `UPDATE_SNAPSHOTS=1 cargo test
//! --test gui`. Fixtures come from `idiff_studio::testutil::fixture` (skipped with a note
//! when absent).

use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use idiff_studio::app::forms::SamplerChoice;
use idiff_studio::app::grid::{Grid, GridSpec, RowLabel};
use idiff_studio::app::state::Outcome;
use idiff_studio::app::StudioApp;
use idiff_studio::diffusion::sampler::SamplingSettings;
use idiff_studio::testutil::fixture;
use idiff_studio::worker::Command;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The tests share 2 cores and a software GPU: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Weights {
    unet: PathBuf,
    unet_config: PathBuf,
    decoder: PathBuf,
    decoder_config: PathBuf,
}

fn weights() -> Option<Weights> {
    Some(Weights {
        unet: fixture("unet_tiny_ema_averaged_model.ckpt")?,
        unet_config: fixture("unet_tiny_config.json")?,
        decoder: fixture("vq_tiny_first_stage_decoder_state_dict.pt")?,
        decoder_config: fixture("vq_tiny_config.json")?,
    })
}

fn harness(size: [f32; 2]) -> Harness<'static, StudioApp> {
    let mut app = StudioApp::new().without_dialogs();
    app.show_timings = false;
    Harness::builder()
        .with_size(size)
        .with_max_steps(64)
        .wgpu()
        .build_ui_state(|ui, app: &mut StudioApp| app.show(ui), app)
}

/// Steps frames until `done` holds (panics after `timeout`).
fn step_until(
    h: &mut Harness<'_, StudioApp>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&StudioApp) -> bool,
) {
    let start = Instant::now();
    while !done(h.state()) {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

/// Clicks Run and waits until the job has finished with `images` images.
fn run_job(h: &mut Harness<'_, StudioApp>, images: usize) {
    h.step();
    h.get_by_label("Run").click();
    h.step();
    step_until(h, Duration::from_secs(180), "the job to finish", |a| {
        a.state.is_idle()
    });
    let st = &h.state().state;
    assert!(
        matches!(st.outcome, Some(Outcome::Finished { images: n, .. }) if n == images),
        "{:?} / {:?}",
        st.outcome,
        st.error
    );
}

fn fill_paths(h: &mut Harness<'_, StudioApp>, w: &Weights) {
    let m = &mut h.state_mut().state.model;
    m.unet = w.unet.display().to_string();
    m.unet_config = w.unet_config.display().to_string();
    m.decoder = w.decoder.display().to_string();
    m.decoder_config = w.decoder_config.display().to_string();
}

/// Loads the fixture model by clicking Load model, through the real worker.
fn load_model(h: &mut Harness<'_, StudioApp>, w: &Weights) {
    fill_paths(h, w);
    h.step();
    h.get_by_label("Load model").click();
    h.step();
    step_until(h, Duration::from_secs(120), "the model to load", |a| {
        a.state.is_idle()
    });
    assert!(
        h.state().state.model_info().is_some(),
        "load failed: {:?}",
        h.state().state.model_error
    );
}

/// Shows only file names in the path fields, so snapshots do not depend on the checkout.
fn short_paths(h: &mut Harness<'_, StudioApp>) {
    let m = &mut h.state_mut().state.model;
    for p in [
        &mut m.unet,
        &mut m.unet_config,
        &mut m.decoder,
        &mut m.decoder_config,
    ] {
        if let Some(name) = PathBuf::from(p.as_str()).file_name() {
            *p = name.to_string_lossy().into_owned();
        }
    }
}

#[test]
fn opens_without_a_model_and_explains_what_to_load() {
    let _g = serial();
    let mut h = harness([1280.0, 800.0]);
    h.run();
    h.get_by_label_contains("No model is loaded yet");
    h.get_by_label("Idle: load a model to start");
    h.get_by_label("Train").click();
    h.run();
    h.get_by_label("Train a face-recognition model");
    h.get_by_label("Start training");
}

#[test]
fn run_fills_the_grid_reject_and_zoom_with_snapshots() {
    let _g = serial();
    let Some(w) = weights() else { return };
    let mut h = harness([1280.0, 800.0]);
    h.run();
    load_model(&mut h, &w);
    short_paths(&mut h);
    h.get_by_label_contains("Load model");

    // Sliders through accesskit, like assistive technology would.
    let slider = egui::accesskit::Role::Slider;
    h.get_by_role_and_label(slider, "guidance")
        .set_value_accesskit(1.5);
    h.get_by_role_and_label(slider, "context dropout")
        .set_value_accesskit(0.1);
    h.get_by_role_and_label(slider, "steps")
        .set_value_accesskit(4.0);
    h.run();
    let s = &h.state().state.sampling;
    assert_eq!((s.guidance, s.context_dropout, s.steps), (1.5, 0.1, 4));
    {
        let app = h.state_mut();
        app.state.sampling.per_identity = 4;
        app.state.sampling.batch_size = 8;
        app.state.identity_form.count = 3;
        app.apply_identity_form();
    }
    h.step();

    h.get_by_label("Run").click();
    h.step();
    assert!(h.state().state.is_running());
    step_until(&mut h, Duration::from_secs(180), "the job to finish", |a| {
        a.state.is_idle()
    });
    let st = &h.state().state;
    assert!(
        matches!(st.outcome, Some(Outcome::Finished { images: 12, .. })),
        "{:?} / {:?}",
        st.outcome,
        st.error
    );
    let grid = st.grid.as_ref().unwrap();
    assert_eq!((grid.rows(), grid.cols(), grid.final_images()), (3, 4, 12));
    assert_eq!(grid.finished_rows.len(), 3);

    // Reject one image with a right click.
    h.get_by_label("image 0/1").click_secondary();
    h.run();
    let rejects = &h.state().state.grid.as_ref().unwrap().rejects;
    assert!(rejects.is_rejected(0, 1) && !rejects.is_rejected(0, 0));
    // Every visible thumbnail was uploaded exactly once, and reused on the next frames.
    let uploads = h.state().thumbs.uploads();
    assert_eq!(uploads, 12);
    h.run();
    assert_eq!(h.state().thumbs.uploads(), uploads);
    h.snapshot("generate_tab");

    // Click opens the zoom view of that identity.
    h.get_by_label("image 1/2").click();
    h.run();
    assert_eq!(h.state().state.zoom, Some(1));
    h.get_by_label_contains("Identity 1");
    h.snapshot("zoom_view");
    // Delete toggles the reject of the selected image; Escape goes back.
    h.key_press(egui::Key::Delete);
    h.run();
    assert!(h
        .state()
        .state
        .grid
        .as_ref()
        .unwrap()
        .rejects
        .is_rejected(1, 2));
    h.key_press(egui::Key::Escape);
    h.run();
    assert_eq!(h.state().state.zoom, None);
    // Arrow keys move the selection.
    h.key_press(egui::Key::ArrowDown);
    h.run();
    assert_eq!(h.state().state.selection, Some((2, 2)));
}

#[test]
fn cancel_stops_a_long_ddpm_job_and_a_new_job_can_start() {
    let _g = serial();
    let Some(w) = weights() else { return };
    let mut h = harness([1280.0, 800.0]);
    h.run();
    load_model(&mut h, &w);
    {
        let s = &mut h.state_mut().state.sampling;
        s.sampler = SamplerChoice::Ddpm;
        s.per_identity = 1;
    }
    h.step();
    h.get_by_label("Run").click();
    step_until(&mut h, Duration::from_secs(60), "the first steps", |a| {
        a.state.progress.is_some_and(|p| p.steps_done >= 2)
    });
    let total = h.state().state.progress.unwrap().steps_total;
    assert_eq!(total, 1000, "DDPM runs every step of the schedule");
    let step_ms = {
        let t = Instant::now();
        let before = h.state().state.progress.unwrap().steps_done;
        step_until(&mut h, Duration::from_secs(60), "two more steps", |a| {
            a.state.progress.is_some_and(|p| p.steps_done >= before + 2)
        });
        let after = h.state().state.progress.unwrap().steps_done;
        t.elapsed().as_secs_f64() * 1e3 / (after - before) as f64
    };
    h.get_by_label("Cancel").click();
    let cancelled_at = Instant::now();
    step_until(&mut h, Duration::from_secs(30), "the cancel", |a| {
        a.state.is_idle()
    });
    let stop = cancelled_at.elapsed();
    assert!(stop < Duration::from_secs(10), "cancel took {stop:?}");
    assert_eq!(
        h.state().state.outcome,
        Some(Outcome::Cancelled { images: 0 })
    );
    h.get_by_label("Cancelled after 0 images");
    println!(
        "cancel of a DDPM-1000 batch: stopped {:.0} ms after the click (one step ≈ {step_ms:.0} ms)",
        stop.as_secs_f64() * 1e3
    );

    // The studio is usable again: Space starts a new (short) job.
    {
        let s = &mut h.state_mut().state.sampling;
        s.sampler = SamplerChoice::Ddim;
        s.steps = 2;
    }
    h.key_press(egui::Key::Space);
    h.step();
    assert!(h.state().state.is_running());
    step_until(&mut h, Duration::from_secs(120), "the second job", |a| {
        a.state.is_idle()
    });
    assert!(matches!(
        h.state().state.outcome,
        Some(Outcome::Finished { .. })
    ));
}

#[test]
fn worker_errors_and_panics_become_messages() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("not_a_unet.png");
    image::RgbImage::new(4, 4).save(&png).unwrap();
    let mut h = harness([1280.0, 800.0]);
    h.run();
    {
        let m = &mut h.state_mut().state.model;
        m.unet = png.display().to_string();
        m.decoder = png.display().to_string();
    }
    h.step();
    h.get_by_label("Load model").click();
    h.step();
    assert!(!h.state().state.is_idle(), "Load did not start");
    step_until(&mut h, Duration::from_secs(60), "the load error", |a| {
        a.state.is_idle()
    });
    let err = h.state().state.model_error.clone().expect("a load error");
    assert!(!err.contains('\n'));
    h.get_by_label_contains("Load failed");
    h.get_by_label("Error");

    // A panic on the worker is caught and reported; the worker keeps serving commands.
    h.state().worker.send(Command::Panic);
    step_until(&mut h, Duration::from_secs(10), "the panic report", |a| {
        a.state
            .error
            .as_deref()
            .is_some_and(|e| e.contains("internal error"))
    });
    h.get_by_label_contains("internal error in the worker");
    if let Some(w) = weights() {
        h.get_by_label("Dismiss").click();
        h.run();
        load_model(&mut h, &w);
        assert!(h.state().state.error.is_none());
    }
}

/// A synthetic grid of `rows × cols` images (few distinct pixels, shared).
fn synthetic_grid(rows: usize, cols: usize) -> Grid {
    let spec = GridSpec {
        sweep: false,
        settings: vec![SamplingSettings::default()],
        rows: (0..rows)
            .map(|i| RowLabel {
                name: format!("id {i}"),
                origin: format!("seed 0 · #{i}"),
                key: i as u64,
                reference: None,
            })
            .collect(),
        columns: (0..cols).map(|c| format!("sample {c}")).collect(),
    };
    let tiles: Vec<Arc<image::RgbImage>> = (0..16u8)
        .map(|k| {
            Arc::new(image::RgbImage::from_fn(128, 128, |x, y| {
                image::Rgb([k * 15, (x / 2) as u8, (y / 2) as u8])
            }))
        })
        .collect();
    let mut g = Grid::new(999, spec);
    for r in 0..rows {
        for c in 0..cols {
            g.put(r, c, tiles[(r * 7 + c) % tiles.len()].clone(), false);
        }
    }
    g
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Frame time of the UI thread: `ui()` plus tessellation of its output, the CPU work of a
/// real frame before the GPU submit.
fn timed_frame(h: &mut Harness<'_, StudioApp>) -> f64 {
    let t = Instant::now();
    h.step();
    let shapes = h.output().shapes.clone();
    let _ = h.ctx.tessellate(shapes, 1.0);
    t.elapsed().as_secs_f64() * 1e3
}

#[test]
fn ui_frame_time_while_sampling_and_scrolling_a_big_grid() {
    let _g = serial();
    let mut h = harness([1440.0, 900.0]);
    h.run();

    // 1,000 identities × 16 samples, scrolled with the mouse wheel.
    h.state_mut().state.grid = Some(synthetic_grid(1000, 16));
    h.run();
    let grid_pos = h.get_by_label("image 0/3").rect().center();
    h.hover_at(grid_pos);
    let mut scroll_ms = Vec::new();
    h.state_mut().frame_stats.clear();
    for _ in 0..200 {
        h.event(egui::Event::MouseWheel {
            unit: egui::MouseWheelUnit::Point,
            delta: egui::vec2(0.0, -400.0),
            phase: egui::TouchPhase::Move,
            source: egui::MouseWheelSource::Unknown,
            modifiers: egui::Modifiers::NONE,
        });
        scroll_ms.push(timed_frame(&mut h));
    }
    let far_row = h
        .query_all_by_label_contains("image ")
        .filter_map(|n| {
            let label = n.accesskit_node().label()?;
            label
                .trim_start_matches("image ")
                .split('/')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .unwrap_or(0);
    assert!(far_row > 100, "scrolling reached only row {far_row}");
    let textures = h.state().thumbs.len();
    assert!(textures < 4200, "{textures} textures held");
    let (s50, s99) = (
        percentile(&mut scroll_ms.clone(), 0.5),
        percentile(&mut scroll_ms, 0.99),
    );
    let fs = &h.state().frame_stats;
    println!(
        "scrolling 1000×16 grid: frame p50 {s50:.2} ms, p99 {s99:.2} ms; ui() alone p50 {:.2} ms, p99 {:.2} ms (down to row {far_row})",
        fs.quantile_ms(0.5).unwrap(),
        fs.quantile_ms(0.99).unwrap()
    );

    // While the worker samples.
    let Some(w) = weights() else { return };
    h.state_mut().state.grid = None;
    load_model(&mut h, &w);
    {
        let st = &mut h.state_mut().state;
        st.sampling.steps = 20;
        st.sampling.per_identity = 8;
        st.sampling.batch_size = 8;
        st.sampling.live_preview = true;
        st.sampling.preview_every = 4;
    }
    h.step();
    h.get_by_label("Run").click();
    h.step();
    h.state_mut().frame_stats.clear();
    let mut ms = Vec::new();
    let start = Instant::now();
    while h.state().state.is_running()
        && ms.len() < 400
        && start.elapsed() < Duration::from_secs(120)
    {
        ms.push(timed_frame(&mut h));
        std::thread::sleep(Duration::from_millis(8));
    }
    h.state_mut().state.cancel();
    step_until(&mut h, Duration::from_secs(60), "the job to stop", |a| {
        a.state.is_idle()
    });
    let (p50, p99) = (percentile(&mut ms.clone(), 0.5), percentile(&mut ms, 0.99));
    let fs = &h.state().frame_stats;
    println!(
        "ui frame while sampling: frame p50 {p50:.2} ms, p99 {p99:.2} ms; ui() alone p50 {:.2} ms, p99 {:.2} ms over {} frames",
        fs.quantile_ms(0.5).unwrap(),
        fs.quantile_ms(0.99).unwrap(),
        ms.len()
    );
    assert!(ms.len() >= 20, "too few frames measured");
    // Generous bound for a loaded 2-core CI machine; the goal (≤ 20 ms) is reported above.
    assert!(p99 < 250.0, "p99 frame time {p99:.1} ms");
}

/// A grid of ProcFace renders: `rows` identities × `cols` samples at 128 px.
fn procface_grid(rows: usize, cols: usize) -> Grid {
    let mut g = synthetic_grid(rows, cols);
    for r in 0..rows {
        for c in 0..cols {
            let img = idiff_studio::procface::render_sample(r as u64, c as u64, 128);
            g.put(r, c, Arc::new(img), false);
        }
    }
    g
}

#[test]
fn analyze_tab_computes_on_the_worker_with_snapshot() {
    let _g = serial();
    let Some(fr) = fixture("iresnet_tiny_backbone.pth") else {
        return;
    };
    let mut h = harness([1280.0, 860.0]);
    {
        let app = h.state_mut();
        app.state.grid = Some(procface_grid(8, 4));
        app.state.model.fr_model = fr.to_string_lossy().into_owned();
        app.state.tab = idiff_studio::app::state::Tab::Analyze;
    }
    h.run();
    h.get_by_label_contains("press Run analysis");
    h.get_by_label("Run analysis").click();
    h.step();
    assert!(
        h.state().state.analyze.running.is_some(),
        "analysis did not start"
    );
    step_until(&mut h, Duration::from_secs(240), "the analysis", |a| {
        a.state.analyze.running.is_none()
    });
    let a = &h.state().state.analyze;
    assert!(a.error.is_none(), "{:?}", a.error);
    let result = a.result.clone().expect("a result");
    assert_eq!((result.report.images, result.report.identities), (32, 8));
    assert_eq!(result.report.genuine_pairs, 8 * 6);
    assert!(result.report.metrics.is_some());
    // Show only the file name in the Model panel's FR field, then snapshot.
    h.state_mut().state.model.fr_model = "iresnet_tiny_backbone.pth".into();
    h.run();
    h.get_by_label("AUC");
    h.snapshot("analyze_tab");
    // Sort by a column, then open an identity in the grid.
    h.get_by_label("Samples").click();
    h.run();
    assert!(!h.state().state.analyze.sort.1, "ascending first");
    // "id 3" also names the row in the Identities panel; the table link comes last.
    h.query_all_by_label("id 3")
        .last()
        .expect("identity link")
        .click();
    h.run();
    assert_eq!(h.state().state.tab, idiff_studio::app::state::Tab::Generate);
    assert_eq!(h.state().state.selection, Some((3, 0)));
}

#[test]
fn export_tab_previews_counts_and_exports_the_grid() {
    use idiff_studio::dataset::export::{read_export_manifest, ExportFormat};
    use idiff_studio::dataset::recordio::RecordReader;
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dataset");
    let mut h = harness([1280.0, 860.0]);
    {
        let app = h.state_mut();
        let mut grid = procface_grid(4, 3);
        grid.rejects.toggle_identity(1);
        grid.rejects.toggle_image(2, 0);
        app.state.grid = Some(grid);
        app.state.tab = idiff_studio::app::state::Tab::Export;
        app.state.export_tab.out = out.display().to_string();
        app.state.export_tab.format = ExportFormat::RecordIo;
    }
    h.run();
    step_until(
        &mut h,
        Duration::from_secs(60),
        "the curation preview",
        |a| a.state.export_tab.preview.is_some() && a.state.export_tab.preview_running.is_none(),
    );
    let counts = h.state().state.export_tab.preview.clone().unwrap().unwrap();
    assert_eq!((counts.manual.images, counts.manual.identities), (4, 1));
    assert_eq!((counts.kept_images, counts.kept_identities), (8, 3));
    h.get_by_label("8 of 12 images and 3 of 4 identities kept");
    // Rules without embeddings are explained, not run.
    h.state_mut().state.export_tab.tau_img.on = true;
    h.run();
    step_until(&mut h, Duration::from_secs(60), "the second preview", |a| {
        a.state.export_tab.preview_running.is_none()
            && matches!(a.state.export_tab.preview, Some(Err(_)))
    });
    h.get_by_label_contains("need an embeddings file");
    h.state_mut().state.export_tab.tau_img.on = false;
    h.run();

    h.get_by_label("Export dataset").click();
    h.step();
    assert!(
        h.state().state.export_tab.running.is_some(),
        "export did not start"
    );
    step_until(&mut h, Duration::from_secs(120), "the export", |a| {
        a.state.export_tab.running.is_none()
    });
    let last = h.state().state.export_tab.last.clone();
    let summary = last.unwrap().unwrap().expect("not cancelled");
    assert_eq!((summary.images, summary.identities), (8, 3));
    h.get_by_label_contains("Exported 8 images of 3 identities");
    let reader = RecordReader::open_dir(&out).unwrap();
    assert_eq!(reader.labels().unwrap(), vec![0, 0, 0, 1, 1, 2, 2, 2]);
    let m = read_export_manifest(&out).unwrap();
    assert_eq!(m.identity_map, vec![0, 2, 3]);
    assert_eq!(m.generation.unwrap()["identities"][3]["name"], "id 3");

    // A second export to the same folder fails with a message and leaves it intact.
    h.get_by_label("Export dataset").click();
    h.step();
    step_until(&mut h, Duration::from_secs(60), "the refused export", |a| {
        a.state.export_tab.running.is_none()
    });
    h.get_by_label_contains("already exists");
    assert_eq!(RecordReader::open_dir(&out).unwrap().len(), 8);
}

/// Steps frames for `d` (the worker keeps running meanwhile).
fn step_for(h: &mut Harness<'_, StudioApp>, d: Duration) {
    let start = Instant::now();
    while start.elapsed() < d {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn train_tab_trains_plots_the_loss_stops_and_resumes() {
    use idiff_studio::app::state::Tab;
    use idiff_studio::app::views::train_tab::TrainerKind;
    use idiff_studio::worker::train::TrainOutcome;
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("faces");
    idiff_studio::procface::write_image_folder(&data, 0..4, 4, 32).unwrap();
    let out = dir.path().join("run");
    let mut h = harness([1280.0, 900.0]);
    {
        let st = &mut h.state_mut().state;
        st.tab = Tab::Train;
        let t = &mut st.train_tab;
        t.form.dataset = data.display().to_string();
        t.form.backbone = "1,1,1,1".into();
        t.form.width = 8;
        t.form.input_size = 32;
        t.form.num_features = 16;
        t.form.batch_size = 8;
        t.form.epochs = 200;
        t.form.out = out.display().to_string();
    }
    h.run();
    h.get_by_label("Start training").click();
    h.step();
    assert!(
        h.state().state.train_tab.is_running(),
        "training did not start: {:?}",
        h.state().state.train_tab.last
    );
    step_until(
        &mut h,
        Duration::from_secs(120),
        "the first loss points",
        |a| !a.state.train_tab.loss_points.is_empty(),
    );
    let first = h.state().state.train_tab.loss_points.len();
    step_until(&mut h, Duration::from_secs(60), "more loss points", |a| {
        a.state.train_tab.loss_points.len() > first
    });
    // Two epochs (two steps each) and their records.
    step_until(&mut h, Duration::from_secs(60), "two epochs", |a| {
        a.state.train_tab.epochs_done.len() >= 2
    });
    let t = &h.state().state.train_tab;
    assert!(t.loss_points.len() > first);
    assert_eq!(t.lr_points.len(), t.loss_points.len());
    assert!(t.loss_points.iter().all(|p| p[1].is_finite()));
    let info = t.info.clone().expect("Started arrived");
    assert_eq!(
        (info.num_images, info.num_classes, info.steps_per_epoch),
        (16, 4, 2)
    );
    h.get_by_label_contains("images/s · ETA");
    h.get_by_label("Stop training").click();
    h.step();
    step_until(&mut h, Duration::from_secs(60), "the stop", |a| {
        !a.state.train_tab.is_running()
    });
    let t = &h.state().state.train_tab;
    let steps = match &t.last {
        Some(Ok(TrainOutcome::BuiltIn(s))) => {
            assert!(!s.completed);
            s.steps
        }
        other => panic!("{other:?}"),
    };
    assert!((4..400).contains(&steps), "{steps}");
    println!(
        "train tab: stopped after {steps} steps ({} loss points, last {:?})",
        t.loss_points.len(),
        t.last_step.as_ref().map(|s| (s.loss, s.images_per_sec))
    );
    assert!(t.form.resume, "Start should now resume");
    assert!(out.join("latest.json").is_file(), "no checkpoint on stop");
    h.get_by_label_contains("Stopped at step");

    // Start again: the run resumes at the checkpoint and the curve continues.
    let before = h.state().state.train_tab.loss_points.len();
    h.get_by_label("Start training").click();
    h.step();
    step_until(
        &mut h,
        Duration::from_secs(120),
        "the resumed run's steps",
        |a| {
            a.state.train_tab.loss_points.len() > before
                && a.state
                    .train_tab
                    .info
                    .as_ref()
                    .is_some_and(|i| i.start_step > 0)
        },
    );
    let info = h.state().state.train_tab.info.clone().unwrap();
    assert!(info.resumed_from.is_some());
    assert_eq!(info.start_step, steps);
    h.get_by_label("Stop training").click();
    step_until(&mut h, Duration::from_secs(60), "the second stop", |a| {
        !a.state.train_tab.is_running()
    });

    // External trainer: the command's output streams into the log, Stop terminates it.
    #[cfg(unix)]
    {
        let ext_out = dir.path().join("external");
        {
            let t = &mut h.state_mut().state.train_tab;
            t.form.trainer = TrainerKind::External;
            t.form.command = "echo start {output}; sleep 30".into();
            t.form.out = ext_out.display().to_string();
        }
        h.run();
        h.get_by_label("Start training").click();
        h.step();
        let wanted = format!("start {}", ext_out.display());
        step_until(&mut h, Duration::from_secs(30), "the external log", |a| {
            a.state.train_tab.log.iter().any(|(_, l)| *l == wanted)
        });
        assert!(h.state().state.train_tab.is_running());
        step_for(&mut h, Duration::from_millis(100));
        h.get_by_label(&wanted);
        let clicked = Instant::now();
        h.get_by_label("Stop training").click();
        step_until(&mut h, Duration::from_secs(20), "the external stop", |a| {
            !a.state.train_tab.is_running()
        });
        assert!(clicked.elapsed() < Duration::from_secs(10));
        match &h.state().state.train_tab.last {
            Some(Ok(TrainOutcome::External(e))) => assert!(e.stopped, "{e:?}"),
            other => panic!("{other:?}"),
        }
        assert!(ext_out.is_dir());
        h.get_by_label("Stopped the external trainer.");
    }
}

#[test]
fn identity_from_a_face_photo_uses_the_detected_face_embedding() {
    use idiff_studio::onnx::photo::FacePipeline;
    use idiff_studio::onnx::{cached_model_file, models_dir};
    let _g = serial();
    // Skips with a note when the model cache is absent; fails under CI=true.
    let (Some(photo), Some(_), Some(_), Some(_)) = (
        cached_model_file("photos/obama.jpg"),
        cached_model_file(idiff_studio::onnx::DETECTOR_FILE),
        cached_model_file(idiff_studio::onnx::LANDMARK_FILE),
        cached_model_file(idiff_studio::onnx::FR_MODEL_FILE),
    ) else {
        return;
    };
    let mut h = harness([1280.0, 1000.0]);
    h.run();
    let before = h.state().state.identities.len();
    h.get_by_label("From a face photo").click();
    h.run();
    assert_eq!(
        h.state().state.identity_form.models_dir,
        models_dir().display().to_string(),
        "the models folder defaults to the cache"
    );
    h.state_mut().state.identity_form.photo = photo.display().to_string();
    h.run();
    h.get_by_label("Detect faces").click();
    h.step();
    assert!(
        h.state().state.photo_faces.running.is_some(),
        "detection did not start"
    );
    step_until(
        &mut h,
        Duration::from_secs(240),
        "the detected faces",
        |a| a.state.photo_faces.running.is_none(),
    );
    let p = &h.state().state.photo_faces;
    assert!(p.error.is_none(), "{:?}", p.error);
    assert_eq!(p.result.as_ref().expect("faces").1.faces.len(), 1);
    h.get_by_label_contains("1 face(s) in obama.jpg");
    h.get_by_label("Use face 0").click();
    h.run();
    let s = &h.state().state;
    assert!(s.photo_faces.error.is_none(), "{:?}", s.photo_faces.error);
    assert_eq!(s.identities.len(), before + 1);
    let id = s.identities.last().unwrap();
    assert_eq!(id.name, "obama.jpg · face 0");
    assert_eq!(id.context.len(), 512);
    let norm = id.context.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    let direct = FacePipeline::from_dir(&models_dir())
        .unwrap()
        .faces_in_file(&photo)
        .unwrap();
    assert_eq!(direct.len(), 1);
    let diff = direct[0]
        .embedding
        .iter()
        .zip(id.context.iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-5,
        "context differs from the direct embedding by {diff}"
    );
    // The panel counts the new identity.
    h.get_by_label(&format!("{} identities", before + 1));

    // Generate its variations with a model of 512-d contexts (the fixture U-Net).
    let Some(w) = weights() else { return };
    load_model(&mut h, &w);
    {
        let app = h.state_mut();
        app.state
            .identities
            .retain(|i| i.name == "obama.jpg · face 0");
        app.state.sampling.per_identity = 2;
        app.state.sampling.steps = 2;
    }
    run_job(&mut h, 2);
    let grid = h.state().state.grid.as_ref().unwrap();
    assert_eq!((grid.rows(), grid.final_images()), (1, 2));
    assert_eq!(grid.spec.rows[0].name, "obama.jpg · face 0");
}

/// With no arguments the studio opens on the built-in model: its files go into the Model
/// panel, it loads through the worker, the ProcFace source makes new identities in the
/// background, and a run fills the grid with them.
#[test]
fn built_in_model_generates_procface_identities() {
    use idiff_studio::app::forms::IdentitySourceKind;
    use idiff_studio::app::launch::{builtin_default_paths, use_builtin_default};
    let _g = serial();
    // Tall enough for the Identities panel's Apply button to be on screen.
    let mut h = harness([1280.0, 1000.0]);
    let builtin = builtin_default_paths().expect("this build embeds the default model");
    assert!(use_builtin_default(h.state_mut(), Some(&builtin)));
    h.step();
    h.get_by_label("Load model").click();
    h.step();
    step_until(&mut h, Duration::from_secs(120), "the model to load", |a| {
        a.state.is_idle()
    });
    assert!(h.state().state.model_info().is_some());
    assert_eq!(h.state().state.context_dim(), 64);

    h.get_by_label("ProcFace").click();
    h.run();
    assert_eq!(
        h.state().state.identity_form.kind,
        IdentitySourceKind::Procface
    );
    {
        let f = &mut h.state_mut().state.identity_form;
        f.count = 3;
        f.first = 2;
    }
    h.step();
    h.get_by_label("Apply").click();
    h.step();
    step_until(&mut h, Duration::from_secs(60), "the identities", |a| {
        !a.state.contexts_loading && a.state.identities.len() == 3
    });
    let st = &h.state().state;
    assert!(st.error.is_none(), "{:?}", st.error);
    let keys: Vec<u64> = st.identities.iter().map(|i| i.key).collect();
    assert_eq!(keys, vec![2, 3, 4]);
    assert_eq!(st.identities[0].name, "ProcFace 2000002");
    {
        let app = h.state_mut();
        app.state.sampling.per_identity = 2;
        app.state.sampling.steps = 4;
    }
    run_job(&mut h, 6);
    let grid = h.state().state.grid.as_ref().unwrap();
    assert_eq!((grid.rows(), grid.cols()), (3, 2));
    // Each row starts with its identity's reference render (the face its context came from).
    assert_eq!(
        grid.spec.rows[1].reference,
        Some(idiff_studio::worker::identities::Reference::Procface(3))
    );
    h.run();
    for r in 0..3 {
        h.get_by_label(&format!("reference {r}"));
    }
    // The zoom view of an identity shows its reference first.
    h.get_by_label("image 1/0").click();
    h.run();
    assert_eq!(h.state().state.zoom, Some(1));
    h.get_by_label("reference 1");
    assert!(h.query_by_label("reference 0").is_none());

    // Analysing the grid scores each identity's samples against its context.
    h.state_mut().state.tab = idiff_studio::app::state::Tab::Analyze;
    h.run();
    h.get_by_label("Run analysis").click();
    h.step();
    step_until(&mut h, Duration::from_secs(120), "the analysis", |a| {
        a.state.analyze.running.is_none()
    });
    let a = &h.state().state.analyze;
    assert!(a.error.is_none(), "{:?}", a.error);
    let report = &a.result.as_ref().expect("a result").report;
    let per: Vec<f64> = report
        .per_identity
        .iter()
        .map(|s| s.context_mean.expect("every identity has a context"))
        .collect();
    let overall = report.context_cosine.expect("context cosine");
    assert!(
        (overall - per.iter().sum::<f64>() / 3.0).abs() < 1e-9,
        "2 samples each"
    );
    assert!(per.iter().all(|c| c.abs() <= 1.0));
    h.run();
    h.get_by_label("Context cosine");
    h.get_by_label("Context sim");
}
