//! Curation of a synthetic face dataset before export: which images and identities to keep.
//!
//! The rules run in this fixed order, each on what the previous ones kept:
//!
//! 1. **Manual rejects**: whole identities, then single `(identity, sample)` images, as the
//!    studio stores them.
//! 2. **τ_img** (`tau_img`): drop an image whose cosine similarity to its identity's centroid
//!    is below τ_img. The centroid is the mean of the L2-normalised embeddings of the
//!    identity's images left after step 1 (the image itself included).
//! 3. **τ_gen** (`tau_gen`): drop an identity whose mean genuine similarity (mean cosine
//!    similarity over all pairs of its images left after step 2) is below τ_gen. An identity
//!    with fewer than two images left has no genuine pair and is dropped too.
//! 4. **Leakage**: drop identities flagged by a leakage check, either given as a set of
//!    identity indices or computed here with the Analyze report's definition
//!    ([`crate::analysis::report`]): an identity is flagged when one of its images (left
//!    after step 3) has a cosine similarity above the threshold to some reference embedding
//!    (e.g. the FR model's training identities).
//! 5. **τ_uniq** (`tau_uniq`): greedy uniqueness filter. Identities are visited in ascending
//!    identity index; one is kept when the cosine similarity of its centroid to every
//!    identity already kept is at most τ_uniq, else dropped. Of every pair closer than τ_uniq
//!    the lower index thus survives (peers use τ_uniq = 0.3–0.4).
//!
//! From step 3 on, centroids are those of the images left after step 2. An identity whose
//! images all go in step 1 or 2 counts as dropped by that step. [`curate`] only computes;
//! nothing is written, so the counts can be previewed before an export.

use super::embeddings::{normalize, Embeddings};
use crate::analysis::histogram::dot;
use crate::analysis::report::best_matches;
use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One image of a dataset: its identity index and sample index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImageId {
    /// Identity index (the folder number of a generated dataset).
    pub identity: usize,
    /// Sample index within the identity.
    pub sample: usize,
}

/// Manual rejects, in the studio's JSON form:
/// `{"images": [[identity, sample], ...], "identities": [identity, ...]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ManualRejects {
    /// Rejected single images `(identity, sample)`.
    pub images: BTreeSet<(usize, usize)>,
    /// Rejected identities (all their images).
    pub identities: BTreeSet<usize>,
}

impl ManualRejects {
    /// True when nothing is rejected.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.identities.is_empty()
    }

    /// Reads a rejects file: either the bare `{"images", "identities"}` object, or a studio
    /// session file, whose grid rows are mapped to their seed-contract identity indices.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read rejects {}", path.display()))?;
        Self::from_json(&text).map_err(|e| anyhow!("rejects {}: {e:#}", path.display()))
    }

    /// Parses the JSON accepted by [`ManualRejects::load`].
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| anyhow!("invalid JSON: {e}"))?;
        let Some(inner) = value.get("rejects") else {
            return serde_json::from_value(value).map_err(|e| {
                anyhow!("expected {{\"images\": [[identity, sample]], \"identities\": [..]}}: {e}")
            });
        };
        // A session: rejects are grid rows; map rows to identity keys when the grid is known.
        let rows: Result<Self> = serde_json::from_value(inner.clone())
            .map_err(|e| anyhow!("session rejects are malformed: {e}"));
        let rows = rows?;
        let keys: Option<Vec<usize>> = value
            .pointer("/grid/rows")
            .and_then(|r| r.as_array())
            .map(|r| {
                r.iter()
                    .map(|row| row.get("key").and_then(|k| k.as_u64()).map(|k| k as usize))
                    .collect::<Option<Vec<usize>>>()
            })
            .unwrap_or(None);
        let Some(keys) = keys else {
            return Ok(rows);
        };
        let key = |row: usize| -> Result<usize> {
            keys.get(row)
                .copied()
                .ok_or_else(|| anyhow!("rejected row {row} is outside the session's grid"))
        };
        Ok(Self {
            images: rows
                .images
                .iter()
                .map(|&(r, c)| Ok((key(r)?, c)))
                .collect::<Result<_>>()?,
            identities: rows
                .identities
                .iter()
                .map(|&r| key(r))
                .collect::<Result<_>>()?,
        })
    }
}

