//! Kernel specs, fetch, configure, build and cache for ktstr.
//!
//! The entry point is [`resolve`]: it turns one `--kernel` spec into one or
//! more bootable images, building and caching as needed.
//!
//! Without the default `fetch` feature (mirror, download, git, [`resolve`])
//! the cache, labels, specs, configure and build remain: what test binaries
//! need, without HTTP, git or xz.

pub mod build;
pub mod cache;
pub mod config;
#[cfg(feature = "fetch")]
pub mod fetch;
#[cfg(feature = "fetch")]
pub mod git;
pub mod inplace;
pub mod label;
#[cfg(feature = "fetch")]
pub mod mirror;
pub mod progress;
pub mod spec;
pub mod tree;

#[cfg(feature = "fetch")]
use std::path::{Path, PathBuf};
#[cfg(feature = "fetch")]
use std::sync::Arc;
#[cfg(feature = "fetch")]
use std::time::Instant;

#[cfg(feature = "fetch")]
use anyhow::{anyhow, bail, Context, Result};

pub use cache::{Cache, CacheEntry, EntryLock, Metadata};
pub use config::Base;
pub use spec::{KernelSpec, SpecError, TarballSource, Version};

#[cfg(feature = "fetch")]
use progress::note;

/// The ktstr kernel config fragment, embedded at compile time.
pub const KCONFIG: &str = include_str!("../../ktstr.kconfig");

/// CRC32 of [`KCONFIG`] as 8 lowercase hex digits: the `kc` of cache keys.
pub fn kconfig_hash() -> String {
    format!("{:08x}", crc32fast::hash(KCONFIG.as_bytes()))
}

/// Errors callers branch on; everything else is an `anyhow` chain.
#[cfg(feature = "fetch")]
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("kernel cache {root} has no entry {key}; build one with `cargo ktstr kernel build SPEC` (see `cargo ktstr kernel list`)")]
    NotCached { key: String, root: PathBuf },
    #[error("{path} is not a bootable kernel image (no x86 boot header, arm64 Image header or ELF)")]
    NotAnImage { path: PathBuf },
}

/// How to resolve specs.
#[cfg(feature = "fetch")]
#[derive(Debug, Clone)]
pub struct Options {
    /// Mirror base URL; `None` uses `KTSTR_KERNEL_MIRROR` or kernel.org.
    pub mirror: Option<String>,
    /// Base config; `None` is tinyconfig (or an in-place tree's own `.config`).
    pub base: Option<Base>,
    /// Rebuild even when cached.
    pub force: bool,
    /// Cache root; `None` is [`cache::default_root`].
    pub cache_root: Option<PathBuf>,
    /// `make -j`; `None` is the CPU count.
    pub jobs: Option<usize>,
    /// Use ccache when installed.
    pub ccache: bool,
}

#[cfg(feature = "fetch")]
impl Default for Options {
    fn default() -> Self {
        Options { mirror: None, base: None, force: false, cache_root: None, jobs: None, ccache: true }
    }
}

/// One bootable kernel a spec resolved to.
#[cfg(feature = "fetch")]
#[derive(Debug, Clone)]
pub struct ResolvedKernel {
    /// Producer-side label (design.md), e.g. `6.12.9`, `git_tj_sched_ext_for-next`.
    pub label: String,
    /// The boot image (`bzImage` on x86_64).
    pub image: PathBuf,
    /// The cache entry directory, or the directory holding the image.
    pub dir: PathBuf,
    /// Kernel version when known (from the source Makefile).
    pub version: Option<String>,
    /// The cache key when the kernel lives in the cache.
    pub cache_key: Option<String>,
    /// True when this call built the kernel, false for a cache hit or an image used as is.
    pub built: bool,
    /// Shared lock on the cache entry, held while this value (or a clone) lives.
    pub lock: Option<Arc<EntryLock>>,
}

/// Resolves one spec string. A range gives one kernel per member; every
/// other form gives exactly one.
#[cfg(feature = "fetch")]
pub fn resolve(spec: &str, opts: &Options) -> Result<Vec<ResolvedKernel>> {
    let parsed = KernelSpec::parse(spec).map_err(ResolveError::from)?;
    Resolver::new(spec, opts)?.resolve(&parsed)
}

