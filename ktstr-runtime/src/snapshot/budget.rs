//! The snapshot store's size budget: saves are cheap to make again, and
//! every kernel, topology or runtime change makes new ones, so the least
//! recently used go once the store outgrows `KTSTR_SNAPSHOT_CACHE_MIB`.

use std::path::Path;
use std::time::SystemTime;

use kernel_build::Cache;

/// `KTSTR_SNAPSHOT_CACHE_MIB`: the store's budget.
pub const ENV: &str = "KTSTR_SNAPSHOT_CACHE_MIB";
/// Without [`ENV`]: room for ~40 saves of 512 MiB guests.
pub const DEFAULT_MIB: u64 = 4096;
/// The file whose modification time says when a save was last used.
const STAMP: &str = "meta.json";

/// The budget in bytes.
pub fn from_env() -> u64 {
    let mib = std::env::var(ENV).ok().and_then(|v| v.trim().parse().ok());
    mib.unwrap_or(DEFAULT_MIB) << 20
}

/// Marks the save in `dir` as used now (best effort).
pub fn touch(dir: &Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(dir.join(STAMP)) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Bytes a directory's files take on disk (the RAM files are sparse).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()
}

/// Removes the least recently used saves until the rest fit in `budget`
/// bytes, never `keep` (the save just written) and never one a test holds
/// locked (restoring or writing it). Returns the keys removed.
pub fn prune(cache: &Cache, budget: u64, keep: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(cache.root()) else { return Vec::new() };
    let mut saves: Vec<(SystemTime, u64, String)> = rd
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Temp dirs of writers and removals start with '.'.
        .filter(|k| !k.starts_with('.'))
        .map(|k| {
            let dir = cache.entry_dir(&k);
            let used = std::fs::metadata(dir.join(STAMP)).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            (used, disk_bytes(&dir), k)
        })
        .collect();
    let mut total: u64 = saves.iter().map(|s| s.1).sum();
    saves.sort();
    let mut removed = Vec::new();
    for (_, bytes, key) in saves {
        if total <= budget {
            break;
        }
        if key == keep {
            continue;
        }
        if cache.clean(None, std::slice::from_ref(&key)).is_ok_and(|r| r.removed.contains(&key)) {
            total -= bytes;
            removed.push(key);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn save(cache: &Cache, key: &str, mib: usize, age_s: u64) {
        let dir = cache.entry_dir(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), vec![1u8; mib << 20]).unwrap();
        let f = std::fs::File::create(dir.join(STAMP)).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s)).unwrap();
    }

    #[test]
    fn prune_removes_least_recently_used_unlocked_saves() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(Some(dir.path())).unwrap();
        save(&cache, "old", 2, 300);
        save(&cache, "held", 2, 200);
        save(&cache, "mid", 2, 100);
        save(&cache, "new", 2, 0);
        // A restoring test holds "held" shared: it stays whatever its age.
        let held = kernel_build::cache::try_lock_entry_shared(&cache.entry_dir("held")).unwrap().unwrap();
        // Used again just now: "old" becomes the newest.
        touch(&cache.entry_dir("old"));
        let removed = prune(&cache, 6 << 20, "new");
        assert_eq!(removed, ["mid"], "the least recently used unlocked save first");
        assert!(cache.entry_dir("held").is_dir() && cache.entry_dir("old").is_dir() && cache.entry_dir("new").is_dir());
        let removed = prune(&cache, 1 << 20, "new");
        assert_eq!(removed, ["old"], "never the kept save, never a locked one");
        drop(held);
        assert_eq!(prune(&cache, 1 << 20, "new"), ["held"]);
        assert!(prune(&cache, 1 << 20, "new").is_empty() && cache.entry_dir("new").is_dir());
    }
}
