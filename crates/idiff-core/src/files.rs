//! Files that appear complete or not at all: written to a hidden temporary sibling (unique
//! per process and call), flushed to disk, then renamed over the destination; the temporary
//! file is removed when anything fails; the SHA-256 that records which file a result came
//! from; and which file names are images.

use anyhow::{anyhow, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Temporary sibling of `path` for an atomic write: `.{name}.tmp-{pid}-{n}`.
pub fn temp_path(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file path", path.display()))?;
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// The process id in a temporary name made by [`temp_path`], if `name` is one.
fn temp_owner(name: &str) -> Option<u32> {
    let (head, tail) = name.rsplit_once(".tmp-")?;
    let (pid, n) = tail.split_once('-')?;
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (head.starts_with('.') && numeric(n)).then(|| pid.parse().ok())?
}

/// Removes the temporary files that atomic writes of other processes left in `dir` (a run
/// killed mid-write), for a command that resumes into a folder it owns.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let owner = temp_owner(&e.file_name().to_string_lossy());
        if owner.is_some_and(|pid| pid != std::process::id()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    })
}

/// Runs `write` on a temporary sibling of `path`, then renames the result into place.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path)?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    rename_into_place(&tmp, path)
}

/// Writes `value` as pretty JSON through a temporary file and a rename.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_atomic(path, text.as_bytes())
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", h.finalize()))
}

/// Renames a finished temporary file over `path`, removing it if that fails.
pub fn rename_into_place(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        anyhow!("cannot rename {} to {}: {e}", tmp.display(), path.display())
    })
}

/// Extensions (lower case) of the image files every reader of the project decodes: PNG and
/// JPEG.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Whether `name` (a file name or path) ends in one of [`IMAGE_EXTENSIONS`], in any case.
pub fn is_image_name(name: impl AsRef<Path>) -> bool {
    name.as_ref()
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_are_png_and_jpeg_in_any_case() {
        for yes in ["a.png", "b.JPG", "dir/c.jpeg", "d.Png"] {
            assert!(is_image_name(yes), "{yes}");
        }
        for no in ["a.bmp", "b.webp", "png", "c.png.txt", ".jpg", "d"] {
            assert!(!is_image_name(no), "{no}");
        }
    }

    #[test]
    fn writes_replace_whole_files_and_failures_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let err = write_atomic_with(&dir.path().join("b.txt"), |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("b.txt"), "{err:#}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["a.txt"]);
        assert!(write_atomic(&dir.path().join("missing/c.txt"), b"x").is_err());
    }

    #[test]
    fn stale_temps_of_other_processes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let own = temp_path(&dir.path().join("m.json")).unwrap();
        let names = [
            ".m.json.tmp-1-0".to_owned(),
            own.file_name().unwrap().to_string_lossy().into_owned(),
            "m.json".to_owned(),
            ".m.json.tmp-x-0".to_owned(),
            "a.tmp-1-2".to_owned(),
        ];
        for n in &names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        remove_stale_temps(dir.path());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = names[1..].to_vec();
        want.sort();
        assert_eq!(left, want);
    }
}
