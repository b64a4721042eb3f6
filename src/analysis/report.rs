//! Dataset analysis from embeddings: verification scores and metrics, the exact
//! all-pairs histogram, per-identity statistics (centroid consistency, nearest other
//! identity, outlier samples) and an optional leakage check against a reference set.
//!
//! Definitions:
//! - genuine scores: every same-identity pair `i < j`; impostor scores: every
//!   cross-identity pair when there are at most `impostor_samples` of them, else
//!   `impostor_samples` pairs drawn uniformly (with replacement, seeded);
//! - an identity's centroid is the L2-normalised mean of its (normalised) embeddings;
//! - a sample is an outlier when its similarity to its centroid is below
//!   `mean − outlier_sigma · std` of its identity (population std), or below
//!   `outlier_threshold` when one is given;
//! - nearest identity: the other identity with the most similar centroid;
//! - leakage: for each identity, the highest similarity of any of its samples to any
//!   reference embedding; flagged when above `leak_threshold`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::embed::Embeddings;
use super::histogram::{
    all_impostor_scores, all_pairs_histogram, dot, genuine_scores, sampled_impostor_scores,
    PairHistogram, DEFAULT_BINS,
};
use super::metrics::{eer_stats, mean_std, EerStats};

/// Where the all-pairs histogram is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HistogramBackend {
    /// Blocked gemm on the CPU ([`all_pairs_histogram`]).
    #[default]
    Cpu,
    /// The WGSL compute shader through wgpu ([`super::gpu`]).
    Gpu,
}

/// Settings of [`analyze`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportOptions {
    /// Largest number of impostor scores kept; more cross pairs than this are sampled.
    pub impostor_samples: usize,
    /// Seed of the impostor sample.
    pub seed: u64,
    /// Histogram bins over [-1, 1].
    pub bins: usize,
    /// Outlier when the centroid similarity is below mean − this · std.
    pub outlier_sigma: f64,
    /// Outlier also when the centroid similarity is below this.
    pub outlier_threshold: Option<f64>,
    /// Leakage flag threshold on the maximum reference similarity.
    pub leak_threshold: f64,
    /// Histogram backend.
    pub backend: HistogramBackend,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            impostor_samples: 1_000_000,
            seed: 0,
            bins: DEFAULT_BINS,
            outlier_sigma: 2.0,
            outlier_threshold: None,
            leak_threshold: 0.5,
            backend: HistogramBackend::Cpu,
        }
    }
}

/// A sample far from its identity's centroid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outlier {
    /// Row in the embeddings.
    pub row: usize,
    /// File name of the row.
    pub file: String,
    /// Cosine similarity to the identity centroid.
    pub similarity: f64,
}

/// Statistics of one identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityStats {
    /// Identity index (label).
    pub label: u32,
    /// Identity name (folder name).
    pub name: String,
    /// Number of samples.
    pub samples: usize,
    /// Mean cosine similarity of the samples to the centroid.
    pub centroid_mean: f64,
    /// Population std of those similarities.
    pub centroid_std: f64,
    /// Smallest of those similarities.
    pub centroid_min: f64,
    /// Mean genuine score of the identity's pairs (`None` with fewer than 2 samples).
    pub genuine_mean: Option<f64>,
    /// Label of the identity with the most similar centroid.
    pub nearest_label: Option<u32>,
    /// Its name.
    pub nearest_name: Option<String>,
    /// Cosine similarity of the two centroids.
    pub nearest_similarity: Option<f64>,
    /// Outlier samples, most distant first.
    pub outliers: Vec<Outlier>,
    /// Highest similarity of a sample to a reference embedding.
    pub leak_similarity: Option<f64>,
    /// Row of that reference embedding.
    pub leak_reference: Option<usize>,
    /// `leak_similarity > leak_threshold`.
    pub leaked: bool,
    /// Mean cosine similarity of the samples to the identity's context, when the generator's
    /// contexts were given and live in the FR model's space (see [`Report::score_contexts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_mean: Option<f64>,
}

/// Summary of the leakage check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeakageSummary {
    /// Rows of the reference set.
    pub reference_rows: usize,
    /// Flag threshold.
    pub threshold: f64,
    /// Identities above the threshold.
    pub flagged: usize,
    /// Highest similarity over all identities.
    pub max_similarity: f64,
}

