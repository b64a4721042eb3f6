//! `merge`: joins the outputs of `generate --shard i/N` (i = 0..N-1) into one dataset that is
//! byte-identical to a single unsharded run: the identity folders, `grid.png` and a
//! `manifest.json` equal to the one the single run writes.
//!
//! Checks before anything is written: every shard manifest is complete, all agree on
//! everything but the shard, shards `0..N-1` are each present exactly once, and each holds
//! exactly the identities its shard owns (position p with p mod N == i). The result is
//! written atomically ([`StagedDir`]).

use super::staging::StagedDir;
use crate::files::write_json_atomic;
use crate::generate::{identity_dir_name, write_grid, Generation, IdentitySource, Manifest};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// Counts of a merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeSummary {
    /// Shards joined.
    pub shards: usize,
    /// Identities in the merged dataset.
    pub identities: usize,
    /// Image files copied.
    pub images: usize,
}

/// Merges `shards` (in any order) into `out`.
pub fn merge(shards: &[PathBuf], out: &Path) -> Result<MergeSummary> {
    ensure!(!shards.is_empty(), "give the shard folders with --from");
    let manifests = shards
        .iter()
        .map(|d| read_manifest(d))
        .collect::<Result<Vec<_>>>()?;
    let merged = check(shards, &manifests)?;
    let staged = StagedDir::create(out)?;
    let mut images = 0;
    for (dir, m) in shards.iter().zip(&manifests) {
        for &id in &m.completed {
            images += copy_identity(
                &dir.join(identity_dir_name(id)),
                &staged.path().join(identity_dir_name(id)),
            )?;
        }
    }
    write_grid(staged.path(), &merged)?;
    write_json_atomic(&staged.path().join("manifest.json"), &merged)?;
    staged.commit()?;
    Ok(MergeSummary {
        shards: shards.len(),
        identities: merged.completed.len(),
        images,
    })
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a generate output: cannot read {}",
            dir.display(),
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not a generate manifest: {e}", path.display()))
}

/// Validates the shard manifests and returns the single-run manifest.
fn check(dirs: &[PathBuf], manifests: &[Manifest]) -> Result<Manifest> {
    let first = &manifests[0];
    let count = match first.generation.shard {
        Some(s) => s.count,
        None => bail!(
            "{} is not a shard (generated without --shard)",
            dirs[0].display()
        ),
    };
    let unsharded = |m: &Manifest| Generation {
        shard: None,
        ..m.generation.clone()
    };
    let mut seen: Vec<Option<&Path>> = vec![None; count];
    for (dir, m) in dirs.iter().zip(manifests) {
        let Some(shard) = m.generation.shard else {
            bail!(
                "{} is not a shard (generated without --shard)",
                dir.display()
            );
        };
        ensure!(
            shard.count == count,
            "{} is shard {}/{} but {} is of {count} shards",
            dir.display(),
            shard.index,
            shard.count,
            dirs[0].display()
        );
        if unsharded(m) != unsharded(first) || m.seed_contract != first.seed_contract {
            bail!(
                "{} and {} come from different generations ({})",
                dirs[0].display(),
                dir.display(),
                difference(&unsharded(first), &unsharded(m))
            );
        }
        ensure!(
            m.status == "complete" && m.completed.len() == m.total_identities,
            "{} (shard {}/{count}) is incomplete: {} of {} identities; finish it with its generate command",
            dir.display(),
            shard.index,
            m.completed.len(),
            m.total_identities
        );
        if let Some(other) = seen[shard.index] {
            bail!(
                "shard {}/{count} given twice: {} and {}",
                shard.index,
                other.display(),
                dir.display()
            );
        }
        seen[shard.index] = Some(dir);
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| format!("{i}/{count}"))
        .collect();
    ensure!(missing.is_empty(), "missing shards: {}", missing.join(", "));

    // Each shard must hold exactly its identities (positions p with p mod N == i).
    let total: usize = manifests.iter().map(|m| m.total_identities).sum();
    let first_index = match &first.generation.identities {
        IdentitySource::Random {
            count: n, first, ..
        }
        | IdentitySource::Procface { count: n, first } => {
            ensure!(
                *n == total,
                "the shards hold {total} identities but the run has {n}"
            );
            *first
        }
        IdentitySource::File { .. } => 0,
    };
    for (dir, m) in dirs.iter().zip(manifests) {
        let shard = m.generation.shard.map_or(0, |s| s.index);
        let want: Vec<usize> = (0..total)
            .filter(|p| p % count == shard)
            .map(|p| first_index + p)
            .collect();
        ensure!(
            m.completed == want,
            "{} does not hold the identities of shard {shard}/{count}",
            dir.display()
        );
        for &id in &m.completed {
            let d = dir.join(identity_dir_name(id));
            ensure!(d.is_dir(), "{} is missing", d.display());
        }
    }
    let mut completed: Vec<usize> = manifests
        .iter()
        .flat_map(|m| m.completed.iter().copied())
        .collect();
    completed.sort_unstable();
    Ok(Manifest {
        tool: format!("idiff-studio {}", env!("CARGO_PKG_VERSION")),
        seed_contract: first.seed_contract,
        generation: unsharded(first),
        completed,
        total_identities: total,
        status: "complete".into(),
    })
}

fn difference(a: &Generation, b: &Generation) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, v) in a {
            if b.get(k) != Some(v) {
                return format!("`{k}` differs");
            }
        }
    }
    "seed contract differs".into()
}

/// Copies the files of one identity folder; returns how many.
fn copy_identity(from: &Path, to: &Path) -> Result<usize> {
    std::fs::create_dir(to).with_context(|| format!("cannot create {}", to.display()))?;
    let mut n = 0;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
    {
        let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
        let src = entry.path();
        if src.is_file() {
            let dst = to.join(entry.file_name());
            std::fs::copy(&src, &dst)
                .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
            n += 1;
        }
    }
    Ok(n)
}
