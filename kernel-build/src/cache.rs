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
/// Files of an entry that travel with its image (archives, the remote
/// cache); `vmlinux` is optional, the build log stays.
pub const ENTRY_FILES: [&str; 3] = ["vmlinux", ".config", METADATA];
const TMP_PREFIX: &str = ".tmp-";
/// Per-key build durations (`{root}/.timings/{key}`, seconds as text):
/// they outlive `kernel clean`, so a rebuild after a clean still has an ETA.
const TIMINGS: &str = ".timings";
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

/// The timing-record id of the last build under a kernel label (beside
/// the per-key records; never a cache key, which has no `label:` prefix).
pub fn label_timing_id(label: &str) -> String {
    format!("label:{label}")
}

/// `{version}-tarball-{arch}-kc{kc}`: a release tarball from the mirror,
/// verified against the mirror's SHA-256 sums.
pub fn tarball_key(version: &str, kc: &str) -> String {
    format!("{}-tarball-{}-kc{kc}", sanitize_key_part(version), tree::arch())
}

/// `{version}-tarball-{src7}-{arch}-kc{kc}`: any other tarball, by content.
pub fn source_tarball_key(version: &str, sha256: &str, kc: &str) -> String {
    format!("{}-tarball-{}-{}-kc{kc}", sanitize_key_part(version), &sha256[..7.min(sha256.len())], tree::arch())
}

/// `{ref}-git-{hash7}-{arch}-kc{kc}`
pub fn git_key(git_ref: &str, commit: &str, kc: &str) -> String {
    format!("{}-git-{}-{}-kc{kc}", sanitize_key_part(git_ref), &commit[..7.min(commit.len())], tree::arch())
}

/// `local-{hash7}-{arch}-kc{kc}`
pub fn local_key(commit: &str, kc: &str) -> String {
    format!("local-{}-{}-kc{kc}", &commit[..7.min(commit.len())], tree::arch())
}

/// Key schema of entries whose `kc` covers every configuration input and
/// whose non-mirror tarballs are keyed by content. Older entries have none.
pub const KEY_SCHEMA: u32 = 2;

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
    /// [`KEY_SCHEMA`] when the key covers every input; 0 (absent) in older entries.
    #[serde(default)]
    pub key_schema: u32,
    /// `mirror`, `tarball`, `git` or `local`.
    #[serde(default)]
    pub source_kind: String,
    /// SHA-256 of the source tarball, when the source was one.
    #[serde(default)]
    pub source_sha256: Option<String>,
    /// The base as hashed into `kc`: `tinyconfig`, `defconfig`, `config-sha256:…`.
    #[serde(default)]
    pub base_digest: String,
    /// SHA-256 of the ktstr.kconfig the entry was built with.
    #[serde(default)]
    pub kconfig_sha256: String,
    /// The `--extra-kconfig` file and the SHA-256 of its bytes.
    #[serde(default)]
    pub extra_kconfig: Option<String>,
    #[serde(default)]
    pub extra_kconfig_sha256: Option<String>,
}

impl Metadata {
    /// Why a resolve must not reuse this entry, or `None` when its key is
    /// what today's key function gives for its recorded inputs.
    pub fn stale_reason(&self) -> Option<String> {
        if self.key_schema != KEY_SCHEMA {
            return Some("old key shape (built before keys covered every build input)".into());
        }
        let digest = crate::config::InputDigest {
            base: self.base_digest.clone(),
            kconfig_sha256: self.kconfig_sha256.clone(),
            extra_sha256: self.extra_kconfig_sha256.clone(),
        };
        if !self.key.ends_with(&format!("-kc{}", digest.kc())) {
            return Some("kc does not match the recorded configuration inputs".into());
        }
        if self.kconfig_sha256 != crate::sha256_hex(crate::KCONFIG.as_bytes()) {
            return Some("built with another ktstr.kconfig".into());
        }
        if self.source_kind == "tarball" {
            let src7 = self.source_sha256.as_deref().map(|s| &s[..7.min(s.len())]).unwrap_or("?");
            if !self.key.contains(&format!("-tarball-{src7}-")) {
                return Some("tarball entry not keyed by its SHA-256".into());
            }
        }
        None
    }
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