/// Everything an analysis produces. The score lists and centroids are not serialised
/// (they go to their own files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Embedded images.
    pub images: usize,
    /// Identities.
    pub identities: usize,
    /// Embedding width.
    pub dim: usize,
    /// Same-identity pairs (all scored).
    pub genuine_pairs: u64,
    /// Cross-identity pairs in the dataset.
    pub impostor_pairs: u64,
    /// Impostor scores used for the metrics.
    pub impostor_scored: u64,
    /// True when the impostor scores are a sample.
    pub impostor_sampled: bool,
    /// Settings used.
    pub options: ReportOptions,
    /// pyeer statistics (`None` without genuine or impostor pairs).
    pub metrics: Option<EerStats>,
    /// Exact all-pairs histogram.
    pub histogram: PairHistogram,
    /// What computed the histogram (`cpu` or `wgpu: <adapter>`).
    pub histogram_device: String,
    /// Per-identity statistics, by label.
    pub per_identity: Vec<IdentityStats>,
    /// Leakage summary when a reference set was given.
    pub leakage: Option<LeakageSummary>,
    /// Mean cosine similarity of every image to its identity's context (IDiff-Face's
    /// identity-consistency measure), when contexts were scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_cosine: Option<f64>,
    /// Genuine scores in pair order.
    #[serde(skip)]
    pub genuine: Vec<f64>,
    /// Impostor scores (all or sampled) in pair order.
    #[serde(skip)]
    pub impostor: Vec<f64>,
    /// L2-normalised identity centroids, `identities × dim`.
    #[serde(skip)]
    pub centroids: Vec<f32>,
}

impl Report {
    /// Cosine similarity of two identity centroids.
    ///
    /// # Panics
    /// When a label is out of range.
    pub fn centroid_similarity(&self, a: usize, b: usize) -> f32 {
        let row = |k: usize| &self.centroids[k * self.dim..(k + 1) * self.dim];
        dot(row(a), row(b))
    }

    /// Outlier samples of all identities.
    pub fn outlier_count(&self) -> usize {
        self.per_identity.iter().map(|s| s.outliers.len()).sum()
    }

    /// Scores each image against its identity's context — the vector the generator was
    /// conditioned on, one per identity of `emb` — by cosine similarity: fills
    /// [`IdentityStats::context_mean`] and [`Report::context_cosine`] (mean over images).
    ///
    /// # Errors
    /// When the number of contexts is not the number of identities, or their width is not
    /// the embeddings' (contexts from another FR model).
    pub fn score_contexts(&mut self, emb: &Embeddings, contexts: &[Vec<f32>]) -> Result<()> {
        if contexts.len() != emb.identities.len() {
            bail!(
                "{} contexts for {} identities",
                contexts.len(),
                emb.identities.len()
            );
        }
        if let Some(c) = contexts.iter().find(|c| c.len() != emb.dim) {
            bail!(
                "contexts are {}-d but the FR model's embeddings are {}-d: they come from another model",
                c.len(),
                emb.dim
            );
        }
        // Embedding rows are unit vectors (as everywhere in the analysis); contexts need not be.
        let mut unit = contexts.concat();
        super::embed::normalise_rows(&mut unit, emb.dim);
        let mut sums = vec![(0.0f64, 0usize); contexts.len()];
        for (i, &label) in emb.labels.iter().enumerate() {
            let k = label as usize;
            let slot = &mut sums[k];
            slot.0 += f64::from(dot(emb.row(i), &unit[k * emb.dim..(k + 1) * emb.dim]));
            slot.1 += 1;
        }
        for s in &mut self.per_identity {
            let (sum, n) = sums[s.label as usize];
            s.context_mean = (n > 0).then(|| sum / n as f64);
        }
        let (sum, n) = sums.iter().fold((0.0, 0), |(a, k), (s, m)| (a + s, k + m));
        self.context_cosine = (n > 0).then(|| sum / n as f64);
        Ok(())
    }
}

