//! Biometric score statistics, numerically matching pyeer 0.5.x `get_eer_stats` for
//! similarity scores (higher = more similar).
//!
//! Definitions (all reproduced from pyeer's documented behaviour):
//! - Thresholds are the sorted unique values of the pooled genuine + impostor scores.
//!   At threshold `t`: FNM = #genuine with `s < t`, FM = #impostor with `s >= t`;
//!   FMR = FM / #impostor, FNMR = FNM / #genuine.
//! - EER (FVC2000): `t2` = first threshold index with `FMR - FNMR <= 0`; `t1 = t2 - 1`
//!   unless the difference there is exactly zero or `t2 == 0` (then `t1 = t2`). Of `t1`
//!   and `t2`, the one with the smaller `FMR + FNMR` (ties go to `t1`) gives
//!   `EER = (FNMR + FMR) / 2` and the EER threshold. When the curves never cross the
//!   EER is 1 and its threshold is the smallest score.
//! - FMR100 / FMR1000 / FMR0: FNMR at the first threshold whose FMR is nearest to
//!   0.01 / 0.001 / 0.
//! - AUC: `sum((FMR[k] - FMR[k+1]) * (TPR[k] + (TPR[k+1] - TPR[k]) / 2))` with
//!   `TPR = 1 - FNMR`, summed like numpy (pairwise summation).
//! - Means and population standard deviations are computed like `np.mean` / `np.std`
//!   (pairwise summation in input order), decidability
//!   `d' = |μG − μI| / sqrt((σG² + σI²) / 2)` (1 when both σ are 0, as in pyeer) and
//!   `FDR = (μG − μI)² / (σG² + σI²)` (IEEE `inf`/`NaN` when both σ are 0).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Summary statistics of a genuine / impostor similarity-score experiment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EerStats {
    /// Equal error rate (FVC2000 midpoint definition).
    pub eer: f64,
    /// Threshold at which the EER was taken.
    pub eer_threshold: f64,
    /// FNMR at the threshold whose FMR is nearest 1 %.
    pub fmr100: f64,
    /// FNMR at the threshold whose FMR is nearest 0.1 %.
    pub fmr1000: f64,
    /// FNMR at the threshold whose FMR is nearest 0.
    pub fmr0: f64,
    /// Area under the ROC curve.
    pub auc: f64,
    /// Mean genuine score.
    pub gmean: f64,
    /// Population standard deviation of the genuine scores.
    pub gstd: f64,
    /// Mean impostor score.
    pub imean: f64,
    /// Population standard deviation of the impostor scores.
    pub istd: f64,
    /// Decidability index d′.
    pub decidability: f64,
    /// Fisher discriminant ratio.
    pub fdr: f64,
}

/// FMR / FNMR at every candidate threshold, in ascending threshold order.
#[derive(Debug, Clone, PartialEq)]
pub struct RocCurve {
    /// Sorted unique scores used as thresholds.
    pub thresholds: Vec<f64>,
    /// False match rate (impostors with `s >= t`) per threshold.
    pub fmr: Vec<f64>,
    /// False non-match rate (genuines with `s < t`) per threshold.
    pub fnmr: Vec<f64>,
}

/// Computes pyeer-compatible statistics for similarity scores.
///
/// Runs in O((G + I) log(G + I)) time and O(G + I) memory.
///
/// # Errors
/// When either list is empty or contains a non-finite value.
pub fn eer_stats(genuine: &[f64], impostor: &[f64]) -> Result<EerStats> {
    check_scores("genuine", genuine)?;
    check_scores("impostor", impostor)?;
    let roc = roc_curve(genuine, impostor);
    let (eer_index, eer) = eer_point(&roc.fmr, &roc.fnmr);
    let (gmean, gstd) = mean_std(genuine);
    let (imean, istd) = mean_std(impostor);
    let mean_gap = gmean - imean;
    let var_sum = gstd * gstd + istd * istd;
    let decidability = if gstd == 0.0 && istd == 0.0 {
        1.0
    } else {
        mean_gap.abs() / (0.5 * var_sum).sqrt()
    };
    Ok(EerStats {
        eer,
        eer_threshold: roc.thresholds[eer_index],
        fmr100: fnmr_at_fmr(&roc, 0.01),
        fmr1000: fnmr_at_fmr(&roc, 0.001),
        fmr0: fnmr_at_fmr(&roc, 0.0),
        auc: roc_auc(&roc.fmr, &roc.fnmr),
        gmean,
        gstd,
        imean,
        istd,
        decidability,
        fdr: mean_gap * mean_gap / var_sum,
    })
}