/// [`resolve`] for a spec that must name exactly one kernel.
#[cfg(feature = "fetch")]
pub fn resolve_one(spec: &str, opts: &Options) -> Result<ResolvedKernel> {
    let mut v = resolve(spec, opts)?;
    if v.len() != 1 {
        bail!("kernel spec {spec:?} names {} kernels, expected one", v.len());
    }
    Ok(v.remove(0))
}

#[cfg(feature = "fetch")]
struct Resolver<'a> {
    raw: &'a str,
    opts: &'a Options,
    cache: Cache,
    make: build::Make,
}

/// Work for one cacheable kernel.
#[cfg(feature = "fetch")]
struct Job {
    key: String,
    label: String,
    source: String,
}

#[cfg(feature = "fetch")]
impl<'a> Resolver<'a> {
    fn new(raw: &'a str, opts: &'a Options) -> Result<Self> {
        let cache = Cache::open(opts.cache_root.as_deref())?;
        Ok(Resolver { raw, opts, cache, make: build::Make::new(opts.jobs, opts.ccache) })
    }

    fn resolve(&self, spec: &KernelSpec) -> Result<Vec<ResolvedKernel>> {
        match spec {
            KernelSpec::Version(v) => {
                let m = mirror::Mirror::new(self.opts.mirror.as_deref());
                let v = m.resolve(v)?;
                Ok(vec![self.version(&m, &v)?])
            }
            KernelSpec::Range { from, to } => {
                let m = mirror::Mirror::new(self.opts.mirror.as_deref());
                let members = m.expand_range(from, to)?;
                note(format!(
                    "{} expands to {}",
                    self.raw,
                    members.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
                ));
                members.iter().map(|v| self.version(&m, v)).collect()
            }
            KernelSpec::Tarball(src) => Ok(vec![self.tarball(src)?]),
            KernelSpec::Git { url, git_ref } => Ok(vec![self.git(url, git_ref)?]),
            KernelSpec::Path(p) => Ok(vec![self.path(p)?]),
            KernelSpec::CacheKey(k) => Ok(vec![self.cache_key(k)?]),
        }
    }

    fn base(&self) -> Base {
        self.opts.base.clone().unwrap_or_default()
    }

    fn version(&self, m: &mirror::Mirror, v: &Version) -> Result<ResolvedKernel> {
        let src = TarballSource::Url(m.tarball_url(v));
        let job = Job { key: cache::tarball_key(&v.to_string()), label: label::version_label(&v.to_string()), source: fetch::source_name(&src) };
        self.cached(job, None, |tmp| fetch::extract(&src, &tmp.join("src")))
    }

    fn tarball(&self, src: &TarballSource) -> Result<ResolvedKernel> {
        let name = fetch::source_name(src);
        let version = match self.memo_version(src) {
            Some(v) => v,
            None => {
                let v = fetch::tarball_version(src)?
                    .ok_or_else(|| anyhow!("{name} holds no kernel source tree (no top-level Makefile with VERSION)"))?;
                self.remember_version(src, &v);
                v
            }
        };
        let job = Job { key: cache::tarball_key(&version), label: label::version_label(&version), source: name };
        self.cached(job, None, |tmp| fetch::extract(src, &tmp.join("src")))
    }

    fn git(&self, url: &str, git_ref: &str) -> Result<ResolvedKernel> {
        let label = label::git_label(url, git_ref);
        match git::resolve_remote(url, git_ref)? {
            Some(oid) => {
                let job = Job { key: cache::git_key(git_ref, &oid.to_string()), label, source: format!("{url} {oid}") };
                self.cached(job, None, |tmp| {
                    let dir = tmp.join("src");
                    git::fetch_checkout(url, git_ref, Some(oid), &dir)?;
                    Ok(dir)
                })
            }
            None => {
                // A short id nothing advertises: fetch first to learn the commit.
                let tmp = self.cache.temp_build("git-fetch")?;
                let dir = tmp.path().join("src");
                let oid = git::fetch_checkout(url, git_ref, None, &dir)?;
                let job = Job { key: cache::git_key(git_ref, &oid.to_string()), label, source: format!("{url} {oid}") };
                self.cached(job, Some((tmp, dir)), |_| unreachable!("prefetched"))
            }
        }
    }