/// A reference embedding set for the leakage check (L2-normalised rows).
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceSet {
    /// Row width.
    pub dim: usize,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl ReferenceSet {
    /// Loads `.npy`, safetensors (`embeddings`, `contexts` or a single tensor) or the
    /// reference's context pickles; rows are L2-normalised.
    ///
    /// # Errors
    /// When the file cannot be read or its width is not `dim`.
    pub fn load(path: &std::path::Path, dim: usize) -> Result<Self> {
        let mut data = match Embeddings::load(path) {
            Ok(e) if e.dim == dim => e.data,
            _ => {
                crate::identity::Contexts::load(path, dim)
                    .map_err(|e| anyhow::anyhow!("reference embeddings: {e:#}"))?
                    .data
            }
        };
        super::embed::normalise_rows(&mut data, dim);
        Ok(Self { dim, data })
    }
}

/// Runs the analysis on validated embeddings.
///
/// # Errors
/// On inconsistent embeddings, a reference of another width, invalid options or a
/// failing GPU backend.
pub fn analyze(
    emb: &Embeddings,
    reference: Option<&ReferenceSet>,
    opts: &ReportOptions,
) -> Result<Report> {
    emb.validate()?;
    if opts.bins == 0 {
        bail!("histogram bins must be positive");
    }
    if let Some(r) = reference {
        if r.dim != emb.dim {
            bail!(
                "reference embeddings have width {}, the dataset's have {}",
                r.dim,
                emb.dim
            );
        }
    }
    let (n, dim) = (emb.len(), emb.dim);
    let groups = groups(&emb.labels, emb.identities.len());
    let genuine = genuine_scores(&emb.data, dim, &emb.labels)?;
    let genuine_pairs = genuine.len() as u64;
    let all_pairs = (n as u64) * (n as u64).saturating_sub(1) / 2;
    let impostor_pairs = all_pairs - genuine_pairs;
    let impostor_sampled = impostor_pairs > opts.impostor_samples as u64;
    let impostor = if impostor_pairs == 0 {
        Vec::new()
    } else if impostor_sampled {
        sampled_impostor_scores(
            &emb.data,
            dim,
            &emb.labels,
            opts.impostor_samples,
            opts.seed,
        )?
    } else {
        all_impostor_scores(&emb.data, dim, &emb.labels)?
    };
    let metrics = if genuine.is_empty() || impostor.is_empty() {
        None
    } else {
        Some(eer_stats(&genuine, &impostor)?)
    };
    let (histogram, histogram_device) = match opts.backend {
        HistogramBackend::Cpu => (
            all_pairs_histogram(&emb.data, dim, &emb.labels, opts.bins)?,
            "cpu".to_owned(),
        ),
        HistogramBackend::Gpu => {
            let gpu = super::gpu::GpuHistogram::new()?;
            let h = gpu.histogram(&emb.data, dim, &emb.labels, opts.bins)?;
            (h, format!("wgpu: {}", gpu.adapter_name()))
        }
    };
    let centroids = centroids(emb, &groups);
    let nearest = best_matches(&centroids, &centroids, dim, true);
    let leak = reference.map(|r| best_matches(&emb.data, &r.data, dim, false));
    let per_identity: Vec<IdentityStats> = groups
        .iter()
        .enumerate()
        .map(|(k, rows)| {
            let c = &centroids[k * dim..(k + 1) * dim];
            let sims: Vec<f64> = rows
                .iter()
                .map(|&i| f64::from(dot(emb.row(i), c)))
                .collect();
            let (mean, std) = mean_std(&sims);
            let cut = mean - opts.outlier_sigma * std;
            let mut outliers: Vec<Outlier> = rows
                .iter()
                .zip(&sims)
                .filter(|(_, &s)| s < cut || opts.outlier_threshold.is_some_and(|t| s < t))
                .map(|(&row, &similarity)| Outlier {
                    row,
                    file: emb.files[row].clone(),
                    similarity,
                })
                .collect();
            outliers.sort_by(|a, b| a.similarity.total_cmp(&b.similarity));
            let near = nearest[k];
            let (leak_similarity, leak_reference) = match &leak {
                Some(best) => rows
                    .iter()
                    .filter_map(|&i| best[i])
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .map_or((None, None), |(j, s)| (Some(f64::from(s)), Some(j))),
                None => (None, None),
            };
            IdentityStats {
                label: k as u32,
                name: emb.identities[k].clone(),
                samples: rows.len(),
                centroid_mean: mean,
                centroid_std: std,
                centroid_min: sims.iter().copied().fold(f64::INFINITY, f64::min),
                genuine_mean: mean_pair_similarity(emb, rows),
                nearest_label: near.map(|(j, _)| j as u32),
                nearest_name: near.map(|(j, _)| emb.identities[j].clone()),
                nearest_similarity: near.map(|(_, s)| f64::from(s)),
                outliers,
                leaked: leak_similarity.is_some_and(|s| s > opts.leak_threshold),
                leak_similarity,
                leak_reference,
                context_mean: None,
            }
        })
        .collect();
    let leakage = reference.map(|r| LeakageSummary {
        reference_rows: r.data.len() / r.dim.max(1),
        threshold: opts.leak_threshold,
        flagged: per_identity.iter().filter(|s| s.leaked).count(),
        max_similarity: per_identity
            .iter()
            .filter_map(|s| s.leak_similarity)
            .fold(f64::NEG_INFINITY, f64::max),
    });
    Ok(Report {
        images: n,
        identities: groups.len(),
        dim,
        genuine_pairs,
        impostor_pairs,
        impostor_scored: impostor.len() as u64,
        impostor_sampled,
        options: opts.clone(),
        metrics,
        histogram,
        histogram_device,
        per_identity,
        leakage,
        context_cosine: None,
        genuine,
        impostor,
        centroids,
    })
}

/// Rows of every label `0..k`.
fn groups(labels: &[u32], k: usize) -> Vec<Vec<usize>> {
    let mut g = vec![Vec::new(); k];
    for (i, &l) in labels.iter().enumerate() {
        g[l as usize].push(i);
    }
    g
}

/// Normalised mean embedding of every identity (zero rows for empty identities).
fn centroids(emb: &Embeddings, groups: &[Vec<usize>]) -> Vec<f32> {
    let dim = emb.dim;
    let mut out = vec![0.0f32; groups.len() * dim];
    out.par_chunks_mut(dim).zip(groups).for_each(|(c, rows)| {
        let mut acc = vec![0.0f64; dim];
        for &i in rows {
            acc.iter_mut()
                .zip(emb.row(i))
                .for_each(|(a, &v)| *a += f64::from(v));
        }
        let norm = acc.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            c.iter_mut()
                .zip(&acc)
                .for_each(|(o, v)| *o = (v / norm) as f32);
        }
    });
    out
}