/// How leaked identities are found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeakageRule {
    /// Identities already flagged by a leakage check.
    Flagged {
        /// Flagged identity indices.
        identities: BTreeSet<usize>,
    },
    /// Flag identities with an image more similar than `threshold` to some embedding of a
    /// reference set.
    Reference {
        /// The reference embeddings file (recorded for the manifest).
        path: PathBuf,
        /// Cosine-similarity threshold.
        threshold: f32,
    },
}

/// The curation rules (all optional), applied in the order documented in the module.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CurationRules {
    /// Drop images whose similarity to their identity centroid is below this.
    pub tau_img: Option<f32>,
    /// Drop identities whose mean genuine similarity is below this.
    pub tau_gen: Option<f32>,
    /// Drop the later identity of every pair whose centroids are more similar than this.
    pub tau_uniq: Option<f32>,
    /// Drop identities flagged by a leakage check.
    pub leakage: Option<LeakageRule>,
    /// Manual rejects.
    pub rejects: ManualRejects,
}

impl CurationRules {
    /// True when some rule needs the dataset's embeddings.
    pub fn needs_embeddings(&self) -> bool {
        self.tau_img.is_some()
            || self.tau_gen.is_some()
            || self.tau_uniq.is_some()
            || matches!(self.leakage, Some(LeakageRule::Reference { .. }))
    }

    /// Checks that thresholds are finite.
    pub fn validate(&self) -> Result<()> {
        let thresholds = [
            ("tau_img", self.tau_img),
            ("tau_gen", self.tau_gen),
            ("tau_uniq", self.tau_uniq),
            (
                "leakage threshold",
                match &self.leakage {
                    Some(LeakageRule::Reference { threshold, .. }) => Some(*threshold),
                    _ => None,
                },
            ),
        ];
        for (name, t) in thresholds {
            if let Some(t) = t {
                ensure!(t.is_finite(), "{name} must be a finite number, got {t}");
            }
        }
        Ok(())
    }
}

/// What one rule dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    /// Images dropped (including those of dropped identities).
    pub images: usize,
    /// Identities dropped (including those left without images).
    pub identities: usize,
}

/// Counts of a curation: input, per rule (in order) and kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurationCounts {
    /// Images before curation.
    pub input_images: usize,
    /// Identities before curation.
    pub input_identities: usize,
    /// Dropped by manual rejects.
    pub manual: RuleCount,
    /// Dropped by τ_img.
    pub tau_img: RuleCount,
    /// Dropped by τ_gen.
    pub tau_gen: RuleCount,
    /// Dropped by the leakage check.
    pub leakage: RuleCount,
    /// Dropped by τ_uniq.
    pub tau_uniq: RuleCount,
    /// Images kept.
    pub kept_images: usize,
    /// Identities kept.
    pub kept_identities: usize,
}

impl std::fmt::Display for CurationCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "input:          {:>8} images {:>7} identities",
            self.input_images, self.input_identities
        )?;
        for (name, c) in [
            ("manual rejects", self.manual),
            ("tau_img", self.tau_img),
            ("tau_gen", self.tau_gen),
            ("leakage", self.leakage),
            ("tau_uniq", self.tau_uniq),
        ] {
            writeln!(
                f,
                "- {name:<14} {:>7} images {:>7} identities",
                c.images, c.identities
            )?;
        }
        write!(
            f,
            "kept:           {:>8} images {:>7} identities",
            self.kept_images, self.kept_identities
        )
    }
}

/// The result of [`curate`].
#[derive(Debug, Clone, PartialEq)]
pub struct CurationOutcome {
    /// Counts per rule.
    pub counts: CurationCounts,
    /// Indices (into the input images) of the kept images, in input order.
    pub kept: Vec<usize>,
    /// Original identity index of each kept identity, ascending: the new contiguous label
    /// of identity `identity_map[k]` is `k`.
    pub identity_map: Vec<usize>,
}

impl CurationOutcome {
    /// New label of each kept image (parallel to [`CurationOutcome::kept`]).
    pub fn new_labels(&self, images: &[ImageId]) -> Vec<usize> {
        let new: BTreeMap<usize, usize> = self
            .identity_map
            .iter()
            .enumerate()
            .map(|(k, &id)| (id, k))
            .collect();
        self.kept
            .iter()
            .map(|&i| new.get(&images[i].identity).copied().unwrap_or(0))
            .collect()
    }
}

