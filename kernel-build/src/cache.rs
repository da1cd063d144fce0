//! The kernel cache: one directory per key under the cache root, atomic
//! stores (temp dir beside the entry, then rename), and fs4 file locks:
//! shared for readers, exclusive for writers and for removal.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use fs4::fs_std::FileExt;
use serde::{Deserialize, Serialize};

use crate::progress::note;
use crate::tree;

/// Overrides the cache root.
pub const CACHE_DIR_ENV: &str = "KTSTR_CACHE_DIR";
const METADATA: &str = "metadata.json";
const TMP_PREFIX: &str = ".tmp-";
/// A temp dir without its lock file is only stale once it is this old
/// (its creator may be between mkdir and taking the lock).
const UNLOCKED_TMP_GRACE: Duration = Duration::from_secs(120);

/// `$XDG_CACHE_HOME`, else `~/.cache`.
pub fn user_cache_home() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(x);
    }
    let home = std::env::var_os("HOME").filter(|s| !s.is_empty()).unwrap_or_else(|| "/".into());
    PathBuf::from(home).join(".cache")
}

/// `$KTSTR_CACHE_DIR`, else `$XDG_CACHE_HOME/ktstr/kernels`, else `~/.cache/ktstr/kernels`.
pub fn default_root() -> PathBuf {
    match std::env::var_os(CACHE_DIR_ENV).filter(|s| !s.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => user_cache_home().join("ktstr/kernels"),
    }
}

/// `{version}-tarball-{arch}-kc{kc}`
pub fn tarball_key(version: &str) -> String {
    format!("{}-tarball-{}-kc{}", sanitize_key_part(version), tree::arch(), crate::kconfig_hash())
}

/// `{ref}-git-{hash7}-{arch}-kc{kc}`
pub fn git_key(git_ref: &str, commit: &str) -> String {
    format!("{}-git-{}-{}-kc{}", sanitize_key_part(git_ref), &commit[..7.min(commit.len())], tree::arch(), crate::kconfig_hash())
}

/// `local-{hash7}-{arch}-kc{kc}`
pub fn local_key(commit: &str) -> String {
    format!("local-{}-{}-kc{}", &commit[..7.min(commit.len())], tree::arch(), crate::kconfig_hash())
}

/// Keys are directory names: a ref like `for-next/x` becomes `for-next_x`.
fn sanitize_key_part(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-+".contains(c) { c } else { '_' }).collect()
}

/// What `metadata.json` in every entry holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    pub key: String,
    /// The spec as the user wrote it.
    pub spec: String,
    /// Where the source came from: tarball path/URL, git URL + commit, tree path.
    pub source: String,
    pub version: String,
    pub arch: String,
    pub kconfig_hash: String,
    /// Base config the fragment was merged onto.
    pub base: String,
    /// Unix seconds when the entry was stored.
    pub build_time: u64,
    /// Wall seconds the fetch+configure+build took.
    pub build_duration_secs: f64,
    /// Size of the boot image in bytes.
    pub image_size: u64,
}

/// One complete entry of the cache.
#[derive(Debug, Clone)]
pub struct CacheEntry {
    pub key: String,
    pub dir: PathBuf,
    pub meta: Metadata,
}

impl CacheEntry {
    pub fn image(&self) -> PathBuf {
        self.dir.join(tree::image_name())
    }
    pub fn vmlinux(&self) -> Option<PathBuf> {
        Some(self.dir.join("vmlinux")).filter(|p| p.is_file())
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join(".config")
    }
    /// Bytes used by the entry's files.
    pub fn disk_size(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0)
    }
}

/// A held lock on one cache key; released on drop.
#[derive(Debug)]
pub struct EntryLock {
    _file: File,
    pub path: PathBuf,
    pub exclusive: bool,
}

