//! Face-recognition training for the studio's Train tab. [`Command::Train`](super::Command)
//! hands a [`TrainRequest`] to the worker, which starts it on its own thread ([`spawn`]) so
//! sampling and analysis stay usable while a model trains. Two kinds of run:
//!
//! - **built-in**: [`crate::train::run::train_on`] on an ImageFolder/RecordIO path or on
//!   ProcFace faces rendered on the fly, its [`TrainEvent`]s forwarded as
//!   [`Event::TrainProgress`]; Stop sets the cancel flag, the run checkpoints and can resume;
//! - **external**: a user-given command template (`{dataset}`, `{output}` substituted) run
//!   through the shell as a child process in its own process group, its stdout/stderr lines
//!   streamed as [`Event::TrainLog`]; Stop terminates the whole group.
//!
//! Either way the run ends with one [`Event::TrainFinished`]; errors and panics become its
//! message.

use super::protocol::Event;
use super::EventSender;
use crate::errors::one_line;
use crate::train::config::TrainConfig;
use crate::train::data::{open_source, ImageSource, InMemorySource, ProcFaceSource};
use crate::train::eval::ValidationSet;
use crate::train::run::{train_on, TrainEvent, TrainSummary};
use anyhow::{anyhow, bail, Context, Result};
use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest log line kept (longer lines are cut).
const MAX_LINE: usize = 4000;

/// Seconds between SIGTERM and SIGKILL when an external trainer is stopped.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// ProcFace faces rendered on the fly as training data (identity seeds from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcFaceData {
    /// Identities (classes).
    pub identities: usize,
    /// Images per identity.
    pub per_identity: usize,
}

/// What a Train-tab run does.
#[derive(Debug, Clone)]
pub enum TrainJob {
    /// The built-in candle trainer.
    BuiltIn {
        /// The run (its `data` is opened unless `procface` is set; `val` is read as a `.bin`).
        config: Box<TrainConfig>,
        /// Train on ProcFace faces instead of `config.data`.
        procface: Option<ProcFaceData>,
        /// Validate on this many held-out ProcFace identities (6 images, 6 pairs each)
        /// when `config.val` is not set.
        procface_val: Option<usize>,
    },
    /// An external trainer run as a child process.
    External {
        /// Command template with `{dataset}` and `{output}` placeholders.
        template: String,
        /// Replaces `{dataset}`.
        dataset: String,
        /// Replaces `{output}`; created before the command starts.
        output: PathBuf,
    },
}

/// A training request.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// Request id, echoed in the events.
    pub id: u64,
    /// The run.
    pub job: TrainJob,
    /// Set by the UI to stop: the built-in trainer checkpoints and returns, an external
    /// trainer is terminated.
    pub cancel: Arc<AtomicBool>,
}

/// How an external trainer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalExit {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// True when Stop ended it.
    pub stopped: bool,
}

impl ExternalExit {
    /// True when it exited with code 0 on its own.
    pub fn success(&self) -> bool {
        !self.stopped && self.code == Some(0)
    }
}

/// How a training run ended (when it did not fail).
#[derive(Debug, Clone)]
pub enum TrainOutcome {
    /// The built-in trainer returned (`completed` is false after Stop).
    BuiltIn(TrainSummary),
    /// The external command exited.
    External(ExternalExit),
}

/// Which stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of an external trainer's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its stream.
    pub stream: LogStream,
    /// The text (lossy UTF-8, without the line end).
    pub text: String,
}

/// Starts `req` on a new thread; its events go to `events`, ending with
/// [`Event::TrainFinished`].
pub fn spawn(req: TrainRequest, events: EventSender) {
    let spawned = std::thread::Builder::new()
        .name(format!("idiff-train-{}", req.id))
        .spawn({
            let events = events.clone();
            let req = req.clone();
            move || run(&req, &events)
        });
    if let Err(e) = spawned {
        events.send(Event::TrainFinished {
            id: req.id,
            result: Err(format!("cannot start the training thread: {e}")),
        });
    }
}

