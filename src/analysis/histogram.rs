//! All-pairs genuine / impostor cosine-similarity statistics on the CPU.
//!
//! Embeddings are `N × dim` row-major f32, expected L2-normalised (so dot product =
//! cosine similarity); every pair `i < j` is genuine when `labels[i] == labels[j]`,
//! impostor otherwise. Scores are f32 dot products.
//!
//! # Bin convention (a GPU shader must reproduce it)
//! With `bins` equal-width bins over `[-1, 1]`, a score `s` goes to
//! `clamp(floor((s + 1) * (bins / 2)), 0, bins - 1)`, evaluated in f32: `s + 1` is
//! rounded to f32, then the product with `bins / 2` (exact for `bins < 2^24`) is
//! rounded to f32, then floored. Equivalently `floor((s + 1) / 2 * bins)` in f32.
//! Bin `k` therefore covers `[-1 + 2k/bins, -1 + 2(k+1)/bins)`, the last bin also
//! holds `s >= 1`, the first also holds `s < -1`, and a NaN score counts in bin 0.
//! Since the blocked matrix product sums in its own order, a score within a few ulps
//! of a bin edge may land in a neighbouring bin compared with a naive dot product.

use std::collections::HashMap;
use std::hash::Hash;

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Default number of histogram bins over `[-1, 1]`.
pub const DEFAULT_BINS: usize = 100;

/// Rows (and columns) per tile of the blocked all-pairs product.
pub const TILE: usize = 256;

/// Independent sub-histograms used to break store-to-load dependencies.
const LANES: usize = 4;

/// Pair counts per bin, genuine and impostor kept apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairHistogram {
    /// Counts of same-identity pairs per bin.
    pub genuine: Vec<u64>,
    /// Counts of cross-identity pairs per bin.
    pub impostor: Vec<u64>,
}

impl PairHistogram {
    /// Empty histogram with `bins` bins.
    pub fn new(bins: usize) -> Self {
        Self {
            genuine: vec![0; bins],
            impostor: vec![0; bins],
        }
    }

    /// Number of bins.
    pub fn bins(&self) -> usize {
        self.genuine.len()
    }

    /// The `bins + 1` bin edges `-1 + 2k / bins`.
    pub fn bin_edges(&self) -> Vec<f64> {
        let bins = self.bins() as f64;
        (0..=self.bins())
            .map(|k| -1.0 + 2.0 * k as f64 / bins)
            .collect()
    }

    /// Total number of pairs counted.
    pub fn total(&self) -> u64 {
        self.genuine.iter().chain(&self.impostor).sum()
    }

    /// Adds one score to the genuine or impostor counts.
    ///
    /// # Panics
    /// When the histogram has no bins.
    pub fn add(&mut self, score: f32, genuine: bool) {
        let k = bin_index(score, self.bins());
        let counts = if genuine {
            &mut self.genuine
        } else {
            &mut self.impostor
        };
        counts[k] += 1;
    }
}

/// Bin of `score` under the module's convention (0 when `bins` is 0).
#[inline]
pub fn bin_index(score: f32, bins: usize) -> usize {
    let t = (score + 1.0) * (bins as f32 * 0.5);
    // max/min map NaN to 0 and clamp; the cast then truncates a value in [0, bins-1].
    t.max(0.0).min(bins.saturating_sub(1) as f32) as usize
}

/// Validates `N × dim` embeddings against `labels`; returns `N`.
fn check_inputs<L>(emb: &[f32], dim: usize, labels: &[L]) -> Result<usize> {
    if dim == 0 {
        bail!("embedding dimension must be positive");
    }
    if !emb.len().is_multiple_of(dim) {
        bail!(
            "{} embedding values are not a whole number of {dim}-d rows",
            emb.len()
        );
    }
    let n = emb.len() / dim;
    if labels.len() != n {
        bail!("{n} embeddings but {} labels", labels.len());
    }
    if let Some(i) = emb.iter().position(|v| !v.is_finite()) {
        bail!("embedding value #{i} (row {}) is not finite", i / dim);
    }
    Ok(n)
}