    fn path(&self, p: &Path) -> Result<ResolvedKernel> {
        let canon = p.canonicalize().with_context(|| format!("kernel path {} does not exist", p.display()))?;
        if canon.is_file() {
            if !tree::looks_like_image(&canon) {
                return Err(ResolveError::NotAnImage { path: canon }.into());
            }
            return Ok(ResolvedKernel {
                label: label::path_label(&canon, false),
                dir: canon.parent().unwrap_or(Path::new("/")).to_path_buf(),
                image: canon,
                version: None,
                cache_key: None,
                built: false,
                lock: None,
            });
        }
        if tree::is_source_tree(&canon) {
            return self.source_tree(&canon);
        }
        match tree::find_image_in(&canon) {
            Some(image) => Ok(ResolvedKernel {
                label: label::path_label(&canon, false),
                version: None,
                image,
                dir: canon,
                cache_key: None,
                built: false,
                lock: None,
            }),
            None => bail!(
                "{} is neither a kernel source tree (Makefile + Kconfig) nor a directory holding a boot image",
                canon.display()
            ),
        }
    }

    fn source_tree(&self, src: &Path) -> Result<ResolvedKernel> {
        let version = tree::source_version(src);
        let base = match &self.opts.base {
            Some(b) => b.clone(),
            None if src.join(".config").is_file() => Base::Existing,
            None => Base::Tinyconfig,
        };
        match git::tree_state(src) {
            git::TreeState::Clean { commit } => {
                let key = cache::local_key(&commit);
                let job = Job { key, label: label::path_label(src, false), source: format!("{} {commit}", src.display()) };
                let src = src.to_path_buf();
                self.cached_with_base(job, None, base, move |_| Ok(src))
            }
            _ => {
                note(format!("{} is a dirty or non-git tree: building in place, not caching", src.display()));
                // Another run building this tree goes first; we rebuild after it.
                let _turn = inplace::lock(src)?;
                let log = src.join(".ktstr-build.log");
                let _ = std::fs::remove_file(&log);
                config::configure(src, &base, KCONFIG, &self.make, &log)?;
                let art = build::build(src, &self.make, &log)?;
                Ok(ResolvedKernel {
                    label: label::path_label(src, true),
                    image: art.image,
                    dir: src.to_path_buf(),
                    version,
                    cache_key: None,
                    built: true,
                    lock: None,
                })
            }
        }
    }

    fn cache_key(&self, key: &str) -> Result<ResolvedKernel> {
        match self.hit(key, &label::cache_key_label(key))? {
            Some(r) => Ok(r),
            None => Err(ResolveError::NotCached { key: key.to_string(), root: self.cache.root().to_path_buf() }.into()),
        }
    }

    /// A cache hit under a shared lock, or `None`.
    fn hit(&self, key: &str, label: &str) -> Result<Option<ResolvedKernel>> {
        if self.cache.lookup(key).is_none() {
            return Ok(None);
        }
        let lock = self.cache.lock_shared(key)?;
        // Looked up again under the lock: a `clean` may have won the race.
        Ok(self.cache.lookup(key).map(|e| ResolvedKernel {
            label: label.to_string(),
            image: e.image(),
            version: Some(e.meta.version.clone()),
            cache_key: Some(e.key.clone()),
            dir: e.dir,
            built: false,
            lock: Some(Arc::new(lock)),
        }))
    }

    fn cached(
        &self,
        job: Job,
        prefetched: Option<(cache::TempBuild, PathBuf)>,
        fetch: impl FnOnce(&Path) -> Result<PathBuf>,
    ) -> Result<ResolvedKernel> {
        self.cached_with_base(job, prefetched, self.base(), fetch)
    }