/// Lock file of an entry: `{root}/{key}.lock`, beside the entry directory
/// (the entry itself only appears at the final rename).
pub fn entry_lock_path(entry_dir: &Path) -> PathBuf {
    let mut s = entry_dir.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

fn acquire(path: &Path, exclusive: bool, blocking: bool) -> Result<Option<EntryLock>> {
    loop {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        let got = match (exclusive, blocking) {
            (true, true) => FileExt::lock_exclusive(&f).map(|_| true),
            (false, true) => FileExt::lock_shared(&f).map(|_| true),
            (true, false) => FileExt::try_lock_exclusive(&f),
            (false, false) => FileExt::try_lock_shared(&f),
        }
        .with_context(|| format!("locking {}", path.display()))?;
        if !got {
            return Ok(None);
        }
        // `clean` unlinks lock files of removed entries: if ours was unlinked
        // while we waited, it guards nothing, so start over on the new file.
        let same = match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            return Ok(Some(EntryLock { _file: f, path: path.to_path_buf(), exclusive }));
        }
    }
}

/// Shared lock on an entry directory, for consumers that read its image
/// (hold it for as long as a VM may read the files).
pub fn lock_entry_shared(entry_dir: &Path) -> Result<EntryLock> {
    Ok(acquire(&entry_lock_path(entry_dir), false, true)?.expect("blocking lock returns a lock"))
}

/// Non-blocking variant of [`lock_entry_shared`]: `None` while a writer holds it.
pub fn try_lock_entry_shared(entry_dir: &Path) -> Result<Option<EntryLock>> {
    acquire(&entry_lock_path(entry_dir), false, false)
}

/// A build directory beside the entries, removed on drop. Its own `.lock`
/// (held while alive) tells the next run whether it is stale.
#[derive(Debug)]
pub struct TempBuild {
    pub dir: PathBuf,
    _lock: Option<EntryLock>,
}