/// Histogram of all pairs `i < j`, never materialising the `N × N` score matrix.
///
/// The upper triangle is cut into `TILE × TILE` tiles, each computed with a
/// single-threaded `gemm` into a reused buffer and binned at once; tiles run in
/// parallel on the rayon pool.
///
/// # Errors
/// On inconsistent shapes, non-finite values or `bins == 0`.
pub fn all_pairs_histogram<L: PartialEq + Sync>(
    emb: &[f32],
    dim: usize,
    labels: &[L],
    bins: usize,
) -> Result<PairHistogram> {
    let n = check_inputs(emb, dim, labels)?;
    if bins == 0 || bins > (u32::MAX / 2) as usize {
        bail!("bins must be in 1..={}, got {bins}", u32::MAX / 2);
    }
    let tiles = n.div_ceil(TILE);
    let jobs: Vec<(usize, usize)> = (0..tiles)
        .flat_map(|a| (a..tiles).map(move |b| (a, b)))
        .collect();
    let counts = jobs
        .par_iter()
        .fold(
            || TileWorker::new(bins),
            |mut w, &(a, b)| {
                w.run(emb, dim, labels, a, b);
                w
            },
        )
        .map(|w| w.counts)
        .reduce(|| vec![0; 2 * bins], add_counts);
    let (impostor, genuine) = counts.split_at(bins);
    Ok(PairHistogram {
        genuine: genuine.to_vec(),
        impostor: impostor.to_vec(),
    })
}

fn add_counts(mut a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    a
}

/// Per-thread scratch space and counts; counts are `[impostor bins | genuine bins]`.
struct TileWorker {
    bins: usize,
    scores: Vec<f32>,
    index: Vec<u32>,
    lanes: Vec<u32>,
    counts: Vec<u64>,
}

impl TileWorker {
    fn new(bins: usize) -> Self {
        Self {
            bins,
            scores: vec![0.0; TILE * TILE],
            index: vec![0; TILE],
            lanes: vec![0; LANES * 2 * bins],
            counts: vec![0; 2 * bins],
        }
    }

    /// Scores and bins the pairs of row tile `a` against column tile `b >= a`.
    fn run<L: PartialEq>(&mut self, emb: &[f32], dim: usize, labels: &[L], a: usize, b: usize) {
        let n = labels.len();
        let rows = a * TILE..(a * TILE + TILE).min(n);
        let cols = b * TILE..(b * TILE + TILE).min(n);
        let width = cols.len();
        let scores = &mut self.scores[..rows.len() * width];
        tile_product(
            &emb[rows.start * dim..rows.end * dim],
            &emb[cols.start * dim..cols.end * dim],
            dim,
            scores,
        );
        for (r, i) in rows.clone().enumerate() {
            // On a diagonal tile only the pairs right of the diagonal count.
            let skip = if a == b { r + 1 } else { 0 };
            let row = &self.scores[r * width + skip..(r + 1) * width];
            let col_labels = &labels[cols.start + skip..cols.end];
            let index = &mut self.index[..row.len()];
            bin_row(row, col_labels, &labels[i], self.bins, index);
            scatter(index, &mut self.lanes);
        }
        self.flush_lanes();
    }

    fn flush_lanes(&mut self) {
        for lane in self.lanes.chunks_exact_mut(2 * self.bins) {
            for (c, l) in self.counts.iter_mut().zip(lane.iter_mut()) {
                *c += u64::from(*l);
                *l = 0;
            }
        }
    }
}

/// `out[r * cols + c] = <lhs row r, rhs row c>` for row-major `lhs` and `rhs`
/// (single-threaded gemm; callers parallelise over tiles).
pub(crate) fn tile_product(lhs: &[f32], rhs: &[f32], dim: usize, out: &mut [f32]) {
    let (m, n) = (lhs.len() / dim, rhs.len() / dim);
    assert!(out.len() == m * n && lhs.len() == m * dim && rhs.len() == n * dim);
    // SAFETY: `out` holds m×n values written at row stride n, column stride 1; `lhs`
    // is m×dim read at (row stride dim, column stride 1) and `rhs` is read as the
    // dim×n transpose of its n×dim rows (row stride 1, column stride dim): all
    // accesses stay within the slices checked above, which do not overlap.
    unsafe {
        gemm::gemm(
            m,
            n,
            dim,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            dim as isize,
            rhs.as_ptr(),
            dim as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Combined bin index per score: `bin` for impostor, `bins + bin` for genuine.
#[inline]
fn bin_row<L: PartialEq>(row: &[f32], col_labels: &[L], label: &L, bins: usize, out: &mut [u32]) {
    for ((o, &s), l) in out.iter_mut().zip(row).zip(col_labels) {
        let k = bin_index(s, bins) as u32;
        *o = k + if l == label { bins as u32 } else { 0 };
    }
}

/// Counts indices into `LANES` interleaved sub-histograms of `lanes.len() / LANES`.
#[inline]
fn scatter(index: &[u32], lanes: &mut [u32]) {
    let (l0, rest) = lanes.split_at_mut(lanes.len() / LANES);
    let (l1, rest) = rest.split_at_mut(l0.len());
    let (l2, l3) = rest.split_at_mut(l0.len());
    let mut quads = index.chunks_exact(LANES);
    for q in &mut quads {
        l0[q[0] as usize] += 1;
        l1[q[1] as usize] += 1;
        l2[q[2] as usize] += 1;
        l3[q[3] as usize] += 1;
    }
    for &k in quads.remainder() {
        l0[k as usize] += 1;
    }
}

/// Dot product with 16 independent partial sums (vectorisable), f32 throughout.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(x).zip(y) {
            *s += p * q;
        }
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for k in 0..width {
            acc[k] += acc[k + width];
        }
    }
    acc[0] + tail
}