    /// Hit, or: exclusive lock, fetch into a temp dir beside the entry,
    /// configure, build, store atomically, then a shared lock for the caller.
    fn cached_with_base(
        &self,
        job: Job,
        prefetched: Option<(cache::TempBuild, PathBuf)>,
        base: Base,
        fetch: impl FnOnce(&Path) -> Result<PathBuf>,
    ) -> Result<ResolvedKernel> {
        let started = Instant::now();
        let mut waited = false;
        let lock = loop {
            if !self.opts.force {
                if let Some(r) = self.hit(&job.key, &job.label)? {
                    let after = if waited { " after waiting" } else { "" };
                    note(format!("cache hit {}{after} ({:.2}s)", job.key, started.elapsed().as_secs_f64()));
                    return Ok(r);
                }
            }
            if let Some(l) = self.cache.try_lock_exclusive(&job.key)? {
                if !self.opts.force && self.cache.lookup(&job.key).is_some() {
                    continue; // stored between our lookup and our lock
                }
                break l;
            }
            if self.opts.force {
                // Replacing an entry must wait for its readers too.
                break self.cache.lock_exclusive(&job.key)?;
            }
            // Someone holds the key: a shared lock waits out a writer without
            // queueing behind readers (who never release while tests run).
            note(format!("waiting for another build of {} (lock held)", job.key));
            waited = true;
            drop(self.cache.lock_shared(&job.key)?);
            if self.cache.lookup(&job.key).is_none() {
                // Not a builder after all (or it failed): build it ourselves.
                let l = self.cache.lock_exclusive(&job.key)?;
                if self.cache.lookup(&job.key).is_some() {
                    continue;
                }
                break l;
            }
        };
        note(format!("building {} ({}) from {}", job.key, base, job.source));
        let (tmp, src) = match prefetched {
            Some(p) => p,
            None => {
                let tmp = self.cache.temp_build(&job.key)?;
                let src = fetch(tmp.path())?;
                (tmp, src)
            }
        };
        let version = tree::source_version(&src).unwrap_or_else(|| job.label.clone());
        // The full log lives beside the entry so its path stays valid on failure.
        let log = self.cache.root().join(format!("{}.log", job.key));
        let _ = std::fs::remove_file(&log);
        config::configure(&src, &base, KCONFIG, &self.make, &log)?;
        let art = build::build(&src, &self.make, &log)?;
        let meta = Metadata {
            key: job.key.clone(),
            spec: self.raw.to_string(),
            source: job.source.clone(),
            version: version.clone(),
            arch: tree::arch().to_string(),
            kconfig_hash: kconfig_hash(),
            base: base.to_string(),
            build_time: 0,
            build_duration_secs: started.elapsed().as_secs_f64(),
            image_size: 0,
        };
        let entry = self.cache.store(&lock, &tmp, &art, Some(&log), meta)?;
        // Release waiters first; removing the multi-GB build dir takes a while.
        drop(lock);
        let lock = self.cache.lock_shared(&entry.key)?;
        note(format!("cached {} in {:.1} min: {}", entry.key, started.elapsed().as_secs_f64() / 60.0, entry.dir.display()));
        drop(tmp);
        Ok(ResolvedKernel {
            label: job.label,
            image: entry.image(),
            version: Some(version),
            cache_key: Some(entry.key.clone()),
            dir: entry.dir,
            built: true,
            lock: Some(Arc::new(lock)),
        })
    }

    /// Tarball → version memo, so a cache hit does not re-read the archive.
    /// Local files are identified by path, size and mtime; URLs by the URL.
    fn memo_id(src: &TarballSource) -> Option<String> {
        match src {
            TarballSource::Local(p) => {
                let m = std::fs::metadata(p).ok()?;
                let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
                Some(format!("{}|{}|{mtime}", p.canonicalize().ok()?.display(), m.len()))
            }
            TarballSource::Url(u) => Some(u.clone()),
        }
    }

    fn memo_path(&self, src: &TarballSource) -> Option<PathBuf> {
        let id = Self::memo_id(src)?;
        Some(self.cache.root().join(".sources").join(format!("{:08x}", crc32fast::hash(id.as_bytes()))))
    }

    fn memo_version(&self, src: &TarballSource) -> Option<String> {
        let text = std::fs::read_to_string(self.memo_path(src)?).ok()?;
        let (id, version) = text.trim_end().split_once('\n')?;
        (Some(id) == Self::memo_id(src).as_deref()).then(|| version.to_string())
    }

    fn remember_version(&self, src: &TarballSource, version: &str) {
        let (Some(path), Some(id)) = (self.memo_path(src), Self::memo_id(src)) else { return };
        let Some(dir) = path.parent() else { return };
        let _ = std::fs::create_dir_all(dir);
        // Written to a temp file and renamed, so concurrent runs never read half.
        if let Ok(mut f) = tempfile::NamedTempFile::new_in(dir) {
            use std::io::Write;
            if writeln!(f, "{id}\n{version}").is_ok() {
                let _ = f.persist(&path);
            }
        }
    }
}
