//! The worker thread's loop: one command at a time, panics turned into error events.

use super::job::{run_job, JobOutcome};
use super::model::load_pipeline;
use super::protocol::{Command, Event};
use super::EventSender;
use crate::errors::one_line;
use crate::pipeline::Pipeline;
use crossbeam_channel::Receiver;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// Runs commands until `Shutdown` or until the UI drops its command sender.
pub(super) fn run(commands: Receiver<Command>, events: EventSender) {
    crate::pipeline::enable_flush_to_zero();
    let mut pipeline: Option<Pipeline> = None;
    for command in commands {
        if matches!(command, Command::Shutdown) {
            break;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| handle(&mut pipeline, command, &events)));
        if let Err(payload) = outcome {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            events.send(Event::Error(format!(
                "internal error in the worker (it keeps running): {}",
                one_line(&msg)
            )));
        }
    }
}

/// Runs one command and sends its terminal event.
fn handle(pipeline: &mut Option<Pipeline>, command: Command, events: &EventSender) {
    match command {
        Command::LoadModel(req) => match load_pipeline(&req) {
            Ok((p, info)) => {
                *pipeline = Some(p);
                events.send(Event::ModelLoaded(info));
            }
            Err(e) => events.send(Event::Error(one_line(&e))),
        },
        Command::Run(job) => {
            let Some(p) = pipeline.as_ref() else {
                events.send(Event::Error(
                    "no model loaded: load a U-Net and a decoder first".into(),
                ));
                return;
            };
            let start = Instant::now();
            match run_job(p, &job, &mut |e| events.send(e)) {
                Ok(JobOutcome::Finished) => events.send(Event::JobFinished {
                    job: job.id,
                    seconds: start.elapsed().as_secs_f64(),
                }),
                Ok(JobOutcome::Cancelled { images_done }) => events.send(Event::Cancelled {
                    job: job.id,
                    images_done,
                }),
                Err(e) => events.send(Event::Error(one_line(&e))),
            }
        }
        Command::Analyze(req) => super::analyze::run(&req, events),
        Command::Train(req) => super::train::spawn(req, events.clone()),
        Command::Panic => panic!("panic requested by a test"),
        Command::Shutdown => {}
    }
}