    fn timing_path(&self, id: &str) -> PathBuf {
        self.root.join(TIMINGS).join(id.replace('/', "_"))
    }

    /// Remembers that building `id` (a cache key, or an uncached tree's
    /// label) took `secs`. Best effort: a failure only costs a later ETA.
    pub fn record_duration(&self, id: &str, secs: f64) {
        let path = self.timing_path(id);
        let Some(dir) = path.parent() else { return };
        let _ = std::fs::create_dir_all(dir);
        // Temp file + rename: a concurrent reader never sees half a number.
        if let Ok(mut f) = tempfile::NamedTempFile::new_in(dir) {
            use std::io::Write;
            if writeln!(f, "{secs:.1}").is_ok() {
                let _ = f.persist(&path);
            }
        }
    }

    /// How long the previous build of `id` took, for an ETA: its timing
    /// record, else the metadata of an entry under that key (a `--force`
    /// rebuild or a stale entry), else the newest entry built from the same
    /// `source` (other configuration, or an old key shape).
    pub fn previous_duration(&self, id: &str, source: Option<&str>) -> Option<Duration> {
        let positive = |s: f64| (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s));
        if let Some(d) = std::fs::read_to_string(self.timing_path(id)).ok().and_then(|t| t.trim().parse::<f64>().ok()).and_then(positive) {
            return Some(d);
        }
        if let Some(d) = self.lookup(id).and_then(|e| positive(e.meta.build_duration_secs)) {
            return Some(d);
        }
        let source = source?;
        self.list()
            .ok()?
            .into_iter()
            .filter(|e| e.meta.source == source && positive(e.meta.build_duration_secs).is_some())
            .max_by_key(|e| e.meta.build_time)
            .and_then(|e| positive(e.meta.build_duration_secs))
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
        lock: &EntryLock,
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
        self.install(lock, tmp, &staged, meta)
    }

    /// Puts a complete entry directory `staged` (inside `tmp`, e.g. a
    /// verified download) in place as `meta.key`, like [`Cache::store`] does
    /// a build: one rename, under the caller's exclusive lock. `meta` is the
    /// parsed `staged/metadata.json`.
    pub fn install(&self, _lock: &EntryLock, tmp: &TempBuild, staged: &Path, meta: Metadata) -> Result<CacheEntry> {
        File::open(staged)?.sync_all().ok();
        let dest = self.entry_dir(&meta.key);
        if dest.exists() {
            // --force: move the old entry into the temp dir, dropped with it.
            std::fs::rename(&dest, tmp.dir.join("old"))?;
        }
        std::fs::rename(staged, &dest).with_context(|| format!("renaming into {}", dest.display()))?;
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

    /// The newest entry a resolve may reuse, e.g. for discovery when no
    /// kernel was named (stale entries are skipped).
    pub fn newest(&self) -> Option<CacheEntry> {
        self.list().ok()?.into_iter().find(|e| e.meta.stale_reason().is_none())
    }

    /// Keys of every entry a resolve will not reuse (see [`Metadata::stale_reason`]).
    pub fn stale_keys(&self) -> Result<Vec<String>> {
        Ok(self.list()?.into_iter().filter(|e| e.meta.stale_reason().is_some()).map(|e| e.key).collect())
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
            // Under the lock still: a build starting after it writes a new log.
            let _ = std::fs::remove_file(self.root.join(format!("{key}.log")));
            self.remove_entry(&key, lock, "")?;
            report.removed.push(key);
        }
        Ok(report)
    }

    /// Removes the entry `key` whose exclusive `lock` the caller took, and
    /// the lock file. `what` names the kind in the error (`snapshot `).
    fn remove_entry(&self, key: &str, lock: EntryLock, what: &str) -> Result<()> {
        // Rename first so a half-removed entry is never visible under its key.
        let doomed = self.root.join(format!("{TMP_PREFIX}rm-{key}-{}", std::process::id()));
        std::fs::rename(self.entry_dir(key), &doomed).with_context(|| format!("removing {what}{key}"))?;
        let _ = std::fs::remove_dir_all(&doomed);
        let _ = std::fs::remove_file(&lock.path);
        drop(lock);
        Ok(())
    }
}