impl TempBuild {
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempBuild {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Result of [`Cache::clean`].
#[derive(Debug, Default)]
pub struct CleanReport {
    pub removed: Vec<String>,
    /// Entries kept because someone holds their lock.
    pub locked: Vec<String>,
    /// Named keys that do not exist.
    pub missing: Vec<String>,
}

/// The cache at one root directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Cache {
    /// Opens (creating) the cache at `root` or [`default_root`], and removes
    /// temp dirs left by killed runs.
    pub fn open(root: Option<&Path>) -> Result<Cache> {
        let root = root.map(Path::to_path_buf).unwrap_or_else(default_root);
        std::fs::create_dir_all(&root).with_context(|| format!("creating kernel cache {}", root.display()))?;
        let c = Cache { root };
        c.clean_stale_temps();
        Ok(c)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// The complete entry named `key`, if present.
    pub fn lookup(&self, key: &str) -> Option<CacheEntry> {
        let dir = self.entry_dir(key);
        let meta: Metadata = serde_json::from_slice(&std::fs::read(dir.join(METADATA)).ok()?).ok()?;
        let e = CacheEntry { key: key.to_string(), dir, meta };
        e.image().is_file().then_some(e)
    }

    pub fn lock_shared(&self, key: &str) -> Result<EntryLock> {
        lock_entry_shared(&self.entry_dir(key))
    }

    /// Exclusive lock for a writer; says so when it has to wait.
    pub fn lock_exclusive(&self, key: &str) -> Result<EntryLock> {
        let path = entry_lock_path(&self.entry_dir(key));
        if let Some(l) = acquire(&path, true, false)? {
            return Ok(l);
        }
        note(format!("waiting for the lock on {key} (another build or a running test holds {})", path.display()));
        Ok(acquire(&path, true, true)?.expect("blocking lock returns a lock"))
    }

    pub fn try_lock_exclusive(&self, key: &str) -> Result<Option<EntryLock>> {
        acquire(&entry_lock_path(&self.entry_dir(key)), true, false)
    }

    /// A fresh temp dir `{root}/.tmp-{key}-XXXXXX` for building `key`.
    pub fn temp_build(&self, key: &str) -> Result<TempBuild> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{key}-"))
            .tempdir_in(&self.root)
            .with_context(|| format!("creating a build dir in {}", self.root.display()))?
            .keep();
        let lock = acquire(&dir.join(".lock"), true, false)?;
        Ok(TempBuild { dir, _lock: lock })
    }

    /// Removes `.tmp-*` dirs whose owner is gone (its lock is free).
    pub fn clean_stale_temps(&self) {
        let Ok(rd) = std::fs::read_dir(&self.root) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            if !name.to_string_lossy().starts_with(TMP_PREFIX) || !e.path().is_dir() {
                continue;
            }
            let dir = e.path();
            let lockp = dir.join(".lock");
            let stale = if lockp.exists() {
                matches!(acquire(&lockp, true, false), Ok(Some(_)))
            } else {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > UNLOCKED_TMP_GRACE)
            };
            if stale {
                note(format!("removing leftover build dir {}", dir.display()));
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }

    /// Moves a finished build into place as `key`. The caller holds the
    /// exclusive lock. Files under the temp dir are moved, others copied
    /// (in-place builds of a local tree). An existing entry is replaced.
    pub fn store(
        &self,
        _lock: &EntryLock,
        tmp: &TempBuild,
        artifacts: &crate::build::Artifacts,
        log: Option<&Path>,
        mut meta: Metadata,
    ) -> Result<CacheEntry> {
        let staged = tmp.dir.join("entry");
        std::fs::create_dir_all(&staged)?;
        let put = |from: &Path, name: &str| -> Result<()> {
            let to = staged.join(name);
            if from.starts_with(&tmp.dir) {
                std::fs::rename(from, &to)
            } else {
                std::fs::copy(from, &to).map(|_| ())
            }
            .with_context(|| format!("storing {} in the cache", from.display()))
        };
        put(&artifacts.image, tree::image_name())?;
        if let Some(v) = &artifacts.vmlinux {
            put(v, "vmlinux")?;
        }
        put(&artifacts.config, ".config")?;
        if let Some(l) = log {
            let _ = std::fs::copy(l, staged.join("build.log"));
        }
        meta.image_size = std::fs::metadata(staged.join(tree::image_name()))?.len();
        meta.build_time = now_secs();
        std::fs::write(staged.join(METADATA), serde_json::to_vec_pretty(&meta)?)?;
        File::open(&staged)?.sync_all().ok();
        let dest = self.entry_dir(&meta.key);
        if dest.exists() {
            // --force: move the old entry into the temp dir, dropped with it.
            std::fs::rename(&dest, tmp.dir.join("old"))?;
        }
        std::fs::rename(&staged, &dest).with_context(|| format!("renaming into {}", dest.display()))?;
        Ok(CacheEntry { key: meta.key.clone(), dir: dest, meta })
    }

    /// Every complete entry, newest first.
    pub fn list(&self) -> Result<Vec<CacheEntry>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).with_context(|| format!("reading {}", self.root.display()))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !e.path().is_dir() {
                continue;
            }
            if let Some(entry) = self.lookup(&name) {
                out.push(entry);
            }
        }
        out.sort_by(|a, b| b.meta.build_time.cmp(&a.meta.build_time).then(a.key.cmp(&b.key)));
        Ok(out)
    }

    /// The newest entry, e.g. for discovery when no kernel was named.
    pub fn newest(&self) -> Option<CacheEntry> {
        self.list().ok()?.into_iter().next()
    }

    /// Removes the named entries, or all but the `keep` newest, or everything.
    /// An entry whose lock is held by anyone is left alone.
    pub fn clean(&self, keep: Option<usize>, keys: &[String]) -> Result<CleanReport> {
        let mut report = CleanReport::default();
        let targets: Vec<String> = if !keys.is_empty() {
            let mut t = Vec::new();
            for k in keys {
                if self.entry_dir(k).is_dir() && !k.starts_with('.') && !k.contains('/') {
                    t.push(k.clone());
                } else {
                    report.missing.push(k.clone());
                }
            }
            t
        } else {
            self.list()?.into_iter().skip(keep.unwrap_or(0)).map(|e| e.key).collect()
        };
        for key in targets {
            let Some(lock) = self.try_lock_exclusive(&key)? else {
                report.locked.push(key);
                continue;
            };
            // Rename first so a half-removed entry is never visible under its key.
            let doomed = self.root.join(format!("{TMP_PREFIX}rm-{key}-{}", std::process::id()));
            std::fs::rename(self.entry_dir(&key), &doomed).with_context(|| format!("removing {key}"))?;
            let _ = std::fs::remove_dir_all(&doomed);
            let _ = std::fs::remove_file(self.root.join(format!("{key}.log")));
            let _ = std::fs::remove_file(&lock.path);
            drop(lock);
            report.removed.push(key);
        }
        Ok(report)
    }
}