/// Applies `rules` to `images` (with their `embeddings`, row `i` for image `i`, when a rule
/// needs them; `reference` for a [`LeakageRule::Reference`] check).
pub fn curate(
    images: &[ImageId],
    embeddings: Option<&Embeddings>,
    reference: Option<&Embeddings>,
    rules: &CurationRules,
) -> Result<CurationOutcome> {
    rules.validate()?;
    let emb = match embeddings {
        Some(e) => {
            ensure!(
                e.len() == images.len(),
                "embeddings have {} rows but the dataset has {} images",
                e.len(),
                images.len()
            );
            Some(e.normalized())
        }
        None if rules.needs_embeddings() => {
            bail!("the tau_img/tau_gen/tau_uniq and reference-leakage rules need embeddings")
        }
        None => None,
    };
    // identity -> image indices, ascending identity then input order.
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, img) in images.iter().enumerate() {
        groups.entry(img.identity).or_default().push(i);
    }
    let mut counts = CurationCounts {
        input_images: images.len(),
        input_identities: groups.len(),
        ..Default::default()
    };

    // 1. Manual rejects.
    let rj = &rules.rejects;
    counts.manual = filter_images(&mut groups, |i| {
        let im = images[i];
        !(rj.identities.contains(&im.identity) || rj.images.contains(&(im.identity, im.sample)))
    });

    // 2. τ_img.
    if let (Some(tau), Some(emb)) = (rules.tau_img, &emb) {
        let mut keep = vec![true; images.len()];
        for members in groups.values() {
            let c = centroid(emb, members);
            for &i in members {
                keep[i] = dot(emb.row(i), &c) >= tau;
            }
        }
        counts.tau_img = filter_images(&mut groups, |i| keep[i]);
    }

    // 3. τ_gen.
    if let (Some(tau), Some(emb)) = (rules.tau_gen, &emb) {
        counts.tau_gen = filter_identities(&mut groups, |_, members| {
            mean_genuine(emb, members).is_some_and(|m| m >= f64::from(tau))
        });
    }

    let centroids: BTreeMap<usize, Vec<f32>> = match &emb {
        Some(emb) => groups
            .iter()
            .map(|(&id, members)| (id, centroid(emb, members)))
            .collect(),
        None => BTreeMap::new(),
    };

    // 4. Leakage.
    match &rules.leakage {
        Some(LeakageRule::Flagged { identities }) => {
            counts.leakage = filter_identities(&mut groups, |id, _| !identities.contains(&id));
        }
        Some(LeakageRule::Reference { threshold, path }) => {
            let reference =
                reference.ok_or_else(|| anyhow!("the leakage check needs {}", path.display()))?;
            let emb = emb
                .as_ref()
                .ok_or_else(|| anyhow!("the leakage check needs embeddings"))?;
            ensure!(
                reference.dim == emb.dim,
                "reference embeddings have width {} but the dataset's have {}",
                reference.dim,
                emb.dim
            );
            let flagged = leaked(&groups, emb, &reference.normalized(), *threshold);
            counts.leakage = filter_identities(&mut groups, |id, _| !flagged.contains(&id));
        }
        None => {}
    }

    // 5. τ_uniq (greedy, ascending identity index).
    if let Some(tau) = rules.tau_uniq {
        let mut kept: Vec<&[f32]> = Vec::new();
        counts.tau_uniq = filter_identities(&mut groups, |id, _| {
            let c = &centroids[&id];
            let clash = kept.par_iter().any(|k| dot(k, c) > tau);
            if !clash {
                kept.push(c);
            }
            !clash
        });
    }

    let mut kept: Vec<usize> = groups.values().flatten().copied().collect();
    kept.sort_unstable();
    counts.kept_images = kept.len();
    counts.kept_identities = groups.len();
    Ok(CurationOutcome {
        counts,
        kept,
        identity_map: groups.keys().copied().collect(),
    })
}