/// Runs `req` on the calling thread and sends its events, ending with
/// [`Event::TrainFinished`] (panics are caught and reported).
pub fn run(req: &TrainRequest, events: &EventSender) {
    let id = req.id;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &req.job {
        TrainJob::BuiltIn {
            config,
            procface,
            procface_val,
        } => run_builtin(config, *procface, *procface_val, &req.cancel, &|event| {
            events.send(Event::TrainProgress { id, event })
        })
        .map(TrainOutcome::BuiltIn),
        TrainJob::External {
            template,
            dataset,
            output,
        } => {
            let command = substitute(template, dataset, &output.display().to_string());
            (|| {
                std::fs::create_dir_all(output)
                    .with_context(|| format!("cannot create {}", output.display()))?;
                events.send(Event::TrainLog {
                    id,
                    line: LogLine {
                        stream: LogStream::Stdout,
                        text: format!("$ {command}"),
                    },
                });
                run_external(&command, &req.cancel, &mut |line| {
                    events.send(Event::TrainLog { id, line })
                })
            })()
            .map(TrainOutcome::External)
        }
    }));
    let result = match outcome {
        Ok(r) => r.map_err(|e| one_line(&e)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("internal error in the trainer: {msg}"))
        }
    };
    events.send(Event::TrainFinished { id, result });
}

/// The built-in trainer: opens the data and the validation set, then trains.
pub fn run_builtin(
    config: &TrainConfig,
    procface: Option<ProcFaceData>,
    procface_val: Option<usize>,
    cancel: &AtomicBool,
    on_event: &dyn Fn(TrainEvent),
) -> Result<TrainSummary> {
    config.validate()?;
    if !config.resume && has_checkpoint(&config.out) {
        bail!(
            "{} already holds a checkpoint: tick Resume to continue it, or choose another \
             output folder",
            config.out.display()
        );
    }
    let size = config.backbone.input_size as u32;
    let source: Arc<dyn ImageSource> = match procface {
        Some(p) => {
            if p.identities < 2 || p.per_identity < 1 {
                bail!("ProcFace needs at least 2 identities and 1 image per identity");
            }
            Arc::new(ProcFaceSource {
                first_identity: 0,
                identities: p.identities,
                per_identity: p.per_identity,
                size,
            })
        }
        None => {
            if config.data.as_os_str().is_empty() {
                bail!("choose a dataset (ImageFolder or RecordIO) or ProcFace");
            }
            Arc::from(open_source(&config.data)?)
        }
    };
    let val = match (&config.val, procface_val) {
        (Some(bin), _) => Some(ValidationSet::from_bin(bin)?),
        (None, Some(ids)) => Some(procface_held_out(ids, size)?),
        (None, None) => None,
    };
    train_on(config, source, val, on_event, cancel)
}

/// Verification pairs of `identities` held-out ProcFace identities (seeds from
/// [`crate::procface::seeds::HELD_OUT_FIRST_IDENTITY`], 6 images each): per identity 3 genuine pairs and 3 impostor
/// pairs against the next identity, interleaved.
pub fn procface_held_out(identities: usize, size: u32) -> Result<ValidationSet> {
    if identities < 2 {
        bail!("held-out ProcFace validation needs at least 2 identities");
    }
    let src = ProcFaceSource {
        first_identity: crate::procface::seeds::HELD_OUT_FIRST_IDENTITY,
        identities,
        per_identity: 6,
        size,
    };
    let cached = InMemorySource::cache(&src)?;
    let images = (0..cached.len())
        .map(|i| cached.image(i))
        .collect::<Result<Vec<_>>>()?;
    let (mut pairs, mut issame) = (Vec::new(), Vec::new());
    for id in 0..identities {
        let other = (id + 1) % identities;
        for k in 0..3 {
            pairs.push((id * 6 + 2 * k, id * 6 + 2 * k + 1));
            issame.push(true);
            pairs.push((id * 6 + k, other * 6 + 3 + k));
            issame.push(false);
        }
    }
    ValidationSet::from_images("procface-held-out", images, pairs, issame)
}

/// `s` as one shell word: unchanged when it only holds safe characters, else single-quoted.
pub fn shell_quote(s: &str) -> Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("'{}'", s.replace('\'', r"'\''")))
    }
}

/// The command line of `template` with `{dataset}` and `{output}` replaced by the
/// shell-quoted values.
pub fn substitute(template: &str, dataset: &str, output: &str) -> String {
    template
        .replace("{dataset}", &shell_quote(dataset))
        .replace("{output}", &shell_quote(output))
}