fn row(emb: &[f32], dim: usize, i: usize) -> &[f32] {
    &emb[i * dim..(i + 1) * dim]
}

/// Scores of every same-identity pair `i < j`, ordered by `(i, j)`.
///
/// # Errors
/// On inconsistent shapes or non-finite values.
pub fn genuine_scores<L: Eq + Hash + Sync>(
    emb: &[f32],
    dim: usize,
    labels: &[L],
) -> Result<Vec<f64>> {
    check_inputs(emb, dim, labels)?;
    let mut groups: HashMap<&L, Vec<usize>> = HashMap::new();
    for (i, l) in labels.iter().enumerate() {
        groups.entry(l).or_default().push(i);
    }
    // Position of each row inside its (ascending) group.
    let mut rank = vec![0usize; labels.len()];
    for members in groups.values() {
        for (r, &i) in members.iter().enumerate() {
            rank[i] = r;
        }
    }
    Ok((0..labels.len())
        .into_par_iter()
        .flat_map_iter(|i| {
            let members = &groups[&labels[i]][rank[i] + 1..];
            let a = row(emb, dim, i);
            members
                .iter()
                .map(move |&j| f64::from(dot(a, row(emb, dim, j))))
        })
        .collect())
}

/// Scores of every cross-identity pair `i < j`, ordered by `(i, j)`; O(N²), for small sets.
///
/// # Errors
/// On inconsistent shapes or non-finite values.
pub fn all_impostor_scores<L: PartialEq + Sync>(
    emb: &[f32],
    dim: usize,
    labels: &[L],
) -> Result<Vec<f64>> {
    let n = check_inputs(emb, dim, labels)?;
    Ok((0..n)
        .into_par_iter()
        .flat_map_iter(|i| {
            let a = row(emb, dim, i);
            (i + 1..n)
                .filter(move |&j| labels[j] != labels[i])
                .map(move |j| f64::from(dot(a, row(emb, dim, j))))
        })
        .collect())
}

