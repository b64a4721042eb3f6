//! Atomic output folders: everything is written into `OUT.partial/`, which is renamed to
//! `OUT` only when complete. An error, a cancel or a panic removes `OUT.partial/`, so a
//! destination is either absent or whole.

use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// A folder being written; see the module docs.
#[derive(Debug)]
pub struct StagedDir {
    out: PathBuf,
    partial: PathBuf,
    committed: bool,
}

/// `out` with `.partial` appended to its last component.
pub fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Checks that `out` could be created: it does not exist and its parent is an existing
/// folder. Errors are one line.
pub fn check_destination(out: &Path) -> Result<()> {
    if out.file_name().is_none() {
        bail!("{} is not a usable destination folder name", out.display());
    }
    if out.exists() {
        bail!(
            "destination {} already exists; choose a new folder",
            out.display()
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        bail!(
            "cannot write {}: parent folder {} does not exist",
            out.display(),
            parent.display()
        );
    }
    if !parent.is_dir() {
        bail!(
            "cannot write {}: {} is not a folder",
            out.display(),
            parent.display()
        );
    }
    Ok(())
}

impl StagedDir {
    /// Starts writing `out`: checks the destination, removes a stale `OUT.partial/` and
    /// creates a fresh one.
    pub fn create(out: &Path) -> Result<Self> {
        check_destination(out)?;
        let partial = partial_path(out);
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .map_err(|e| anyhow!("cannot remove stale {}: {e}", partial.display()))?;
        }
        std::fs::create_dir(&partial).map_err(|e| {
            anyhow!(
                "cannot write {}: cannot create {}: {e}",
                out.display(),
                partial.display()
            )
        })?;
        Ok(Self {
            out: out.to_path_buf(),
            partial,
            committed: false,
        })
    }

    /// The folder to write into (`OUT.partial/`).
    pub fn path(&self) -> &Path {
        &self.partial
    }

    /// The final destination.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Renames `OUT.partial/` to `OUT`.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.out.exists() {
            bail!(
                "destination {} appeared while writing; {} left in place",
                self.out.display(),
                self.partial.display()
            );
        }
        std::fs::rename(&self.partial, &self.out).map_err(|e| {
            anyhow!(
                "cannot rename {} to {}: {e}",
                self.partial.display(),
                self.out.display()
            )
        })?;
        self.committed = true;
        Ok(self.out.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_renames_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let staged = StagedDir::create(&out).unwrap();
        std::fs::write(staged.path().join("a"), b"1").unwrap();
        assert!(!out.exists());
        staged.commit().unwrap();
        assert_eq!(std::fs::read(out.join("a")).unwrap(), b"1");
        assert!(StagedDir::create(&out)
            .unwrap_err()
            .to_string()
            .contains("already exists"));

        let other = dir.path().join("other");
        {
            let staged = StagedDir::create(&other).unwrap();
            std::fs::write(staged.path().join("a"), b"1").unwrap();
        }
        assert!(!other.exists() && !partial_path(&other).exists());

        let file = dir.path().join("file.txt");
        std::fs::write(&file, b"x").unwrap();
        let err = StagedDir::create(&file.join("out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a folder"), "{err}");
        let err = StagedDir::create(&dir.path().join("missing/out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