/// Read-side helpers for consumers that never build (test binaries).
impl Cache {
    /// The cache at `root` or [`default_root`] as it is: nothing is created
    /// or cleaned, so a missing root just has no entries.
    pub fn at(root: Option<&Path>) -> Cache {
        Cache { root: root.map(Path::to_path_buf).unwrap_or_else(default_root) }
    }

    /// The key of the entry directory directly holding `file` (an image),
    /// when that directory is an entry of this cache.
    pub fn key_of(&self, file: &Path) -> Option<String> {
        let dir = file.parent()?.canonicalize().ok()?;
        let root = self.root.canonicalize().ok()?;
        if dir.parent() != Some(root.as_path()) {
            return None;
        }
        let key = dir.file_name()?.to_str()?.to_string();
        (!key.starts_with('.')).then_some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_entry(c: &Cache, key: &str, t: u64) {
        let d = c.entry_dir(key);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(tree::image_name()), b"img").unwrap();
        let meta = Metadata {
            key: key.into(),
            spec: "s".into(),
            source: "src".into(),
            version: "6.12".into(),
            arch: tree::arch().into(),
            kconfig_hash: crate::kconfig_hash(),
            base: "tinyconfig".into(),
            build_time: t,
            build_duration_secs: 1.0,
            image_size: 3,
        };
        std::fs::write(d.join(METADATA), serde_json::to_vec(&meta).unwrap()).unwrap();
    }

    #[test]
    fn keys() {
        let kc = crate::kconfig_hash();
        let a = tree::arch();
        assert_eq!(tarball_key("6.12.9"), format!("6.12.9-tarball-{a}-kc{kc}"));
        assert_eq!(git_key("for-next/x", "0123456789abcdef"), format!("for-next_x-git-0123456-{a}-kc{kc}"));
        assert_eq!(local_key("0123456789abcdef"), format!("local-0123456-{a}-kc{kc}"));
        assert!(crate::spec::looks_like_cache_key(&tarball_key("6.12.9")));
    }

    #[test]
    fn list_clean_and_locks() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(Some(d.path())).unwrap();
        fake_entry(&c, "a", 1);
        fake_entry(&c, "b", 3);
        fake_entry(&c, "c", 2);
        std::fs::create_dir(d.path().join("incomplete")).unwrap();
        let keys: Vec<String> = c.list().unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["b", "c", "a"]);

        // A reader's shared lock protects "a" from clean.
        let reader = c.lock_shared("a").unwrap();
        assert!(c.try_lock_exclusive("a").unwrap().is_none());
        let r = c.clean(Some(1), &[]).unwrap();
        assert_eq!(r.removed, ["c"]);
        assert_eq!(r.locked, ["a"]);
        drop(reader);
        let r = c.clean(None, &["a".into(), "nope".into()]).unwrap();
        assert_eq!(r.removed, ["a"]);
        assert_eq!(r.missing, ["nope"]);
        assert_eq!(c.list().unwrap().len(), 1);
    }

    #[test]
    fn stale_temps_removed_live_kept() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(Some(d.path())).unwrap();
        let live = c.temp_build("k").unwrap();
        let stale = d.path().join(".tmp-k-dead");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join(".lock"), b"").unwrap();
        c.clean_stale_temps();
        assert!(live.path().is_dir());
        assert!(!stale.exists());
        let p = live.path().to_path_buf();
        drop(live);
        assert!(!p.exists());
    }
}
