//! Per-epoch training records and their JSON / CSV logs.

use crate::files::write_atomic;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// Verification result of one epoch on the validation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValRecord {
    /// Validation set name (file stem).
    pub name: String,
    /// Mean 10-fold accuracy.
    pub accuracy_mean: f64,
    /// Population std of the fold accuracies.
    pub accuracy_std: f64,
    /// Per-fold thresholds.
    pub best_thresholds: Vec<f64>,
}

/// Summary of one finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Optimiser steps done at the end of the epoch.
    pub step: usize,
    /// Mean training loss over the epoch's steps run in this session.
    pub mean_loss: f64,
    /// Mean training accuracy (nearest class centre) over the same steps.
    pub train_accuracy: f64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Training images per second over the epoch (data loading included).
    pub images_per_sec: f64,
    /// Validation result, when a validation set was given.
    pub val: Option<ValRecord>,
    /// Whether this epoch is the best on the validation set so far.
    pub best: bool,
}

/// Writes `metrics.json` (array of records) and `metrics.csv` in `out`, atomically.
pub fn write_metrics(out: &Path, history: &[EpochRecord]) -> Result<()> {
    write_atomic(
        &out.join("metrics.json"),
        serde_json::to_string_pretty(history)?.as_bytes(),
    )?;
    let mut csv = String::from(
        "epoch,step,mean_loss,train_accuracy,lr,images_per_sec,val_name,val_accuracy_mean,val_accuracy_std,best\n",
    );
    for r in history {
        let (name, mean, std) = match &r.val {
            Some(v) => (
                v.name.as_str(),
                v.accuracy_mean.to_string(),
                v.accuracy_std.to_string(),
            ),
            None => ("", String::new(), String::new()),
        };
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{:.2},{},{},{},{}",
            r.epoch,
            r.step,
            r.mean_loss,
            r.train_accuracy,
            r.lr,
            r.images_per_sec,
            name.replace(',', "_"),
            mean,
            std,
            r.best
        );
    }
    write_atomic(&out.join("metrics.csv"), csv.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_and_csv() {
        let dir = tempfile::tempdir().unwrap();
        let rec = EpochRecord {
            epoch: 1,
            step: 10,
            mean_loss: 2.5,
            train_accuracy: 0.25,
            lr: 0.1,
            images_per_sec: 12.345,
            val: Some(ValRecord {
                name: "lfw".into(),
                accuracy_mean: 0.9,
                accuracy_std: 0.01,
                best_thresholds: vec![1.0; 10],
            }),
            best: true,
        };
        write_metrics(dir.path(), std::slice::from_ref(&rec)).unwrap();
        let back: Vec<EpochRecord> = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("metrics.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(back, vec![rec]);
        let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
        assert_eq!(
            csv.lines().nth(1).unwrap(),
            "1,10,2.5,0.25,0.1,12.35,lfw,0.9,0.01,true"
        );
    }
}