/// VM snapshots (ktstr-runtime's `snapshot` module) live in this directory
/// under the root, one locked entry per key like a kernel's. They are
/// made from cached kernels and cheap to make again, so every `clean`
/// removes the ones no test is restoring.
pub const SNAPSHOT_DIR: &str = ".snapshots";

impl Cache {
    /// Removes every VM snapshot whose lock nobody holds (a restoring test
    /// holds it shared, the test writing it exclusively).
    pub fn clean_snapshots(&self) -> Result<CleanReport> {
        let snaps = Cache { root: self.root.join(SNAPSHOT_DIR) };
        let mut report = CleanReport::default();
        let Ok(rd) = std::fs::read_dir(&snaps.root) else { return Ok(report) };
        let mut keys: Vec<String> = rd
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        keys.sort();
        for key in keys {
            let Some(lock) = snaps.try_lock_exclusive(&key)? else {
                report.locked.push(key);
                continue;
            };
            snaps.remove_entry(&key, lock, "snapshot ")?;
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
mod snapshot_tests {
    use super::*;

    #[test]
    fn clean_snapshots_removes_all_but_locked_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::at(Some(dir.path()));
        assert!(cache.clean_snapshots().unwrap().removed.is_empty(), "no snapshot dir: nothing to do");
        let snaps = dir.path().join(SNAPSHOT_DIR);
        for k in ["a-1c1n-256m-0", "b-2c1n-512m-0"] {
            std::fs::create_dir_all(snaps.join(k)).unwrap();
            std::fs::write(snaps.join(k).join("state"), b"x").unwrap();
        }
        let in_use = lock_entry_shared(&snaps.join("b-2c1n-512m-0")).unwrap();
        let r = cache.clean_snapshots().unwrap();
        assert_eq!(r.removed, ["a-1c1n-256m-0"]);
        assert_eq!(r.locked, ["b-2c1n-512m-0"], "a test restoring from it keeps it");
        assert!(!snaps.join("a-1c1n-256m-0").exists() && snaps.join("b-2c1n-512m-0/state").exists());
        drop(in_use);
        assert_eq!(cache.clean_snapshots().unwrap().removed, ["b-2c1n-512m-0"]);
        assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0, "no leftovers, lock files included");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, t: u64) -> Metadata {
        let d = crate::config::InputDigest::new(&crate::Base::Tinyconfig, None, None).unwrap();
        Metadata {
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
            key_schema: KEY_SCHEMA,
            source_kind: "mirror".into(),
            source_sha256: None,
            base_digest: d.base,
            kconfig_sha256: d.kconfig_sha256,
            extra_kconfig: None,
            extra_kconfig_sha256: None,
        }
    }

    #[test]
    fn previous_duration_prefers_record_then_key_then_source() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(Some(d.path())).unwrap();
        assert_eq!(c.previous_duration("k1", Some("src")), None, "an empty cache knows nothing");
        // Two entries of the same source (other keys): the newest build counts.
        for (key, t, secs) in [("old", 1, 100.0), ("new", 5, 300.0)] {
            fake_entry(&c, key, t);
            let mut m = meta(key, t);
            m.build_duration_secs = secs;
            std::fs::write(c.entry_dir(key).join(METADATA), serde_json::to_vec(&m).unwrap()).unwrap();
        }
        assert_eq!(c.previous_duration("k1", Some("src")), Some(Duration::from_secs(300)));
        assert_eq!(c.previous_duration("k1", Some("other")), None);
        assert_eq!(c.previous_duration("k1", None), None);
        // An entry under the key itself wins over the same source.
        assert_eq!(c.previous_duration("old", Some("src")), Some(Duration::from_secs(100)));
        // The timing record wins over both, and outlives a clean of the entry.
        c.record_duration("old", 42.0);
        assert_eq!(c.previous_duration("old", Some("src")), Some(Duration::from_secs(42)));
        c.clean(None, &["old".to_string()]).unwrap();
        assert!(c.lookup("old").is_none());
        assert_eq!(c.previous_duration("old", None), Some(Duration::from_secs(42)));
        assert!(c.list().unwrap().iter().all(|e| e.key != ".timings"), "the record dir is not an entry");
        // Junk in a record is ignored, not trusted.
        std::fs::write(d.path().join(".timings/new"), "soon\n").unwrap();
        assert_eq!(c.previous_duration("new", None), Some(Duration::from_secs(300)));
    }