/// Splits a byte stream into lines at `\n` and `\r` (progress bars redraw with `\r`),
/// dropping empty lines.
fn read_lines(mut r: impl Read, stream: LogStream, tx: crossbeam_channel::Sender<LogLine>) {
    let mut buf = [0u8; 8192];
    let mut line = Vec::new();
    let flush = |line: &mut Vec<u8>| {
        if !line.is_empty() {
            let mut text = String::from_utf8_lossy(line).into_owned();
            if text.len() > MAX_LINE {
                let mut cut = MAX_LINE;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            line.clear();
            tx.send(LogLine { stream, text }).is_ok()
        } else {
            true
        }
    };
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            if b == b'\n' || b == b'\r' {
                if !flush(&mut line) {
                    return;
                }
            } else if line.len() <= MAX_LINE * 4 {
                line.push(b);
            }
        }
    }
    flush(&mut line);
}

#[cfg(unix)]
fn shell(command: &str) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new("sh");
    c.arg("-c").arg(command);
    // Its own process group, so Stop reaches everything it starts (torchrun's workers).
    c.process_group(0);
    c
}

#[cfg(not(unix))]
fn shell(command: &str) -> std::process::Command {
    let mut c = std::process::Command::new("cmd");
    c.arg("/C").arg(command);
    c
}

/// Sends `signal` (`TERM` or `KILL`) to the child's process group.
#[cfg(unix)]
fn signal_group(child: &mut Child, signal: &str) {
    let group = format!("-{}", child.id());
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &group])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !sent {
        let _ = child.kill();
    }
}

#[cfg(not(unix))]
fn signal_group(child: &mut Child, _signal: &str) {
    let _ = child.kill();
}

/// Runs `command` through the shell (`sh -c`, `cmd /C` on Windows), calling `on_line` with
/// every line of its stdout and stderr as they arrive, until it exits; when `cancel` is set
/// its process group gets SIGTERM, and SIGKILL [`KILL_GRACE`] later.
pub fn run_external(
    command: &str,
    cancel: &AtomicBool,
    on_line: &mut dyn FnMut(LogLine),
) -> Result<ExternalExit> {
    if command.trim().is_empty() {
        bail!("the external trainer command is empty");
    }
    let mut child = shell(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PYTHONUNBUFFERED", "1")
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("no stderr pipe"))?;
    for (pipe, stream) in [
        (Box::new(stdout) as Box<dyn Read + Send>, LogStream::Stdout),
        (Box::new(stderr), LogStream::Stderr),
    ] {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("idiff-train-log".into())
            .spawn(move || read_lines(pipe, stream, tx))
            .context("cannot start a log reader thread")?;
    }
    drop(tx);
    let mut terminated_at: Option<Instant> = None;
    let mut killed = false;
    let mut readers_done = false;
    let status = loop {
        if readers_done {
            std::thread::sleep(Duration::from_millis(20));
        } else {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(line) => on_line(line),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => readers_done = true,
            }
        }
        if let Some(status) = child.try_wait().context("waiting for the trainer")? {
            break status;
        }
        if cancel.load(Ordering::Relaxed) {
            match terminated_at {
                None => {
                    signal_group(&mut child, "TERM");
                    terminated_at = Some(Instant::now());
                }
                Some(t) if !killed && t.elapsed() > KILL_GRACE => {
                    signal_group(&mut child, "KILL");
                    killed = true;
                }
                Some(_) => {}
            }
        }
    };
    // The rest of its output (bounded: a detached grandchild may hold the pipes open).
    if !readers_done {
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            on_line(line);
        }
    }
    Ok(ExternalExit {
        code: status.code(),
        stopped: terminated_at.is_some(),
    })
}