/// Mean of `x_i · x_j` over pairs `i < j` of `rows`, as `(‖Σx‖² − Σ‖x‖²) / (n (n − 1))`.
fn mean_pair_similarity(emb: &Embeddings, rows: &[usize]) -> Option<f64> {
    let n = rows.len();
    if n < 2 {
        return None;
    }
    let mut sum = vec![0.0f64; emb.dim];
    let mut squares = 0.0f64;
    for &i in rows {
        for (s, &v) in sum.iter_mut().zip(emb.row(i)) {
            *s += f64::from(v);
            squares += f64::from(v) * f64::from(v);
        }
    }
    let total: f64 = sum.iter().map(|v| v * v).sum();
    Some((total - squares) / (n * (n - 1)) as f64)
}

/// Rows of `queries` per block of the blocked search.
const BLOCK: usize = 128;

/// For every query row, the most similar row of `refs` (index and dot product); with
/// `exclude_same_index` row `i` of `refs` is skipped for query `i`. `None` when there
/// is no candidate.
pub fn best_matches(
    queries: &[f32],
    refs: &[f32],
    dim: usize,
    exclude_same_index: bool,
) -> Vec<Option<(usize, f32)>> {
    let (nq, nr) = (queries.len() / dim.max(1), refs.len() / dim.max(1));
    let mut out = vec![None; nq];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, best)| {
        let q0 = b * BLOCK;
        let rows = best.len();
        let mut scores = vec![0.0f32; rows * BLOCK];
        for r0 in (0..nr).step_by(BLOCK) {
            let cols = BLOCK.min(nr - r0);
            let tile = &mut scores[..rows * cols];
            super::histogram::tile_product(
                &queries[q0 * dim..(q0 + rows) * dim],
                &refs[r0 * dim..(r0 + cols) * dim],
                dim,
                tile,
            );
            for (r, slot) in best.iter_mut().enumerate() {
                for (c, &s) in tile[r * cols..(r + 1) * cols].iter().enumerate() {
                    let j = r0 + c;
                    if exclude_same_index && j == q0 + r {
                        continue;
                    }
                    if slot.is_none_or(|(_, m)| s > m) {
                        *slot = Some((j, s));
                    }
                }
            }
        }
    });
    out
}