/// Keeps images for which `keep` holds; identities left empty are removed and counted.
fn filter_images(
    groups: &mut BTreeMap<usize, Vec<usize>>,
    mut keep: impl FnMut(usize) -> bool,
) -> RuleCount {
    let mut count = RuleCount::default();
    groups.retain(|_, members| {
        let before = members.len();
        members.retain(|&i| keep(i));
        count.images += before - members.len();
        let alive = !members.is_empty();
        count.identities += usize::from(!alive);
        alive
    });
    count
}

/// Keeps identities (visited in ascending index) for which `keep` holds.
fn filter_identities(
    groups: &mut BTreeMap<usize, Vec<usize>>,
    mut keep: impl FnMut(usize, &[usize]) -> bool,
) -> RuleCount {
    let mut count = RuleCount::default();
    groups.retain(|&id, members| {
        let alive = keep(id, members.as_slice());
        if !alive {
            count.identities += 1;
            count.images += members.len();
        }
        alive
    });
    count
}

/// Unit-norm mean of the (unit-norm) rows `members`.
fn centroid(emb: &Embeddings, members: &[usize]) -> Vec<f32> {
    let mut sum = vec![0f64; emb.dim];
    for &i in members {
        for (s, v) in sum.iter_mut().zip(emb.row(i)) {
            *s += f64::from(*v);
        }
    }
    let mut c: Vec<f32> = sum.iter().map(|v| *v as f32).collect();
    normalize(&mut c);
    c
}

/// Mean cosine similarity over all pairs; `None` below two images.
fn mean_genuine(emb: &Embeddings, members: &[usize]) -> Option<f64> {
    let n = members.len();
    if n < 2 {
        return None;
    }
    let mut total = 0f64;
    for (a, &i) in members.iter().enumerate() {
        for &j in &members[a + 1..] {
            total += f64::from(dot(emb.row(i), emb.row(j)));
        }
    }
    Some(total / (n * (n - 1) / 2) as f64)
}

