//! Running a sampling job on the worker thread: batching, progress, live preview, cancel.

use super::guard::on_ui_thread;
use super::protocol::{Event, Job, JobCell, Progress};
use crate::diffusion::sampler::{Sampler, StepProgress};
use crate::pipeline::Pipeline;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How a job ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    /// Every image was made.
    Finished,
    /// The cancel flag stopped it; `images_done` images had been sent.
    Cancelled {
        /// Images finished before the stop.
        images_done: usize,
    },
}

/// Splits a job's cells into batches of at most `batch_size` cells that share settings,
/// keeping the cells' order within each settings group.
pub fn plan_batches(job: &Job) -> Vec<Vec<JobCell>> {
    let size = job.batch_size.max(1);
    let mut order: Vec<usize> = Vec::new();
    for c in &job.cells {
        if !order.contains(&c.settings) {
            order.push(c.settings);
        }
    }
    order
        .into_iter()
        .flat_map(|s| {
            let group: Vec<JobCell> = job
                .cells
                .iter()
                .filter(|c| c.settings == s)
                .copied()
                .collect();
            group
                .chunks(size)
                .map(<[JobCell]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Runs `job` with `pipeline`, sending `JobStarted`, `Progress`, `Preview`, `ImageReady` and
/// `IdentityFinished` events. The terminal event is left to the caller.
///
/// `job.cancel` is polled after every denoising step. Never call this on the UI thread (checked
/// in debug builds).
pub fn run_job(pipeline: &Pipeline, job: &Job, send: &mut dyn FnMut(Event)) -> Result<JobOutcome> {
    debug_assert!(!on_ui_thread(), "sampling on the UI thread");
    let cancel: &AtomicBool = &job.cancel;
    for s in &job.settings {
        s.validate()?;
    }
    for c in &job.cells {
        anyhow::ensure!(
            c.row < job.contexts.len() && c.settings < job.settings.len(),
            "job cell ({}, {}) refers to a missing identity or settings",
            c.row,
            c.col
        );
    }
    let batches = plan_batches(job);
    let sampler = Sampler::new(&pipeline.unet, &pipeline.schedule);
    let steps_of = |b: &[JobCell]| sampler.timesteps(job.settings[b[0].settings].sampler).len();
    let steps_total: usize = batches.iter().map(|b| steps_of(b)).sum();
    let images_total = job.cells.len();
    send(Event::JobStarted {
        job: job.id,
        images: images_total,
        batches: batches.len(),
    });

    let mut left_in_row = vec![0usize; job.contexts.len()];
    for c in &job.cells {
        left_in_row[c.row] += 1;
    }
    let start = Instant::now();
    let mut steps_before = 0usize;
    let mut images_done = 0usize;
    for batch in &batches {
        if cancel.load(Ordering::Relaxed) {
            return Ok(JobOutcome::Cancelled { images_done });
        }
        let contexts: Vec<Vec<f32>> = batch.iter().map(|c| job.contexts[c.row].to_vec()).collect();
        let keys: Vec<_> = batch.iter().map(|c| c.key).collect();
        let settings = &job.settings[batch[0].settings];
        let mut preview_error = None;
        let mut on_step = |p: &StepProgress| -> bool {
            let eq_images =
                images_done as f64 + batch.len() as f64 * p.done as f64 / p.total as f64;
            let elapsed = start.elapsed().as_secs_f64().max(1e-9);
            let rate = eq_images / elapsed;
            let eta = if rate > 0.0 {
                (images_total as f64 - eq_images).max(0.0) / rate
            } else {
                f64::INFINITY
            };
            send(Event::Progress(Progress {
                job: job.id,
                steps_done: steps_before + p.done,
                steps_total,
                batch_step: p.done,
                batch_steps: p.total,
                images_done,
                images_total,
                images_per_second: rate,
                eta_seconds: eta,
            }));
            let cancelled = cancel.load(Ordering::Relaxed);
            if !cancelled
                && job.preview_every > 0
                && p.done.is_multiple_of(job.preview_every)
                && p.done < p.total
            {
                match pipeline.decode(p.x0) {
                    Ok(images) => send(Event::Preview {
                        job: job.id,
                        step: p.done,
                        steps: p.total,
                        images: batch
                            .iter()
                            .zip(images)
                            .map(|(c, im)| (c.row, c.col, Arc::new(im)))
                            .collect(),
                    }),
                    Err(e) => {
                        preview_error = Some(e);
                        return false;
                    }
                }
            }
            !cancelled
        };
        let out = pipeline.generate_batch(&contexts, &keys, settings, &mut on_step)?;
        if let Some(e) = preview_error {
            return Err(e.context("live preview decode"));
        }
        let Some(images) = out else {
            return Ok(JobOutcome::Cancelled { images_done });
        };
        steps_before += steps_of(batch);
        for (c, im) in batch.iter().zip(images) {
            images_done += 1;
            send(Event::ImageReady {
                job: job.id,
                identity: c.row,
                sample: c.col,
                image: Arc::new(im),
            });
            left_in_row[c.row] -= 1;
            if left_in_row[c.row] == 0 {
                send(Event::IdentityFinished {
                    job: job.id,
                    identity: c.row,
                });
            }
        }
    }
    Ok(JobOutcome::Finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::rng::ImageKey;
    use crate::diffusion::sampler::SamplingSettings;
    use crate::worker::protocol::JobKind;

    fn job(cells: Vec<JobCell>, batch_size: usize) -> Job {
        Job {
            id: 1,
            kind: JobKind::Sweep,
            contexts: (0..3).map(|_| Arc::new(vec![0.0; 4])).collect(),
            settings: vec![SamplingSettings::default(); 3],
            cells,
            batch_size,
            preview_every: 0,
            cancel: Arc::default(),
        }
    }

    fn cell(row: usize, col: usize, settings: usize) -> JobCell {
        JobCell {
            row,
            col,
            key: ImageKey {
                identity: row as u64,
                sample: 0,
            },
            settings,
        }
    }

    #[test]
    fn batches_share_settings_and_respect_the_size() {
        let cells = vec![
            cell(0, 0, 0),
            cell(0, 1, 1),
            cell(1, 0, 0),
            cell(1, 1, 1),
            cell(2, 0, 0),
        ];
        let b = plan_batches(&job(cells, 2));
        let shape: Vec<Vec<(usize, usize)>> = b
            .iter()
            .map(|b| b.iter().map(|c| (c.row, c.settings)).collect())
            .collect();
        assert_eq!(
            shape,
            vec![vec![(0, 0), (1, 0)], vec![(2, 0)], vec![(0, 1), (1, 1)]]
        );
        assert_eq!(plan_batches(&job(vec![cell(0, 0, 0)], 0)).len(), 1);
    }
}