    fn fake_entry(c: &Cache, key: &str, t: u64) {
        write_entry(c, &meta(key, t));
    }

    fn write_entry(c: &Cache, meta: &Metadata) {
        let d = c.entry_dir(&meta.key);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(tree::image_name()), b"img").unwrap();
        std::fs::write(d.join(METADATA), serde_json::to_vec(meta).unwrap()).unwrap();
    }

    #[test]
    fn keys() {
        let kc = "0123abcd";
        let a = tree::arch();
        assert_eq!(tarball_key("6.12.9", kc), format!("6.12.9-tarball-{a}-kc{kc}"));
        assert_eq!(source_tarball_key("6.12.9", "abcdef0123", kc), format!("6.12.9-tarball-abcdef0-{a}-kc{kc}"));
        assert_eq!(git_key("for-next/x", "0123456789abcdef", kc), format!("for-next_x-git-0123456-{a}-kc{kc}"));
        assert_eq!(local_key("0123456789abcdef", kc), format!("local-0123456-{a}-kc{kc}"));
        assert!(crate::spec::looks_like_cache_key(&tarball_key("6.12.9", kc)));
        assert!(crate::spec::looks_like_cache_key(&source_tarball_key("6.12.9", "abcdef0123", kc)));
    }

    #[test]
    fn stale_entries_are_flagged_and_skipped() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(Some(d.path())).unwrap();
        let kc = crate::config::InputDigest::new(&crate::Base::Tinyconfig, None, None).unwrap().kc();
        let good = meta(&tarball_key("6.12.9", &kc), 1);
        assert_eq!(good.stale_reason(), None);
        // An entry written before key_schema existed (the old `kc` = CRC32 of ktstr.kconfig).
        let mut old = meta(&format!("6.12.117-tarball-{}-kc{}", tree::arch(), crate::kconfig_hash()), 5);
        old.key_schema = 0;
        old.source = "/usr/src/linux-source-6.12.tar.xz".into();
        assert!(old.stale_reason().unwrap().contains("old key shape"));
        // A key whose kc does not match the recorded base.
        let mut wrong_kc = meta(&tarball_key("6.12.8", &kc), 4);
        wrong_kc.base_digest = "defconfig".into();
        assert!(wrong_kc.stale_reason().unwrap().contains("kc does not match"));
        // A local tarball stored under the mirror shape.
        let mut unkeyed = meta(&tarball_key("6.12.7", &kc), 3);
        unkeyed.source_kind = "tarball".into();
        unkeyed.source_sha256 = Some("abcdef0123".into());
        assert!(unkeyed.stale_reason().unwrap().contains("SHA-256"));
        let mut keyed = unkeyed.clone();
        keyed.key = source_tarball_key("6.12.7", "abcdef0123", &kc);
        assert_eq!(keyed.stale_reason(), None);
        // Old JSON without the new fields still parses (as stale).
        let json = r#"{"key":"k","spec":"s","source":"x","version":"6.12","arch":"x86_64","kconfig_hash":"00000000","base":"tinyconfig","build_time":1,"build_duration_secs":1.0,"image_size":3}"#;
        let m: Metadata = serde_json::from_str(json).unwrap();
        assert!(m.stale_reason().is_some());

        for m in [&good, &old, &wrong_kc, &unkeyed] {
            write_entry(&c, m);
        }
        // The old entry is the newest, yet discovery takes the good one.
        assert_eq!(c.newest().unwrap().key, good.key);
        let mut stale = c.stale_keys().unwrap();
        stale.sort();
        let mut want = vec![old.key.clone(), wrong_kc.key.clone(), unkeyed.key.clone()];
        want.sort();
        assert_eq!(stale, want);
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
