//! InsightFace 10-fold face-verification protocol (LFW / AgeDB-30 / CFP-FP style).
//!
//! - Embeddings are L2-normalised row by row (`x / ||x||`, zero rows left as is).
//! - Pair `k` is rows `2k` and `2k+1`; its distance is the squared L2 distance,
//!   summed in numpy's order.
//! - Thresholds are `np.arange(0, 4, 0.01)`, i.e. `i * 0.01` for `i in 0..400`.
//! - Pairs are split into 10 contiguous folds like sklearn `KFold(10, shuffle=False)`
//!   (the first `n % 10` folds hold one extra pair).
//! - A pair is predicted "same" when `dist < threshold` (`np.less`). Per fold the
//!   threshold is the first one maximising accuracy on the other nine folds; the fold's
//!   accuracy is measured on its own pairs at that threshold.
//! - The result is the mean and population std of the ten test accuracies.

use std::ops::Range;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::metrics::{mean_std, numpy_sum};

/// Number of folds of the protocol.
pub const N_FOLDS: usize = 10;

/// Outcome of the 10-fold verification protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerificationResult {
    /// Mean test-fold accuracy.
    pub accuracy_mean: f64,
    /// Population standard deviation of the test-fold accuracies.
    pub accuracy_std: f64,
    /// Threshold chosen on the training folds, per test fold.
    pub best_thresholds: Vec<f64>,
}

/// Runs the protocol on `2N × dim` row-major f64 embeddings and `N` pair labels.
///
/// # Errors
/// When the shapes disagree, there are fewer than 10 pairs, or a value is not finite.
pub fn verify(embeddings: &[f64], dim: usize, issame: &[bool]) -> Result<VerificationResult> {
    check_shapes(embeddings.len(), dim, issame.len())?;
    if let Some(i) = embeddings.iter().position(|v| !v.is_finite()) {
        bail!("embedding value #{i} is not finite ({})", embeddings[i]);
    }
    let dist = pair_distances(embeddings, dim);
    evaluate_distances(&dist, issame)
}

/// [`verify`] for f32 embeddings (widened to f64 before normalising).
///
/// # Errors
/// As [`verify`].
pub fn verify_f32(embeddings: &[f32], dim: usize, issame: &[bool]) -> Result<VerificationResult> {
    let wide: Vec<f64> = embeddings.iter().map(|&v| f64::from(v)).collect();
    verify(&wide, dim, issame)
}

fn check_shapes(len: usize, dim: usize, n_pairs: usize) -> Result<()> {
    if dim == 0 {
        bail!("embedding dimension must be positive");
    }
    if !len.is_multiple_of(dim) {
        bail!("{len} embedding values are not a whole number of {dim}-d rows");
    }
    let rows = len / dim;
    if rows != 2 * n_pairs {
        bail!("{rows} embeddings do not match {n_pairs} pair labels (need 2 per pair)");
    }
    if n_pairs < N_FOLDS {
        bail!("{n_pairs} pairs are too few for {N_FOLDS}-fold verification");
    }
    Ok(())
}

/// The protocol's thresholds: `np.arange(0.0, 4.0, 0.01)` bit for bit.
pub fn thresholds() -> Vec<f64> {
    arange(0.0, 4.0, 0.01)
}

/// numpy's `arange` for f64: `ceil((stop - start) / step)` values `start + i * step`
/// (empty when that count is not a positive finite number).
pub fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 || len.is_infinite() {
        return Vec::new();
    }
    (0..len as usize).map(|i| start + i as f64 * step).collect()
}

/// Contiguous fold ranges of `n` items, like sklearn `KFold(k, shuffle=False)`.
pub fn kfold_ranges(n: usize, k: usize) -> Vec<Range<usize>> {
    let mut start = 0;
    (0..k)
        .map(|f| {
            let len = n / k + usize::from(f < n % k);
            start += len;
            start - len..start
        })
        .collect()
}