/// Identities with their outlier count, for quick summaries (name → count).
pub fn outliers_by_identity(report: &Report) -> BTreeMap<String, usize> {
    report
        .per_identity
        .iter()
        .filter(|s| !s.outliers.is_empty())
        .map(|s| (s.name.clone(), s.outliers.len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// Context cosine by hand: identity 0's samples (1,0), (0.8,0.6) against context (1,0)
    /// give 1 and 0.8; identity 1's (0,1), (1,0) against (0,2) (not unit) give 1 and 0.
    #[test]
    fn contexts_are_scored_per_identity_and_over_all_images() {
        let emb = Embeddings {
            dim: 2,
            data: vec![1.0, 0.0, 0.8, 0.6, 0.0, 1.0, 1.0, 0.0],
            labels: vec![0, 0, 1, 1],
            identities: vec!["a".into(), "b".into()],
            files: (0..4).map(|i| i.to_string()).collect(),
        };
        let mut r = analyze(&emb, None, &ReportOptions::default()).unwrap();
        assert_eq!(r.context_cosine, None);
        r.score_contexts(&emb, &[vec![1.0, 0.0], vec![0.0, 2.0]])
            .unwrap();
        let per: Vec<f64> = r
            .per_identity
            .iter()
            .map(|s| s.context_mean.unwrap())
            .collect();
        assert!(
            (per[0] - 0.9).abs() < 1e-6 && (per[1] - 0.5).abs() < 1e-6,
            "{per:?}"
        );
        assert!((r.context_cosine.unwrap() - 0.7).abs() < 1e-6);
        let json = serde_json::to_value(&r).unwrap();
        assert!((json["context_cosine"].as_f64().unwrap() - 0.7).abs() < 1e-6);
        let err = r.score_contexts(&emb, &[vec![1.0, 0.0]]).unwrap_err();
        assert!(
            err.to_string().contains("1 contexts for 2 identities"),
            "{err}"
        );
        let err = r
            .score_contexts(&emb, &[vec![1.0; 3], vec![1.0; 3]])
            .unwrap_err();
        assert!(
            err.to_string().contains("3-d") && err.to_string().contains("2-d"),
            "{err}"
        );
    }

    /// `ids` identities of `per` samples: a random direction plus noise, normalised.
    pub(crate) fn clustered(
        ids: usize,
        per: usize,
        dim: usize,
        noise: f32,
        seed: u64,
    ) -> Embeddings {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut data = Vec::new();
        let mut labels = Vec::new();
        let mut files = Vec::new();
        for k in 0..ids {
            let centre: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            for s in 0..per {
                data.extend(
                    centre
                        .iter()
                        .map(|c| c + noise * rng.random_range(-1.0f32..1.0)),
                );
                labels.push(k as u32);
                files.push(format!("{k:06}/{s:04}.png"));
            }
        }
        super::super::embed::normalise_rows(&mut data, dim);
        Embeddings {
            dim,
            data,
            labels,
            identities: (0..ids).map(|k| format!("{k:06}")).collect(),
            files,
        }
    }

    #[test]
    fn tiny_exact_report() {
        // id a: e0, (0.6, 0.8); id b: e1, e2; id c: -e0 alone.
        let emb = Embeddings {
            dim: 3,
            data: vec![
                1.0, 0.0, 0.0, 0.6, 0.8, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0,
            ],
            labels: vec![0, 0, 1, 1, 2],
            identities: vec!["a".into(), "b".into(), "c".into()],
            files: (0..5).map(|i| i.to_string()).collect(),
        };
        let reference = ReferenceSet {
            dim: 3,
            data: vec![0.0, 0.0, 1.0],
        };
        let opts = ReportOptions {
            leak_threshold: 0.9,
            ..Default::default()
        };
        let r = analyze(&emb, Some(&reference), &opts).unwrap();
        assert_eq!(
            (r.images, r.identities, r.genuine_pairs, r.impostor_pairs),
            (5, 3, 2, 8)
        );
        assert!(!r.impostor_sampled);
        let g32: Vec<f32> = r.genuine.iter().map(|&s| s as f32).collect();
        assert_eq!(g32, vec![0.6, 0.0]);
        assert_eq!(r.histogram.total(), 10);
        let a = &r.per_identity[0];
        assert_eq!(a.samples, 2);
        assert!((a.genuine_mean.unwrap() - 0.6).abs() < 1e-6);
        // Centroid of e0 and (0.6, 0.8) is (0.8, 0.4)/|.|: both samples at the same angle.
        assert!((a.centroid_mean - 0.8944272).abs() < 1e-6);
        assert!(a.centroid_std < 1e-7 && a.outliers.is_empty());
        // Nearest to a: b's centroid (0, 1, 1)/√2 scores 0.4/√2/|(.8,.4)|; c scores -0.894.
        assert_eq!(a.nearest_name.as_deref(), Some("b"));
        let c = &r.per_identity[2];
        assert_eq!(c.genuine_mean, None);
        assert_eq!(c.nearest_name.as_deref(), Some("b"));
        assert_eq!(r.per_identity[1].leak_similarity, Some(1.0));
        assert!(r.per_identity[1].leaked && !a.leaked);
        assert_eq!(r.leakage.as_ref().unwrap().flagged, 1);
        assert!(r.metrics.is_some());
        let json = serde_json::to_value(&r).unwrap();
        assert!(json.get("genuine").is_none() && json["metrics"]["eer"].is_number());
    }

    #[test]
    fn outliers_and_sampling() {
        let mut emb = clustered(20, 10, 32, 0.3, 5);
        // Replace one sample of identity 3 with a far-away vector.
        let row = 3 * 10 + 4;
        let far: Vec<f32> = emb.row(row).iter().map(|v| -v).collect();
        emb.data[row * 32..(row + 1) * 32].copy_from_slice(&far);
        let opts = ReportOptions {
            impostor_samples: 1000,
            ..Default::default()
        };
        let r = analyze(&emb, None, &opts).unwrap();
        assert!(r.impostor_sampled);
        assert_eq!(r.impostor.len(), 1000);
        assert_eq!(r.genuine_pairs, 20 * 45);
        assert_eq!(r.histogram.total(), 200 * 199 / 2);
        let o = &r.per_identity[3].outliers;
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!(o[0].row, row);
        assert_eq!(o[0].file, "000003/0004.png");
        assert_eq!(outliers_by_identity(&r).get("000003"), Some(&1));
        let m = r.metrics.unwrap();
        assert!(m.eer < 0.05, "{m:?}");
        // Same seed, same sample.
        assert_eq!(analyze(&emb, None, &opts).unwrap().impostor, r.impostor);
    }

    #[test]
    fn best_matches_agree_with_brute_force() {
        let a = clustered(7, 40, 24, 0.5, 1);
        let b = clustered(3, 50, 24, 0.5, 2);
        let got = best_matches(&a.data, &b.data, 24, false);
        for (i, g) in got.iter().enumerate() {
            let (j, s) = g.unwrap();
            let brute = (0..b.len())
                .map(|j| dot(a.row(i), b.row(j)))
                .fold(f32::NEG_INFINITY, f32::max);
            assert!((s - brute).abs() < 1e-5 && (dot(a.row(i), b.row(j)) - s).abs() < 1e-5);
        }
        let own = best_matches(&a.data, &a.data, 24, true);
        assert!(own.iter().enumerate().all(|(i, m)| m.unwrap().0 != i));
        assert_eq!(
            best_matches(&a.data[..24], &a.data[..24], 24, true),
            vec![None]
        );
    }

    #[test]
    fn rejects_mismatched_reference_and_single_identity_has_no_metrics() {
        let emb = clustered(1, 4, 8, 0.1, 0);
        let r = analyze(&emb, None, &ReportOptions::default()).unwrap();
        assert!(r.metrics.is_none() && r.impostor.is_empty());
        let bad = ReferenceSet {
            dim: 4,
            data: vec![1.0, 0.0, 0.0, 0.0],
        };
        let e = analyze(&emb, Some(&bad), &ReportOptions::default()).unwrap_err();
        assert!(e.to_string().contains("width 4"), "{e}");
    }
}