/// True when `out` holds a checkpoint the built-in trainer would resume from.
pub fn has_checkpoint(out: &Path) -> bool {
    out.join("latest.json").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_substitution() {
        assert_eq!(shell_quote("/data/webface_112"), "/data/webface_112");
        assert_eq!(shell_quote("my data"), "'my data'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(
            substitute(
                "torchrun train.py --data {dataset} --output {output} # {dataset}",
                "/d/x y",
                "/o"
            ),
            "torchrun train.py --data '/d/x y' --output /o # '/d/x y'"
        );
    }

    #[test]
    fn lines_split_at_newlines_and_carriage_returns() {
        let (tx, rx) = crossbeam_channel::unbounded();
        read_lines(&b"one\r\ntwo\rthree\n\nfour"[..], LogStream::Stderr, tx);
        let got: Vec<String> = rx.iter().map(|l| l.text).collect();
        assert_eq!(got, ["one", "two", "three", "four"]);
    }

    #[cfg(unix)]
    #[test]
    fn external_trainer_streams_its_output_and_stops_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run_out");
        let command = substitute(
            "sh -c 'echo start {output}; echo warn >&2; sleep 30'",
            "/data",
            &out.display().to_string(),
        );
        let cancel = AtomicBool::new(false);
        let mut lines = Vec::new();
        let start = Instant::now();
        let exit = run_external(&command, &cancel, &mut |l| {
            lines.push(l);
            // Stop once both streams spoke (it would sleep 30 s otherwise).
            let spoke = |s: LogStream| lines.iter().any(|l| l.stream == s);
            if spoke(LogStream::Stdout) && spoke(LogStream::Stderr) {
                cancel.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
        let took = start.elapsed();
        assert!(exit.stopped && !exit.success(), "{exit:?}");
        assert!(took < Duration::from_secs(10), "stop took {took:?}");
        assert!(
            lines.contains(&LogLine {
                stream: LogStream::Stdout,
                text: format!("start {}", out.display()),
            }),
            "{lines:?}"
        );
        assert!(lines.contains(&LogLine {
            stream: LogStream::Stderr,
            text: "warn".into(),
        }));
    }

    #[cfg(unix)]
    #[test]
    fn external_trainer_exit_codes() {
        let never = AtomicBool::new(false);
        let mut lines = Vec::new();
        let ok = run_external("echo a; echo b", &never, &mut |l| lines.push(l.text)).unwrap();
        assert!(ok.success());
        assert_eq!(lines, ["a", "b"]);
        // A path with a space reaches the command as one word.
        let mut lines = Vec::new();
        let cmd = substitute("printf '%s|' {output}", "", "/tmp/a b");
        run_external(&cmd, &never, &mut |l| lines.push(l.text)).unwrap();
        assert_eq!(lines, ["/tmp/a b|"]);
        let failed = run_external("exit 3", &never, &mut |_| {}).unwrap();
        assert_eq!(
            failed,
            ExternalExit {
                code: Some(3),
                stopped: false
            }
        );
        assert!(run_external("  ", &never, &mut |_| {}).is_err());
    }

    #[test]
    fn builtin_refuses_an_existing_checkpoint_without_resume_and_bad_data() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("latest.json"), "{}").unwrap();
        let cfg = TrainConfig::new("", dir.path());
        let err = run_builtin(&cfg, None, None, &AtomicBool::new(false), &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("Resume"), "{err}");
        let cfg = TrainConfig::new("", dir.path().join("fresh"));
        let err = run_builtin(&cfg, None, None, &AtomicBool::new(false), &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("choose a dataset"), "{err}");
    }

    /// `Command::Train` through the worker: a two-step ProcFace run forwards its events
    /// and ends with one `TrainFinished`.
    #[test]
    fn worker_command_trains_and_reports() {
        use crate::train::config::BackboneSpec;
        let dir = tempfile::tempdir().unwrap();
        let mut config = TrainConfig::new("procface", dir.path().join("run"));
        config.backbone = BackboneSpec {
            layers: vec![1, 1, 1, 1],
            num_features: 16,
            dropout: 0.0,
            width: 8,
            input_size: 32,
        };
        config.epochs = 1;
        config.batch_size = 8;
        let worker = super::super::Worker::spawn();
        worker.send(super::super::Command::Train(TrainRequest {
            id: 7,
            job: TrainJob::BuiltIn {
                config: Box::new(config),
                procface: Some(ProcFaceData {
                    identities: 4,
                    per_identity: 4,
                }),
                procface_val: Some(2),
            },
            cancel: Arc::default(),
        }));
        let (mut steps, mut epochs) = (0, 0);
        let result = loop {
            match worker.recv_timeout(Duration::from_secs(120)) {
                Some(Event::TrainProgress { id: 7, event }) => match event {
                    TrainEvent::Step(_) => steps += 1,
                    TrainEvent::EpochEnd(r) => {
                        assert!(r.val.is_some());
                        epochs += 1;
                    }
                    _ => {}
                },
                Some(Event::TrainFinished { id: 7, result }) => break result,
                Some(other) => panic!("unexpected {other:?}"),
                None => panic!("no TrainFinished"),
            }
        };
        match result {
            Ok(TrainOutcome::BuiltIn(s)) => {
                assert!(s.completed);
                assert_eq!((s.steps, steps, epochs), (2, 2, 1));
            }
            other => panic!("{other:?}"),
        }
        assert!(dir.path().join("run/backbone.safetensors").is_file());
    }

    #[test]
    fn held_out_pairs_are_balanced() {
        let v = procface_held_out(3, 16).unwrap();
        assert_eq!((v.num_pairs(), v.num_images()), (18, 18));
        assert!(procface_held_out(1, 16).is_err());
    }
}