fn check_scores(name: &str, scores: &[f64]) -> Result<()> {
    if scores.is_empty() {
        bail!("{name} score list is empty");
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        bail!("{name} score #{i} is not finite ({})", scores[i]);
    }
    Ok(())
}

/// Builds pyeer's ROC table from finite scores (callers must have checked them).
///
/// Thresholds are the unique pooled scores; `-0.0` and `0.0` count as equal.
pub fn roc_curve(genuine: &[f64], impostor: &[f64]) -> RocCurve {
    let g = sorted_copy(genuine);
    let i = sorted_copy(impostor);
    let (n_g, n_i) = (g.len() as f64, i.len() as f64);
    let mut roc = RocCurve {
        thresholds: Vec::new(),
        fmr: Vec::new(),
        fnmr: Vec::new(),
    };
    let (mut gi, mut ii) = (0usize, 0usize);
    while let Some(t) = next_threshold(&g, gi, &i, ii) {
        // Every consumed score is strictly below `t`.
        roc.thresholds.push(t);
        roc.fnmr.push(gi as f64 / n_g);
        roc.fmr.push((i.len() - ii) as f64 / n_i);
        while gi < g.len() && g[gi] == t {
            gi += 1;
        }
        while ii < i.len() && i[ii] == t {
            ii += 1;
        }
    }
    roc
}

fn sorted_copy(scores: &[f64]) -> Vec<f64> {
    let mut v = scores.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    // total_cmp orders -0.0 before 0.0; both are one threshold group, as in numpy.
    v
}

fn next_threshold(g: &[f64], gi: usize, i: &[f64], ii: usize) -> Option<f64> {
    match (g.get(gi), i.get(ii)) {
        (Some(&a), Some(&b)) => Some(if b < a { b } else { a }),
        (Some(&a), None) => Some(a),
        (None, Some(&b)) => Some(b),
        (None, None) => None,
    }
}

/// FVC2000 EER as pyeer computes it: `(threshold index, eer)`.
fn eer_point(fmr: &[f64], fnmr: &[f64]) -> (usize, f64) {
    let Some(t2) = (0..fmr.len()).find(|&k| fmr[k] - fnmr[k] <= 0.0) else {
        return (0, 1.0);
    };
    let t1 = if fmr[t2] - fnmr[t2] != 0.0 && t2 != 0 {
        t2 - 1
    } else {
        t2
    };
    let k = if fmr[t1] + fnmr[t1] <= fmr[t2] + fnmr[t2] {
        t1
    } else {
        t2
    };
    (k, (fnmr[k] + fmr[k]) / 2.0)
}

/// FNMR at the first threshold whose FMR is nearest `target`.
fn fnmr_at_fmr(roc: &RocCurve, target: f64) -> f64 {
    let mut best = 0;
    let mut best_gap = f64::INFINITY;
    for (k, &f) in roc.fmr.iter().enumerate() {
        let gap = (f - target).abs();
        if gap < best_gap {
            best = k;
            best_gap = gap;
        }
    }
    roc.fnmr[best]
}

/// Area under the ROC curve with pyeer's trapezoid formula and numpy summation.
pub fn roc_auc(fmr: &[f64], fnmr: &[f64]) -> f64 {
    let n = fmr.len().min(fnmr.len()).saturating_sub(1);
    numpy_sum(n, |k| {
        let (y1, y2) = (1.0 - fnmr[k], 1.0 - fnmr[k + 1]);
        (fmr[k] - fmr[k + 1]) * (y1 + (y2 - y1) / 2.0)
    })
}

/// Mean and population standard deviation, bit-compatible with `np.mean` / `np.std`.
pub fn mean_std(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = numpy_sum(x.len(), |k| x[k]) / n;
    let var = numpy_sum(x.len(), |k| {
        let d = x[k] - mean;
        d * d
    }) / n;
    (mean, var.sqrt())
}

/// Sum of `term(0) .. term(n-1)` in numpy's pairwise order (float64 `add.reduce` on a
/// contiguous array): blocks of at most 128 use 8 interleaved accumulators, longer
/// ranges split at a multiple of 8 near the middle.
pub fn numpy_sum(n: usize, term: impl Fn(usize) -> f64 + Copy) -> f64 {
    pairwise(0, n, term)
}