/// `count` scores of cross-identity pairs drawn uniformly with replacement, reproducible
/// from `seed` (ChaCha20), returned in `(i, j)` pair order.
///
/// Each draw picks `i != j` uniformly from `0..N` and redraws while the labels match,
/// which is uniform over unordered cross-identity pairs. The expected number of
/// redraws grows as the share of cross-identity pairs shrinks.
///
/// # Errors
/// On inconsistent shapes, non-finite values, or when no cross-identity pair exists.
pub fn sampled_impostor_scores<L: PartialEq>(
    emb: &[f32],
    dim: usize,
    labels: &[L],
    count: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    let n = check_inputs(emb, dim, labels)?;
    if count == 0 {
        return Ok(Vec::new());
    }
    if labels.iter().all(|l| *l == labels[0]) {
        bail!("no cross-identity pairs: all {n} embeddings share one identity");
    }
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut pairs: Vec<(usize, usize)> = (0..count)
        .map(|_| loop {
            let i = rng.random_range(0..n);
            let j = rng.random_range(0..n);
            if i != j && labels[i] != labels[j] {
                break (i.min(j), i.max(j));
            }
        })
        .collect();
    // Sorting reuses row `i` across neighbouring pairs (fewer cache misses).
    pairs.sort_unstable();
    Ok(pairs
        .par_iter()
        .map(|&(i, j)| f64::from(dot(row(emb, dim, i), row(emb, dim, j))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Reference: every pair scored one by one.
    fn naive_histogram(emb: &[f32], dim: usize, labels: &[u32], bins: usize) -> PairHistogram {
        let n = labels.len();
        let mut h = PairHistogram::new(bins);
        for i in 0..n {
            for j in i + 1..n {
                let s = dot(row(emb, dim, i), row(emb, dim, j));
                h.add(s, labels[i] == labels[j]);
            }
        }
        h
    }

    /// Entries in {-1/8, 0, 1/8} (norm <= 1 for dim 64): every dot product and partial
    /// sum is a multiple of 1/64, exact in f32 in any summation order.
    fn exact_embeddings(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..n * dim)
            .map(|_| [-0.125f32, 0.0, 0.125, 0.125][rng.random_range(0..4)])
            .collect()
    }

    fn random_labels(n: usize, ids: u32, seed: u64) -> Vec<u32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..ids)).collect()
    }

    #[test]
    fn bin_index_convention() {
        assert_eq!(bin_index(-1.0, 100), 0);
        assert_eq!(bin_index(-1.5, 100), 0);
        assert_eq!(bin_index(f32::NAN, 100), 0);
        assert_eq!(bin_index(-0.98, 100), 0); // (0.02 * 50 = 0.99999994 in f32)
        assert_eq!(bin_index(-0.97, 100), 1);
        assert_eq!(bin_index(0.0, 100), 50);
        assert_eq!(bin_index(0.5, 100), 75);
        assert_eq!(bin_index(0.9999, 100), 99);
        assert_eq!(bin_index(1.0, 100), 99);
        assert_eq!(bin_index(7.0, 100), 99);
        assert_eq!(bin_index(0.3, 1), 0);
        assert_eq!(bin_index(0.3, 0), 0);
        let h = PairHistogram::new(4);
        assert_eq!(h.bin_edges(), vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
    }

    #[test]
    fn blocked_equals_naive_on_exact_data() {
        // 600 rows: 3 tiles, the last partial; 64 identities so both kinds are common.
        let (n, dim) = (600, 64);
        let emb = exact_embeddings(n, dim, 7);
        let labels = random_labels(n, 64, 8);
        let got = all_pairs_histogram(&emb, dim, &labels, 100).unwrap();
        assert_eq!(got, naive_histogram(&emb, dim, &labels, 100));
        assert_eq!(got.total(), (n * (n - 1) / 2) as u64);
        assert!(got.genuine.iter().sum::<u64>() > 1000);
    }

    #[test]
    fn blocked_close_to_naive_on_random_floats() {
        let (n, dim) = (300, 37);
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut emb: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        for r in emb.chunks_exact_mut(dim) {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            r.iter_mut().for_each(|v| *v /= norm);
        }
        let labels = random_labels(n, 20, 4);
        let got = all_pairs_histogram(&emb, dim, &labels, 100).unwrap();
        let want = naive_histogram(&emb, dim, &labels, 100);
        assert_eq!(got.total(), want.total());
        // Summation order may move a score sitting on a bin edge by one bin, no more.
        let moved: u64 = got
            .genuine
            .iter()
            .chain(&got.impostor)
            .zip(want.genuine.iter().chain(&want.impostor))
            .map(|(a, b)| a.abs_diff(*b))
            .sum();
        assert!(moved <= 4, "{moved} counts differ");
    }

    /// 3 identities × 2 unit vectors in R^3 with simple, exactly known dot products.
    fn three_by_two() -> (Vec<f32>, Vec<u32>) {
        let emb = vec![
            1.0, 0.0, 0.0, // id 0
            0.0, 1.0, 0.0, // id 1
            0.6, 0.8, 0.0, // id 0
            0.0, 0.0, 1.0, // id 2
            0.0, 0.8, 0.6, // id 1
            0.0, 0.0, -1.0, // id 2
        ];
        (emb, vec![0, 1, 0, 2, 1, 2])
    }

    #[test]
    fn tiny_genuine_and_impostor_lists() {
        let (emb, labels) = three_by_two();
        let g = genuine_scores(&emb, 3, &labels).unwrap();
        let g32: Vec<f32> = g.iter().map(|&s| s as f32).collect();
        assert_eq!(g32, vec![0.6, 0.8, -1.0]); // pairs (0,2), (1,4), (3,5)
        let imp = all_impostor_scores(&emb, 3, &labels).unwrap();
        assert_eq!(imp.len(), 15 - 3);
        // (0,1)=0, (0,3)=0, (0,4)=0, (0,5)=0, (1,2)=0.8, (1,3)=0, (1,5)=0, ...
        assert_eq!(imp[4] as f32, 0.8);
        let h = all_pairs_histogram(&emb, 3, &labels, 10).unwrap();
        assert_eq!(h.total(), 15);
        assert_eq!(h.genuine.iter().sum::<u64>(), 3);
        assert_eq!((h.genuine[0], h.genuine[8], h.genuine[9]), (1, 1, 1));
        let mut from_lists = PairHistogram::new(10);
        g.iter().for_each(|&s| from_lists.add(s as f32, true));
        imp.iter().for_each(|&s| from_lists.add(s as f32, false));
        assert_eq!(h, from_lists);
    }

    #[test]
    fn sampled_impostors_are_uniform_over_cross_identity_pairs() {
        // 1-d "embeddings" 1, 2, 3, 5, 7, 11: every pair product is distinct, so a score
        // identifies its pair. Genuine pairs (0,2), (1,4), (3,5) score 3, 14, 55.
        let emb = [1.0f32, 2.0, 3.0, 5.0, 7.0, 11.0];
        let labels = [0u32, 1, 0, 2, 1, 2];
        let draws = 12_000;
        let a = sampled_impostor_scores(&emb, 1, &labels, draws, 11).unwrap();
        assert_eq!(
            a,
            sampled_impostor_scores(&emb, 1, &labels, draws, 11).unwrap()
        );
        assert_ne!(
            a,
            sampled_impostor_scores(&emb, 1, &labels, draws, 12).unwrap()
        );
        let impostors = all_impostor_scores(&emb, 1, &labels).unwrap();
        assert_eq!(impostors.len(), 12);
        for s in &impostors {
            // Expected 1000 draws each; the binomial std is about 29.
            let hits = a.iter().filter(|&x| x == s).count();
            assert!(hits.abs_diff(draws / 12) < 150, "score {s}: {hits} draws");
        }
        assert!(
            a.iter().all(|s| impostors.contains(s)),
            "drew a genuine pair"
        );
        let e = sampled_impostor_scores(&emb, 1, &[1u32; 6], 5, 0).unwrap_err();
        assert!(e.to_string().contains("no cross-identity"));
        assert!(sampled_impostor_scores(&emb, 1, &labels, 0, 0)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn genuine_scores_match_naive_order_and_values() {
        let (n, dim) = (200, 64);
        let emb = exact_embeddings(n, dim, 1);
        let labels = random_labels(n, 15, 2);
        let mut want = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                if labels[i] == labels[j] {
                    let s: f32 = row(&emb, dim, i)
                        .iter()
                        .zip(row(&emb, dim, j))
                        .map(|(x, y)| x * y)
                        .sum();
                    want.push(f64::from(s));
                }
            }
        }
        assert_eq!(genuine_scores(&emb, dim, &labels).unwrap(), want);
        let imp = all_impostor_scores(&emb, dim, &labels).unwrap();
        assert_eq!(want.len() + imp.len(), n * (n - 1) / 2);
    }

    #[test]
    fn rejects_bad_inputs() {
        let emb = vec![0.5f32; 12];
        let e = all_pairs_histogram(&emb, 4, &[0u32, 1], 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 embeddings but 2 labels"), "{e}");
        assert!(all_pairs_histogram(&emb, 5, &[0u32, 1], 10).is_err());
        assert!(all_pairs_histogram(&emb, 0, &[0u32, 1], 10).is_err());
        assert!(all_pairs_histogram(&emb, 4, &[0u32, 1, 2], 0).is_err());
        let mut bad = emb.clone();
        bad[9] = f32::INFINITY;
        let e = genuine_scores(&bad, 4, &[0u32, 1, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("#9 (row 2)"), "{e}");
    }

    #[test]
    fn empty_and_single_row_sets() {
        let h = all_pairs_histogram(&[], 4, &[] as &[u32], 10).unwrap();
        assert_eq!(h.total(), 0);
        let h = all_pairs_histogram(&[1.0, 0.0], 2, &[3u32], 10).unwrap();
        assert_eq!(h.total(), 0);
    }
}