/// Squared L2 distance of each normalised pair `(2k, 2k+1)` of `2N × dim` rows.
pub fn pair_distances(embeddings: &[f64], dim: usize) -> Vec<f64> {
    embeddings
        .chunks_exact(2 * dim)
        .map(|pair| {
            let a = normalised(&pair[..dim]);
            let b = normalised(&pair[dim..]);
            numpy_sum(dim, |j| {
                let d = a[j] - b[j];
                d * d
            })
        })
        .collect()
}

fn normalised(row: &[f64]) -> Vec<f64> {
    let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
    // sklearn's `normalize` leaves zero rows unchanged.
    let norm = if norm == 0.0 { 1.0 } else { norm };
    row.iter().map(|v| v / norm).collect()
}

/// The 10-fold protocol on precomputed pair distances.
///
/// # Errors
/// When the lengths differ or there are fewer than 10 pairs.
pub fn evaluate_distances(dist: &[f64], issame: &[bool]) -> Result<VerificationResult> {
    if dist.len() != issame.len() {
        bail!("{} distances but {} pair labels", dist.len(), issame.len());
    }
    if dist.len() < N_FOLDS {
        bail!(
            "{} pairs are too few for {N_FOLDS}-fold verification",
            dist.len()
        );
    }
    let thresholds = thresholds();
    let folds = kfold_ranges(dist.len(), N_FOLDS);
    let mut accuracies = Vec::with_capacity(N_FOLDS);
    let mut best_thresholds = Vec::with_capacity(N_FOLDS);
    for test in &folds {
        let best = best_train_threshold(dist, issame, test, &thresholds);
        let correct = count_correct(&dist[test.clone()], &issame[test.clone()], best);
        accuracies.push(correct as f64 / test.len() as f64);
        best_thresholds.push(best);
    }
    let (accuracy_mean, accuracy_std) = mean_std(&accuracies);
    Ok(VerificationResult {
        accuracy_mean,
        accuracy_std,
        best_thresholds,
    })
}

/// First threshold maximising the number of correct predictions outside `test`
/// (all training folds have the same size, so counts order like accuracies).
fn best_train_threshold(dist: &[f64], issame: &[bool], test: &Range<usize>, thr: &[f64]) -> f64 {
    let (mut best, mut best_correct) = (thr[0], None);
    for &t in thr {
        let correct = count_correct(&dist[..test.start], &issame[..test.start], t)
            + count_correct(&dist[test.end..], &issame[test.end..], t);
        if best_correct.is_none_or(|b| correct > b) {
            best = t;
            best_correct = Some(correct);
        }
    }
    best
}