/// Identities with an image more similar than `threshold` to some reference row (the
/// blocked search of the Analyze report).
fn leaked(
    groups: &BTreeMap<usize, Vec<usize>>,
    emb: &Embeddings,
    reference: &Embeddings,
    threshold: f32,
) -> BTreeSet<usize> {
    let rows: Vec<(usize, usize)> = groups
        .iter()
        .flat_map(|(&id, members)| members.iter().map(move |&i| (id, i)))
        .collect();
    let queries = emb.select(&rows.iter().map(|r| r.1).collect::<Vec<_>>());
    let best = best_matches(&queries.data, &reference.data, emb.dim, false);
    rows.iter()
        .zip(best)
        .filter(|(_, b)| b.is_some_and(|(_, s)| s > threshold))
        .map(|((id, _), _)| *id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eight identities of 2-D embeddings; every count below is worked out by hand in
    /// the comments.
    fn tiny() -> (Vec<ImageId>, Embeddings) {
        let rows: &[(usize, [f32; 2])] = &[
            // id0: centroid of (1,0),(1,0),(0,1) is (2,1)/√5: cos 2/√5 = 0.894 and
            // 1/√5 = 0.447 -> sample 2 fails tau_img 0.5.
            (0, [1.0, 0.0]),
            (0, [1.0, 0.0]),
            (0, [0.0, 1.0]),
            // id1: cos to centroid 0.707 (kept); genuine mean 0 < 0.5 -> tau_gen.
            (1, [1.0, 0.0]),
            (1, [0.0, 1.0]),
            // id2: centroid (0,1), kept everywhere.
            (2, [0.0, 1.0]),
            (2, [0.0, 1.0]),
            // id3: centroid (0.6,0.8): cos 0.8 with id2 > 0.7 -> tau_uniq (id0: 0.6).
            (3, [0.6, 0.8]),
            (3, [0.6, 0.8]),
            // id4: cos 0.8 with reference (-0.8,-0.6) > 0.75 -> leakage (the other kept
            // images score at most 0.6 against it).
            (4, [-1.0, 0.0]),
            (4, [-1.0, 0.0]),
            // id5: rejected manually as a whole.
            (5, [1.0, 0.0]),
            (5, [1.0, 0.0]),
            // id6: sample 1 rejected manually; the other two have genuine 0.8, centroid
            // (0.316,-0.949): cos 0.316 with id0, -0.949 with id2.
            (6, [0.0, -1.0]),
            (6, [1.0, 1.0]),
            (6, [0.6, -0.8]),
            // id7: its only image rejected manually -> identity emptied.
            (7, [0.0, 1.0]),
        ];
        let mut per: BTreeMap<usize, usize> = BTreeMap::new();
        let images = rows
            .iter()
            .map(|(id, _)| {
                let s = per.entry(*id).or_default();
                *s += 1;
                ImageId {
                    identity: *id,
                    sample: *s - 1,
                }
            })
            .collect();
        let data = rows.iter().flat_map(|(_, v)| *v).collect();
        (images, Embeddings::new(2, data).unwrap())
    }

    fn rules(leakage: LeakageRule) -> CurationRules {
        CurationRules {
            tau_img: Some(0.5),
            tau_gen: Some(0.5),
            tau_uniq: Some(0.7),
            leakage: Some(leakage),
            rejects: ManualRejects {
                images: [(6, 1), (7, 0)].into(),
                identities: [5].into(),
            },
        }
    }

    #[test]
    fn hand_computed_counts() {
        let (images, emb) = tiny();
        let reference = Embeddings::new(2, vec![-0.8, -0.6]).unwrap();
        let by_reference = rules(LeakageRule::Reference {
            path: "ref.npy".into(),
            threshold: 0.75,
        });
        let by_flags = rules(LeakageRule::Flagged {
            identities: [4].into(),
        });
        let want = CurationCounts {
            input_images: 17,
            input_identities: 8,
            // id5 (2 images) + (6,1) + (7,0); id5 and the emptied id7.
            manual: RuleCount {
                images: 4,
                identities: 2,
            },
            tau_img: RuleCount {
                images: 1,
                identities: 0,
            },
            tau_gen: RuleCount {
                images: 2,
                identities: 1,
            },
            leakage: RuleCount {
                images: 2,
                identities: 1,
            },
            tau_uniq: RuleCount {
                images: 2,
                identities: 1,
            },
            kept_images: 6,
            kept_identities: 3,
        };
        for r in [&by_reference, &by_flags] {
            let out = curate(&images, Some(&emb), Some(&reference), r).unwrap();
            assert_eq!(out.counts, want);
            assert_eq!(out.identity_map, vec![0, 2, 6]);
            assert_eq!(out.kept, vec![0, 1, 5, 6, 13, 15]);
            assert_eq!(out.new_labels(&images), vec![0, 0, 1, 1, 2, 2]);
        }
    }

    #[test]
    fn rules_without_embeddings() {
        let (images, _) = tiny();
        let manual_only = CurationRules {
            rejects: ManualRejects {
                images: [(0, 0)].into(),
                identities: [1, 99].into(),
            },
            ..Default::default()
        };
        let out = curate(&images, None, None, &manual_only).unwrap();
        assert_eq!(out.counts.manual.images, 3);
        assert_eq!(out.counts.manual.identities, 1);
        assert_eq!(out.counts.kept_images, 14);
        assert_eq!(out.identity_map, vec![0, 2, 3, 4, 5, 6, 7]);
        let err = curate(
            &images,
            None,
            None,
            &rules(LeakageRule::Flagged {
                identities: BTreeSet::new(),
            }),
        )
        .unwrap_err();
        assert!(err.to_string().contains("need embeddings"), "{err}");
        // No rules keep everything.
        let all = curate(&images, None, None, &CurationRules::default()).unwrap();
        assert_eq!(all.kept.len(), 17);
        assert_eq!(all.identity_map.len(), 8);
    }

    #[test]
    fn rejects_json_plain_and_session() {
        let plain = ManualRejects::from_json(r#"{"images": [[3, 1]], "identities": [2]}"#).unwrap();
        assert_eq!(plain.images, [(3, 1)].into());
        assert_eq!(plain.identities, [2].into());
        let session = r#"{"version": 1, "rejects": {"images": [[1, 0]], "identities": [0]},
            "grid": {"rows": [{"name": "a", "origin": "", "key": 40}, {"name": "b", "origin": "", "key": 41}]}}"#;
        let s = ManualRejects::from_json(session).unwrap();
        assert_eq!(s.images, [(41, 0)].into());
        assert_eq!(s.identities, [40].into());
        assert!(ManualRejects::from_json("[1, 2]").is_err());
    }
}