fn pairwise(start: usize, n: usize, term: impl Fn(usize) -> f64 + Copy) -> f64 {
    if n < 8 {
        return (start..start + n).fold(0.0, |acc, k| acc + term(k));
    }
    if n <= 128 {
        let mut r = [0.0f64; 8];
        for (j, rj) in r.iter_mut().enumerate() {
            *rj = term(start + j);
        }
        let full = n - n % 8;
        for base in (8..full).step_by(8) {
            for (j, rj) in r.iter_mut().enumerate() {
                *rj += term(start + base + j);
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for k in full..n {
            res += term(start + k);
        }
        return res;
    }
    let half = n / 2;
    let half = half - half % 8;
    pairwise(start, half, term) + pairwise(start + half, n - half, term)
}

/// Reads a pyeer score file: one score per line, the last whitespace-separated token
/// of each non-blank line (so `id_a id_b 0.73` lines work too).
///
/// # Errors
/// When the file cannot be read or a line's last token is not a number.
pub fn read_scores(path: impl AsRef<Path>) -> Result<Vec<f64>> {
    let path = path.as_ref();
    let file =
        File::open(path).with_context(|| format!("opening score file {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut scores = Vec::new();
    let mut line = String::new();
    let mut line_no = 0usize;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("reading score file {}", path.display()))?;
        if read == 0 {
            return Ok(scores);
        }
        line_no += 1;
        let Some(token) = line.split_whitespace().last() else {
            continue;
        };
        let score = token
            .parse::<f64>()
            .with_context(|| format!("{}:{line_no}: {token:?} is not a number", path.display()))?;
        scores.push(score);
    }
}

/// Writes scores one per line in a shortest round-trip decimal form that pyeer (Python
/// `float`) and [`read_scores`] parse back exactly.
///
/// # Errors
/// When the file cannot be created or written.
pub fn write_scores(path: impl AsRef<Path>, scores: &[f64]) -> Result<()> {
    let path = path.as_ref();
    let file =
        File::create(path).with_context(|| format!("creating score file {}", path.display()))?;
    let mut out = BufWriter::new(file);
    for s in scores {
        writeln!(out, "{s:?}").with_context(|| format!("writing {}", path.display()))?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors};

    fn f64_tensor(st: &SafeTensors, name: &str) -> Vec<f64> {
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn fixture_parity_all_cases() {
        let Some(scores) = crate::testutil::fixture("eer_dev_scores.safetensors") else {
            return;
        };
        let Some(expected) = crate::testutil::fixture("eer_dev_expected.json") else {
            return;
        };
        let bytes = std::fs::read(scores).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(expected).unwrap()).unwrap();
        let cases = json["cases"].as_object().unwrap();
        assert_eq!(cases.len(), 3);
        for (case, want) in cases {
            let g = f64_tensor(&st, &format!("{case}.genuine"));
            let i = f64_tensor(&st, &format!("{case}.impostor"));
            let got = serde_json::to_value(eer_stats(&g, &i).unwrap()).unwrap();
            let want = want.as_object().unwrap();
            assert_eq!(
                got.as_object().unwrap().len(),
                want.len(),
                "{case}: key set"
            );
            for (key, w) in want {
                let (g, w) = (got[key].as_f64().unwrap(), w.as_f64().unwrap());
                assert!((g - w).abs() <= 1e-9, "{case}.{key}: got {g}, want {w}");
                // The values are bit-identical to pyeer's; serde_json's default float
                // parser may miss the last bit of the expected value, hence 1 ulp.
                let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
                assert!(ulps <= 1, "{case}.{key}: {ulps} ulps from pyeer");
            }
        }
    }

    #[test]
    fn tiny_roc_table_matches_pyeer() {
        let roc = roc_curve(&[0.4, 0.8, 0.9], &[0.1, 0.4, 0.6]);
        assert_eq!(roc.thresholds, vec![0.1, 0.4, 0.6, 0.8, 0.9]);
        assert_eq!(roc.fmr, vec![1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0, 0.0]);
        assert_eq!(roc.fnmr, vec![0.0, 0.0, 1.0 / 3.0, 1.0 / 3.0, 2.0 / 3.0]);
    }

    // Expected values below were produced by pyeer 0.5.6 `get_eer_stats`.
    #[test]
    fn eer_exact_crossing_uses_that_threshold() {
        let s = eer_stats(&[0.4, 0.8, 0.9], &[0.1, 0.4, 0.6]).unwrap();
        assert_eq!((s.eer, s.eer_threshold), (1.0 / 3.0, 0.6));
        assert_eq!((s.fmr0, s.fmr100), (1.0 / 3.0, 1.0 / 3.0));
        assert_eq!(s.auc, 0.8333333333333334);
    }

    #[test]
    fn eer_prefers_crossing_side_with_smaller_error_sum() {
        let s = eer_stats(&[0.3, 0.7, 0.9], &[0.1, 0.5, 0.6, 0.8]).unwrap();
        assert_eq!((s.eer, s.eer_threshold), (0.29166666666666663, 0.7));
        assert_eq!((s.fmr0, s.auc), (2.0 / 3.0, 0.6666666666666667));
        let s = eer_stats(&[0.5], &[0.1, 0.2, 0.6]).unwrap();
        assert_eq!((s.eer, s.eer_threshold), (1.0 / 6.0, 0.5));
        // Equal error sums on both sides: the lower threshold wins.
        let s = eer_stats(&[0.5, 0.9], &[0.1, 0.5]).unwrap();
        assert_eq!((s.eer, s.eer_threshold), (0.25, 0.5));
    }

    #[test]
    fn perfect_separation_gives_zero_eer_and_unit_auc() {
        let g = [0.8, 0.9, 0.95];
        let i = [0.1, 0.2, 0.3, 0.4];
        let s = eer_stats(&g, &i).unwrap();
        assert_eq!(s.eer, 0.0);
        assert_eq!(s.eer_threshold, 0.8);
        assert_eq!(s.auc, 1.0);
        assert_eq!(s.fmr0, 0.0);
    }

    #[test]
    fn curves_that_never_cross_report_eer_one() {
        let s = eer_stats(&[1.0, 1.0], &[0.0, 1.0]).unwrap();
        assert_eq!((s.eer, s.eer_threshold), (1.0, 0.0));
    }

    #[test]
    fn decidability_and_fdr_formulas() {
        let g = [1.0, 3.0]; // mean 2, std 1
        let i = [-1.0, 1.0]; // mean 0, std 1
        let s = eer_stats(&g, &i).unwrap();
        assert_eq!((s.gmean, s.gstd, s.imean, s.istd), (2.0, 1.0, 0.0, 1.0));
        assert_eq!(s.decidability, 2.0);
        assert_eq!(s.fdr, 2.0);
        assert_eq!(eer_stats(&[2.0], &[1.0]).unwrap().decidability, 1.0);
    }

    #[test]
    fn rejects_empty_and_non_finite() {
        let e = eer_stats(&[], &[0.1]).unwrap_err().to_string();
        assert!(e.contains("genuine") && e.contains("empty"), "{e}");
        let e = eer_stats(&[0.1], &[0.2, f64::NAN]).unwrap_err().to_string();
        assert!(e.contains("impostor score #1"), "{e}");
    }

    #[test]
    fn numpy_sum_matches_reference_order() {
        // 1e16 + 1 + ... is order sensitive: pairwise keeps blocks of 8 separate.
        let mut x = [1.0; 16];
        x[0] = 1e16;
        let seq = x.iter().fold(0.0, |a, b| a + b);
        let np = numpy_sum(x.len(), |k| x[k]);
        // r0 = 1e16 (the +1 is lost to rounding), r1..r7 = 2 each: 1e16 + 14.
        assert_eq!(np, 1e16 + 14.0);
        assert_eq!(seq, 1e16);
        assert_eq!(numpy_sum(0, |_| 1.0), 0.0);
        assert_eq!(numpy_sum(1000, |k| k as f64), 499_500.0);
    }

    #[test]
    fn score_files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.txt");
        let scores = [0.1, -2.5e-7, 1.0 / 3.0, 1e300, 0.0];
        write_scores(&path, &scores).unwrap();
        assert_eq!(read_scores(&path).unwrap(), scores);
        std::fs::write(&path, "a b 0.5\n\n  0.25  \nx y nope\n").unwrap();
        let e = read_scores(&path).unwrap_err().to_string();
        assert!(e.contains(":4:") && e.contains("nope"), "{e}");
        std::fs::write(&path, "a b 0.5\n\n  0.25  \n").unwrap();
        assert_eq!(read_scores(&path).unwrap(), vec![0.5, 0.25]);
    }
}