fn count_correct(dist: &[f64], issame: &[bool], threshold: f64) -> usize {
    dist.iter()
        .zip(issame)
        .filter(|&(&d, &same)| (d < threshold) == same)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};

    #[test]
    fn fixture_parity() {
        let Some(data) = crate::testutil::fixture("verif_dev_verification.safetensors") else {
            return;
        };
        let Some(expected) = crate::testutil::fixture("verif_dev_verification_expected.json")
        else {
            return;
        };
        let bytes = std::fs::read(data).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let emb = st.tensor("embeddings").unwrap();
        assert_eq!(
            (emb.dtype(), emb.shape()),
            (Dtype::F64, &[1200usize, 64][..])
        );
        let emb: Vec<f64> = emb
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let issame = st.tensor("issame").unwrap();
        assert_eq!(issame.dtype(), Dtype::U8);
        let issame: Vec<bool> = issame.data().iter().map(|&b| b != 0).collect();
        let want: VerificationResult =
            serde_json::from_str(&std::fs::read_to_string(expected).unwrap()).unwrap();
        let got = verify(&emb, 64, &issame).unwrap();
        assert!(
            (got.accuracy_mean - want.accuracy_mean).abs() <= 1e-12,
            "{got:?}"
        );
        assert!(
            (got.accuracy_std - want.accuracy_std).abs() <= 1e-12,
            "{got:?}"
        );
        assert_eq!(got.best_thresholds.len(), N_FOLDS);
        for (g, w) in got.best_thresholds.iter().zip(&want.best_thresholds) {
            assert!((g - w).abs() <= 1e-12, "{got:?}");
        }
    }

    #[test]
    fn arange_matches_numpy_values() {
        let t = thresholds();
        assert_eq!(t.len(), 400);
        assert_eq!(t[0], 0.0);
        assert_eq!(t[140], 1.4000000000000001); // 140 * 0.01, not 1.4
        assert_eq!(t[136], 1.36);
        assert_eq!(t[399], 3.99);
        assert!(arange(1.0, 0.0, 0.5).is_empty());
    }

    #[test]
    fn kfold_puts_extra_items_first() {
        let f = kfold_ranges(23, 10);
        assert_eq!(f[0], 0..3);
        assert_eq!(f[2], 6..9);
        assert_eq!(f[3], 9..11);
        assert_eq!(f[9], 21..23);
    }

    #[test]
    fn distances_use_normalised_rows() {
        // (3,4) vs (6,8) normalise to the same point; (1,0) vs (0,2) are orthogonal.
        let emb = [3.0, 4.0, 6.0, 8.0, 1.0, 0.0, 0.0, 2.0];
        assert_eq!(pair_distances(&emb, 2), vec![0.0, 2.0]);
    }

    #[test]
    fn prediction_is_strictly_less_than_threshold() {
        // Ten identical "same" pairs (dist 0) and ten "different" pairs (dist 2).
        let dist: Vec<f64> = (0..20)
            .map(|k| if k % 2 == 0 { 0.0 } else { 2.0 })
            .collect();
        let issame: Vec<bool> = (0..20).map(|k| k % 2 == 0).collect();
        let r = evaluate_distances(&dist, &issame).unwrap();
        // At t = 0, `0 < 0` is false, so the first perfect threshold is 0.01.
        assert_eq!(r.best_thresholds, vec![0.01; 10]);
        assert_eq!((r.accuracy_mean, r.accuracy_std), (1.0, 0.0));
    }

    #[test]
    fn per_fold_threshold_and_accuracy() {
        // 10 pairs, one per fold. Same pairs at distance 1.0, different at 1.5, except
        // pair 9 ("same") at 3.0: its training folds choose 1.01, and it is then wrong.
        let mut dist = vec![1.0, 1.5, 1.0, 1.5, 1.0, 1.5, 1.0, 1.5, 1.0, 3.0];
        let issame = [
            true, false, true, false, true, false, true, false, true, true,
        ];
        let r = evaluate_distances(&dist, &issame).unwrap();
        assert_eq!(r.best_thresholds, vec![1.01; 10]);
        assert_eq!(r.accuracy_mean, 0.9);
        assert!((r.accuracy_std - 0.3).abs() < 1e-15);
        dist[9] = 0.5;
        assert_eq!(
            evaluate_distances(&dist, &issame).unwrap().accuracy_mean,
            1.0
        );
        assert!(evaluate_distances(&dist, &issame[..9]).is_err());
    }

    #[test]
    fn rejects_bad_shapes_and_values() {
        let issame = vec![true; 10];
        assert!(verify(&[0.0; 40], 2, &issame).is_ok());
        let e = verify(&[0.0; 36], 2, &issame).unwrap_err().to_string();
        assert!(
            e.contains("18 embeddings") && e.contains("10 pair labels"),
            "{e}"
        );
        assert!(verify(&[0.0; 41], 2, &issame).is_err());
        assert!(verify(&[0.0; 40], 0, &issame).is_err());
        assert!(verify(&[0.0; 8], 2, &[true; 2])
            .unwrap_err()
            .to_string()
            .contains("too few"));
        let mut emb = vec![1.0; 40];
        emb[7] = f64::NAN;
        assert!(verify(&emb, 2, &issame)
            .unwrap_err()
            .to_string()
            .contains("#7"));
    }

    #[test]
    fn f32_helper_agrees_with_f64() {
        let emb32: Vec<f32> = (0..80).map(|k| ((k * 37 % 11) as f32) - 5.0).collect();
        let emb64: Vec<f64> = emb32.iter().map(|&v| f64::from(v)).collect();
        let issame: Vec<bool> = (0..10).map(|k| k % 3 == 0).collect();
        assert_eq!(
            verify_f32(&emb32, 4, &issame).unwrap(),
            verify(&emb64, 4, &issame).unwrap()
        );
    }
}
