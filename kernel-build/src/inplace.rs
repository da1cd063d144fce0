//! In-place builds of one source tree take turns: the builder holds an
//! exclusive lock on `.ktstr-build.lock` inside the tree around configure
//! and build, so a second run never rewrites `.config` under a running make.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fs4::fs_std::FileExt;

use crate::progress::note;

/// Lock file name inside the tree (kernel trees' `.gitignore` ignores `.*`).
pub const LOCK_FILE: &str = ".ktstr-build.lock";

/// The held lock of one tree; released on drop.
#[derive(Debug)]
pub struct TreeLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the tree's build lock, saying in one line when it has to wait.
pub fn lock(src: &Path) -> Result<TreeLock> {
    let path = src.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening build lock {}", path.display()))?;
    if !FileExt::try_lock_exclusive(&file).with_context(|| format!("locking {}", path.display()))? {
        note(format!("waiting for another in-place build of {} to finish (lock {})", src.display(), path.display()));
        FileExt::lock_exclusive(&file).with_context(|| format!("locking {}", path.display()))?;
    }
    Ok(TreeLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_locker_waits_for_the_first() {
        let d = tempfile::tempdir().unwrap();
        let first = lock(d.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.path().to_path_buf();
        let t = std::thread::spawn(move || {
            let l = lock(&dir).unwrap();
            tx.send(()).unwrap();
            l
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "got the lock while it was held");
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("the lock once released");
        drop(t.join().unwrap());
    }
}
