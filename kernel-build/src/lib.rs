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
#[cfg(feature = "fetch")]
pub mod remote;
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
pub use config::{Base, Fragment, InputDigest};
pub use spec::{KernelSpec, SpecError, TarballSource, Version};

#[cfg(feature = "fetch")]
use progress::{note, KernelLine, Phase};

/// The ktstr kernel config fragment, embedded at compile time.
pub const KCONFIG: &str = include_str!("../../ktstr.kconfig");

/// CRC32 of [`KCONFIG`] alone as 8 lowercase hex digits (recorded in
/// metadata; the `kc` of keys is [`InputDigest::kc`], over every input).
pub fn kconfig_hash() -> String {
    format!("{:08x}", crc32fast::hash(KCONFIG.as_bytes()))
}

use sha2::{Digest, Sha256};

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A range may expand to at most this many kernels unless `--max-kernels` says more.
pub const DEFAULT_MAX_KERNELS: usize = 16;

/// Environment variable that turns on offline mode (`1`).
pub const OFFLINE_ENV: &str = "KTSTR_OFFLINE";

/// `s` with every run of whitespace (newlines of a `{e:#}` chain) as one space.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The [`fetch::Unreachable`] in `e`'s chain as text, else its root cause.
#[cfg(feature = "fetch")]
fn fetch_cause(e: &anyhow::Error) -> String {
    e.chain().find(|c| c.is::<fetch::Unreachable>()).unwrap_or(e.root_cause()).to_string()
}

/// Errors callers branch on; everything else is an `anyhow` chain.
#[cfg(feature = "fetch")]
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("kernel cache {root} has no entry {key}; build one with `cargo ktstr kernel build SPEC` (see `cargo ktstr kernel list`)")]
    NotCached { key: String, root: PathBuf },
    #[error("cache entry {key} is stale ({reason}); rebuild it from its spec, or remove it with `cargo ktstr kernel clean --stale`")]
    Stale { key: String, reason: String },
    #[error("{path} is not a bootable kernel image (no x86 boot header, arm64 Image header or ELF)")]
    NotAnImage { path: PathBuf },
    #[error("{spec} expands to {count} kernels, more than the limit of {max}; pass --max-kernels {count} to build them all, or narrow the range")]
    TooManyKernels { spec: String, count: usize, max: usize },
    #[error("{spec}: {why}, and no cached build matches it (kc {kc}); run once with the network, or give a TARBALL, PATH or CACHE-KEY spec")]
    OfflineMiss { spec: String, why: String, kc: String },
}

/// How to resolve specs.
#[cfg(feature = "fetch")]
#[derive(Debug, Clone)]
pub struct Options {
    /// Mirror base URL; `None` uses `KTSTR_KERNEL_MIRROR` or kernel.org.
    pub mirror: Option<String>,
    /// Base config; `None` is tinyconfig (or an in-place tree's own `.config`).
    pub base: Option<Base>,
    /// Extra fragment merged after ktstr.kconfig (`--extra-kconfig`).
    pub extra_kconfig: Option<Fragment>,
    /// Rebuild even when cached.
    pub force: bool,
    /// Cache root; `None` is [`cache::default_root`].
    pub cache_root: Option<PathBuf>,
    /// `make -j`; `None` is the CPU count.
    pub jobs: Option<usize>,
    /// Use ccache when installed.
    pub ccache: bool,
    /// Never touch the network: versions resolve from the cache only.
    pub offline: bool,
    /// Most kernels one range may expand to.
    pub max_kernels: usize,
    /// Hide the per-kernel progress line (`--quiet`); notes and errors remain.
    pub quiet: bool,
    /// The remote cache (`KTSTR_REMOTE_CACHE`): a local miss looks there
    /// before building, and a build is uploaded there.
    pub remote: Option<remote::Config>,
}

#[cfg(feature = "fetch")]
impl Default for Options {
    fn default() -> Self {
        Options {
            mirror: None,
            base: None,
            extra_kconfig: None,
            force: false,
            cache_root: None,
            jobs: None,
            ccache: true,
            offline: false,
            max_kernels: DEFAULT_MAX_KERNELS,
            quiet: false,
            remote: None,
        }
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

#[cfg(feature = "fetch")]
impl ResolvedKernel {
    /// A kernel in the cache entry `e`, held by the shared `lock`.
    fn cached(label: String, e: CacheEntry, lock: EntryLock, built: bool) -> Self {
        ResolvedKernel {
            label,
            image: e.image(),
            version: Some(e.meta.version.clone()),
            cache_key: Some(e.key.clone()),
            dir: e.dir,
            built,
            lock: Some(Arc::new(lock)),
        }
    }
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

/// What `kernel build --dry-run` reports for one kernel of a spec.
#[cfg(feature = "fetch")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub label: String,
    /// The cache key, when it can be known without fetching or building.
    pub key: Option<String>,
    pub status: PlanStatus,
}

#[cfg(feature = "fetch")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanStatus {
    /// The key's entry is in the cache (and not stale).
    Hit,
    /// It would be fetched and built.
    Miss,
    /// Used without the cache (an image, or a dirty tree built in place); the reason.
    Uncached(String),
    /// The key needs a download first (a remote tarball's SHA-256); the reason.
    Unknown(String),
}

#[cfg(feature = "fetch")]
impl std::fmt::Display for PlanStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanStatus::Hit => f.write_str("hit"),
            PlanStatus::Miss => f.write_str("miss"),
            PlanStatus::Uncached(why) => write!(f, "uncached ({why})"),
            PlanStatus::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// The cache key and hit/miss of every kernel `spec` names, fetching and
/// building nothing that the key does not need (design.md "Kernel cache").
#[cfg(feature = "fetch")]
pub fn plan(spec: &str, opts: &Options) -> Result<Vec<Plan>> {
    let parsed = KernelSpec::parse(spec).map_err(ResolveError::from)?;
    Resolver::new(spec, opts)?.plan(&parsed)
}

/// What a local miss found in the remote cache.
#[cfg(feature = "fetch")]
enum FromRemote {
    /// Downloaded and installed in the local cache.
    Entry(Box<CacheEntry>),
    /// A corrupt entry, to be replaced by the upload after the build.
    Corrupt,
    /// No entry, no remote, or an unusable one.
    Nothing,
}

#[cfg(feature = "fetch")]
struct Resolver<'a> {
    raw: &'a str,
    opts: &'a Options,
    cache: Cache,
    make: build::Make,
    remote: Option<remote::Remote>,
}

/// Work for one cacheable kernel.
#[cfg(feature = "fetch")]
struct Job {
    key: String,
    label: String,
    source: String,
    /// `mirror`, `tarball`, `git` or `local` (recorded in metadata).
    kind: &'static str,
    source_sha256: Option<String>,
    digest: InputDigest,
}

/// A version spec, as far as the mirror (or the cache) could pin it.
#[cfg(feature = "fetch")]
enum Pinned {
    /// A release on the mirror.
    Mirror(mirror::Mirror, Version),
    /// A cached entry, because we are offline or the mirror is unreachable.
    Cached(Box<CacheEntry>),
}

#[cfg(feature = "fetch")]
impl<'a> Resolver<'a> {
    fn new(raw: &'a str, opts: &'a Options) -> Result<Self> {
        let cache = Cache::open(opts.cache_root.as_deref())?;
        let remote = opts.remote.clone().map(remote::Remote::new).transpose()?;
        Ok(Resolver { raw, opts, cache, make: build::Make::new(opts.jobs, opts.ccache), remote })
    }

    fn resolve(&self, spec: &KernelSpec) -> Result<Vec<ResolvedKernel>> {
        match spec {
            KernelSpec::Version(v) => match self.pin(v)? {
                Pinned::Mirror(m, v) => Ok(vec![self.version(&m, &v)?]),
                Pinned::Cached(e) => Ok(vec![self.cache_entry(&e)?]),
            },
            KernelSpec::Range { from, to } => {
                let (m, members) = self.range(from, to)?;
                members.iter().map(|v| self.version(&m, v)).collect()
            }
            KernelSpec::Tarball(src) => Ok(vec![self.tarball(src)?]),
            KernelSpec::Git { url, git_ref } => Ok(vec![self.git(url, git_ref)?]),
            KernelSpec::Path(p) => Ok(vec![self.path(p)?]),
            KernelSpec::CacheKey(k) => Ok(vec![self.cache_key(k)?]),
        }
    }

    fn plan(&self, spec: &KernelSpec) -> Result<Vec<Plan>> {
        let status = |key: &str| match self.cache.lookup(key) {
            Some(e) if e.meta.stale_reason().is_none() => PlanStatus::Hit,
            _ => PlanStatus::Miss,
        };
        let keyed = |label: String, key: String| Plan { label, status: status(&key), key: Some(key) };
        let release = |m: &mirror::Mirror, v: &Version, kc: &str| {
            let label = label::version_label(&v.to_string());
            if m.publishes_sums(v) {
                keyed(label, cache::tarball_key(&v.to_string(), kc))
            } else {
                let why = "an rc snapshot is keyed by its SHA-256, known only after downloading it".to_string();
                Plan { label, key: None, status: PlanStatus::Unknown(why) }
            }
        };
        let kc = self.digest(&self.base(), None)?.kc();
        Ok(match spec {
            KernelSpec::Version(v) => match self.pin(v)? {
                Pinned::Mirror(m, v) => vec![release(&m, &v, &kc)],
                Pinned::Cached(e) => vec![keyed(label::version_label(&e.meta.version), e.key)],
            },
            KernelSpec::Range { from, to } => {
                let (m, members) = self.range(from, to)?;
                members.iter().map(|v| release(&m, v, &kc)).collect()
            }
            KernelSpec::Tarball(TarballSource::Local(p)) => {
                let (version, sha) = self.local_tarball_facts(p)?;
                vec![keyed(label::version_label(&version), cache::source_tarball_key(&version, &sha, &kc))]
            }
            KernelSpec::Tarball(TarballSource::Url(u)) => vec![Plan {
                label: u.clone(),
                key: None,
                status: PlanStatus::Unknown("a remote tarball is keyed by its SHA-256, known only after downloading it".into()),
            }],
            KernelSpec::Git { url, git_ref } => {
                let label = label::git_label(url, git_ref);
                self.check_online_git(url)?;
                match git::resolve_remote(url, git_ref)? {
                    Some(oid) => vec![keyed(label, cache::git_key(git_ref, &oid.to_string(), &kc))],
                    None => vec![Plan {
                        label,
                        key: None,
                        status: PlanStatus::Unknown(format!("short commit id {git_ref} needs a fetch to name its commit")),
                    }],
                }
            }
            KernelSpec::Path(p) => {
                let canon = p.canonicalize().with_context(|| format!("kernel path {} does not exist", p.display()))?;
                if !canon.is_dir() || !tree::is_source_tree(&canon) {
                    vec![Plan { label: label::path_label(&canon, false), key: None, status: PlanStatus::Uncached("image used as is".into()) }]
                } else {
                    match git::tree_state(&canon) {
                        git::TreeState::Clean { commit } => {
                            let base = self.tree_base(&canon);
                            let kc = self.digest(&base, Some(&canon))?.kc();
                            vec![keyed(label::path_label(&canon, false), cache::local_key(&commit, &kc))]
                        }
                        _ => vec![Plan {
                            label: label::path_label(&canon, true),
                            key: None,
                            status: PlanStatus::Uncached("dirty or non-git tree: built in place, never cached".into()),
                        }],
                    }
                }
            }
            KernelSpec::CacheKey(k) => vec![keyed(label::cache_key_label(k), k.clone())],
        })
    }

    fn base(&self) -> Base {
        self.opts.base.clone().unwrap_or_default()
    }

    /// The base of an in-place tree: `--base`/`--config`, else its own `.config`, else tinyconfig.
    fn tree_base(&self, src: &Path) -> Base {
        match &self.opts.base {
            Some(b) => b.clone(),
            // A .config ktstr wrote from tinyconfig/defconfig: configure from that base again.
            None => match config::recorded_base(src).as_deref() {
                Some("tinyconfig") => Base::Tinyconfig,
                Some("defconfig") => Base::Defconfig,
                _ if src.join(".config").is_file() => Base::Existing,
                _ => Base::Tinyconfig,
            },
        }
    }

    fn digest(&self, base: &Base, tree: Option<&Path>) -> Result<InputDigest> {
        InputDigest::new(base, self.opts.extra_kconfig.as_ref(), tree)
    }

    fn check_online_git(&self, url: &str) -> Result<()> {
        if self.opts.offline && !url.starts_with("file://") {
            bail!("git+{url}: offline (--offline / {OFFLINE_ENV}=1), and this remote needs the network; use git+file:// or a PATH spec");
        }
        Ok(())
    }

    /// Pins a version spec on the mirror; offline, or when the mirror cannot
    /// be reached, takes the newest matching cached entry instead.
    fn pin(&self, v: &Version) -> Result<Pinned> {
        if self.opts.offline {
            return self.cached_version(v, &format!("offline (--offline / {OFFLINE_ENV}=1)"), None).map(|e| Pinned::Cached(Box::new(e)));
        }
        let m = mirror::Mirror::new(self.opts.mirror.as_deref());
        match m.resolve(v) {
            Ok(pinned) => Ok(Pinned::Mirror(m, pinned)),
            Err(e) if fetch::is_unreachable(&e) => {
                self.cached_version(v, &format!("mirror {} unreachable", m.base()), Some(e)).map(|e| Pinned::Cached(Box::new(e)))
            }
            Err(e) => Err(e),
        }
    }

    /// The newest non-stale tarball entry of `v` (exact, or newest of the
    /// series) built with the current configuration inputs.
    fn cached_version(&self, v: &Version, why: &str, cause: Option<anyhow::Error>) -> Result<CacheEntry> {
        let kc = self.digest(&self.base(), None)?.kc();
        let suffix = format!("-{}-kc{kc}", tree::arch());
        let matches = |e: &CacheEntry| {
            let Some(ev) = Version::parse(&e.meta.version) else { return false };
            let version_ok = if v.is_series() { ev.same_series(v) && ev.rc.is_none() } else { ev == *v };
            version_ok && e.key.contains("-tarball-") && e.key.ends_with(&suffix) && e.meta.stale_reason().is_none()
        };
        // Highest version; a mirror-verified entry before a local tarball; newest build.
        let best = self.cache.list()?.into_iter().filter(matches).max_by(|a, b| {
            let va = Version::parse(&a.meta.version);
            let vb = Version::parse(&b.meta.version);
            va.cmp(&vb)
                .then((a.meta.source_kind == "mirror").cmp(&(b.meta.source_kind == "mirror")))
                .then(a.meta.build_time.cmp(&b.meta.build_time))
        });
        match best {
            Some(e) => {
                note(format!("{why}: {} resolves to cached {} (source {})", self.raw, e.key, e.meta.source));
                Ok(e)
            }
            None => {
                let why = match cause {
                    Some(c) => format!("{why} ({})", fetch_cause(&c)),
                    None => why.to_string(),
                };
                Err(ResolveError::OfflineMiss { spec: self.raw.to_string(), why, kc }.into())
            }
        }
    }

    fn range(&self, from: &Version, to: &Version) -> Result<(mirror::Mirror, Vec<Version>)> {
        if self.opts.offline {
            bail!("{}: offline (--offline / {OFFLINE_ENV}=1), and a range needs the mirror's release list", self.raw);
        }
        let m = mirror::Mirror::new(self.opts.mirror.as_deref());
        let members = m.expand_range(from, to)?;
        if members.len() > self.opts.max_kernels {
            return Err(ResolveError::TooManyKernels { spec: self.raw.to_string(), count: members.len(), max: self.opts.max_kernels }
                .into());
        }
        note(format!("{} expands to {}", self.raw, members.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")));
        Ok((m, members))
    }


    fn version(&self, m: &mirror::Mirror, v: &Version) -> Result<ResolvedKernel> {
        let url = m.tarball_url(v);
        if !m.publishes_sums(v) {
            // kernel.org's rc snapshots have no sums: keyed by content like any URL.
            return self.url_tarball(&url);
        }
        let digest = self.digest(&self.base(), None)?;
        let job = Job {
            key: cache::tarball_key(&v.to_string(), &digest.kc()),
            label: label::version_label(&v.to_string()),
            source: url.clone(),
            kind: "mirror",
            source_sha256: None,
            digest,
        };
        let name = url.rsplit('/').next().unwrap_or(&url).to_string();
        let r = self.cached(job, None, |tmp| {
            // Sums first: a mirror without them fails before the big download.
            let expected = m.expected_sha256(v)?;
            let file = tmp.join(&name);
            let actual = fetch::download(&url, &file)?;
            if actual != expected {
                return Err(fetch::ChecksumMismatch { file: name.clone(), expected, actual }.into());
            }
            let src = fetch::extract(&TarballSource::Local(file.clone()), &tmp.join("src"))?;
            let _ = std::fs::remove_file(&file);
            Ok((src, Some(actual)))
        });
        match r {
            Err(e) if fetch::is_unreachable(&e) => {
                let entry = self.cached_version(v, &format!("mirror {} unreachable", m.base()), Some(e))?;
                self.cache_entry(&entry)
            }
            r => r,
        }
    }

    /// Version and SHA-256 of a local tarball, memoized by path, size and
    /// mtime so a cache hit does not re-read the archive.
    fn local_tarball_facts(&self, p: &Path) -> Result<(String, String)> {
        let src = TarballSource::Local(p.to_path_buf());
        if let Some(f) = self.memo_facts(p) {
            return Ok(f);
        }
        let name = fetch::source_name(&src);
        let version = fetch::tarball_version(&src)?
            .ok_or_else(|| anyhow!("{name} holds no kernel source tree (no top-level Makefile with VERSION)"))?;
        let sha = fetch::sha256_file(p)?;
        self.remember_facts(p, &version, &sha);
        Ok((version, sha))
    }

    fn tarball(&self, src: &TarballSource) -> Result<ResolvedKernel> {
        let p = match src {
            TarballSource::Url(u) => return self.url_tarball(u),
            TarballSource::Local(p) => p,
        };
        let (version, sha) = self.local_tarball_facts(p)?;
        let digest = self.digest(&self.base(), None)?;
        let job = Job {
            key: cache::source_tarball_key(&version, &sha, &digest.kc()),
            label: label::version_label(&version),
            source: fetch::source_name(src),
            kind: "tarball",
            source_sha256: Some(sha),
            digest,
        };
        self.cached(job, None, |tmp| Ok((fetch::extract(src, &tmp.join("src"))?, None)))
    }

    /// A tarball by URL is keyed by its SHA-256, so it is downloaded first
    /// (into a temp dir beside the entries); a hit then only costs the download.
    fn url_tarball(&self, url: &str) -> Result<ResolvedKernel> {
        if self.opts.offline {
            bail!("{url}: offline (--offline / {OFFLINE_ENV}=1), and a tarball URL must be downloaded to be keyed; download it and give its path");
        }
        let name = url.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("tarball");
        // Keyed by content: the download comes first, shown under the file's name.
        let _line = KernelLine::begin(name, self.opts.quiet);
        progress::phase(Phase::Fetch, url);
        let tmp = self.cache.temp_build("download")?;
        let file = tmp.path().join(name);
        let sha = fetch::download(url, &file)?;
        let local = TarballSource::Local(file.clone());
        let version = fetch::tarball_version(&local)?
            .ok_or_else(|| anyhow!("{url} holds no kernel source tree (no top-level Makefile with VERSION)"))?;
        let digest = self.digest(&self.base(), None)?;
        let job = Job {
            key: cache::source_tarball_key(&version, &sha, &digest.kc()),
            label: label::version_label(&version),
            source: url.to_string(),
            kind: "tarball",
            source_sha256: Some(sha),
            digest,
        };
        self.cached(job, Some(tmp), move |dir| {
            let src = fetch::extract(&local, &dir.join("src"))?;
            let _ = std::fs::remove_file(&file);
            Ok((src, None))
        })
    }

    fn git(&self, url: &str, git_ref: &str) -> Result<ResolvedKernel> {
        let label = label::git_label(url, git_ref);
        self.check_online_git(url)?;
        let digest = self.digest(&self.base(), None)?;
        let kc = digest.kc();
        let job = |oid: git2::Oid| Job {
            key: cache::git_key(git_ref, &oid.to_string(), &kc),
            label: label.clone(),
            source: format!("{url} {oid}"),
            kind: "git",
            source_sha256: None,
            digest: digest.clone(),
        };
        match git::resolve_remote(url, git_ref)? {
            Some(oid) => self.cached(job(oid), None, |tmp| {
                let dir = tmp.join("src");
                git::fetch_checkout(url, git_ref, Some(oid), &dir)?;
                Ok((dir, None))
            }),
            None => {
                // A short id nothing advertises: fetch first to learn the commit.
                let _line = KernelLine::begin(&label, self.opts.quiet);
                progress::phase(Phase::Fetch, &format!("{git_ref} from {url}"));
                let tmp = self.cache.temp_build("git-fetch")?;
                let dir = tmp.path().join("src");
                let oid = git::fetch_checkout(url, git_ref, None, &dir)?;
                self.cached(job(oid), Some(tmp), move |_| Ok((dir, None)))
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
        let base = self.tree_base(src);
        match git::tree_state(src) {
            git::TreeState::Clean { commit } => {
                let digest = self.digest(&base, Some(src))?;
                let job = Job {
                    key: cache::local_key(&commit, &digest.kc()),
                    label: label::path_label(src, false),
                    source: format!("{} {commit}", src.display()),
                    kind: "local",
                    source_sha256: None,
                    digest,
                };
                let src = src.to_path_buf();
                self.cached_with_base(job, None, base, move |_| Ok((src, None)))
            }
            _ => {
                note(format!("{} is a dirty or non-git tree: building in place, not caching", src.display()));
                let label = label::path_label(src, true);
                let _line = KernelLine::begin(&label, self.opts.quiet);
                let label_id = cache::label_timing_id(&label);
                progress::set_previous(self.cache.previous_duration(&label_id, None));
                let started = Instant::now();
                // Another run building this tree goes first; we rebuild after it.
                let _turn = inplace::lock(src)?;
                let log = src.join(".ktstr-build.log");
                let _ = std::fs::remove_file(&log);
                config::configure(src, &base, &self.fragments(), &self.make, &log)?;
                let art = build::build(src, &self.make, &log)?;
                // In-place rebuilds are incremental: the last one predicts the next.
                self.cache.record_duration(&label_id, started.elapsed().as_secs_f64());
                Ok(ResolvedKernel {
                    label,
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

    /// ktstr.kconfig, then the extra fragment if any.
    fn fragments(&self) -> Vec<&str> {
        let mut v = vec![KCONFIG];
        if let Some(f) = &self.opts.extra_kconfig {
            v.push(f.text.as_str());
        }
        v
    }

    fn cache_key(&self, key: &str) -> Result<ResolvedKernel> {
        if let Some(e) = self.cache.lookup(key) {
            if let Some(reason) = e.meta.stale_reason() {
                return Err(ResolveError::Stale { key: key.to_string(), reason }.into());
            }
        }
        let label = label::cache_key_label(key);
        if let Some(r) = self.hit(key, &label)? {
            return Ok(r);
        }
        if self.remote.is_some() {
            let lock = self.cache.lock_exclusive(key)?;
            if !self.is_hit(key) {
                if let FromRemote::Entry(e) = self.pull_remote(&lock, key) {
                    drop(lock);
                    return self.pulled(*e, label);
                }
            }
            drop(lock);
            if let Some(r) = self.hit(key, &label)? {
                return Ok(r);
            }
        }
        Err(ResolveError::NotCached { key: key.to_string(), root: self.cache.root().to_path_buf() }.into())
    }

    /// An entry found by [`Resolver::cached_version`], under a shared lock.
    fn cache_entry(&self, e: &CacheEntry) -> Result<ResolvedKernel> {
        self.hit(&e.key, &label::version_label(&e.meta.version))?
            .ok_or_else(|| anyhow!("cache entry {} vanished while resolving {} (removed by `kernel clean`?)", e.key, self.raw))
    }

    /// A (non-stale) cache hit under a shared lock, or `None`.
    fn hit(&self, key: &str, label: &str) -> Result<Option<ResolvedKernel>> {
        let usable = |c: &Cache| c.lookup(key).filter(|e| e.meta.stale_reason().is_none());
        if usable(&self.cache).is_none() {
            return Ok(None);
        }
        let lock = self.cache.lock_shared(key)?;
        // Looked up again under the lock: a `clean` may have won the race.
        Ok(usable(&self.cache).map(|e| ResolvedKernel::cached(label.to_string(), e, lock, false)))
    }

    /// A local miss, under the exclusive `lock` on `key`: downloads the
    /// remote cache's entry into the local cache when it has a good one.
    /// Every failure is one line, never fatal: the caller builds instead.
    fn pull_remote(&self, lock: &EntryLock, key: &str) -> FromRemote {
        let Some(r) = &self.remote else { return FromRemote::Nothing };
        match r.pull(&self.cache, lock, key) {
            Ok(remote::Pulled::Hit { entry, bytes, elapsed }) => {
                note(format!(
                    "kernel {key}: from remote cache {}, no build ({:.1} MiB in {:.1}s)",
                    r.url(),
                    progress::mib(bytes),
                    elapsed.as_secs_f64()
                ));
                FromRemote::Entry(entry)
            }
            Ok(remote::Pulled::Missing) => FromRemote::Nothing,
            Ok(remote::Pulled::Corrupt(why)) => {
                note(format!("warning: ignoring remote cache entry {}/{key}: {why}; building it", r.url()));
                FromRemote::Corrupt
            }
            Err(e) => {
                note(format!("warning: remote cache {} unusable ({}); building {key} locally", r.url(), one_line(&format!("{e:#}"))));
                FromRemote::Nothing
            }
        }
    }

    /// An entry [`Resolver::pull_remote`] just installed, once the caller
    /// dropped its exclusive lock: under a shared lock, as after a build.
    fn pulled(&self, e: CacheEntry, label: String) -> Result<ResolvedKernel> {
        let lock = self.cache.lock_shared(&e.key)?;
        // A `kernel clean` may have come between the two locks.
        if !e.image().is_file() {
            bail!("cache entry {} vanished right after its download (removed by `kernel clean`?)", e.key);
        }
        Ok(ResolvedKernel::cached(label, e, lock, false))
    }

    /// Uploads a fresh build; a failure is a one-line warning (the run goes on).
    fn push_remote(&self, entry: &CacheEntry, replace: bool) {
        let Some(r) = &self.remote else { return };
        match r.push(entry, replace) {
            Ok(remote::Pushed::Uploaded { bytes, elapsed }) => progress::done(format!(
                "uploaded {} to remote cache {} ({:.1} MiB in {:.1}s)",
                entry.key,
                r.url(),
                progress::mib(bytes),
                elapsed.as_secs_f64()
            )),
            Ok(remote::Pushed::AlreadyThere) => {
                progress::done(format!("remote cache {} already has {} (another runner uploaded it first)", r.url(), entry.key))
            }
            Err(e) => note(format!("warning: uploading {} to remote cache {} failed: {}", entry.key, r.url(), one_line(&format!("{e:#}")))),
        }
    }

    fn is_hit(&self, key: &str) -> bool {
        self.cache.lookup(key).is_some_and(|e| e.meta.stale_reason().is_none())
    }

    fn cached(
        &self,
        job: Job,
        prefetched: Option<cache::TempBuild>,
        fetch: impl FnOnce(&Path) -> Result<(PathBuf, Option<String>)>,
    ) -> Result<ResolvedKernel> {
        self.cached_with_base(job, prefetched, self.base(), fetch)
    }

    /// Hit, or: exclusive lock, fetch into a temp dir beside the entry (or
    /// use the `prefetched` one), configure, build, store atomically, then a
    /// shared lock for the caller. `fetch` returns the source tree and, when
    /// it learnt it, the source tarball's SHA-256.
    fn cached_with_base(
        &self,
        mut job: Job,
        prefetched: Option<cache::TempBuild>,
        base: Base,
        fetch: impl FnOnce(&Path) -> Result<(PathBuf, Option<String>)>,
    ) -> Result<ResolvedKernel> {
        let started = Instant::now();
        // Nothing shows until a phase starts: a hit stays quiet.
        let _line = KernelLine::begin(&job.label, self.opts.quiet);
        let mut waited = false;
        let lock = loop {
            if !self.opts.force {
                if let Some(r) = self.hit(&job.key, &job.label)? {
                    if waited {
                        // Closes the "waiting for another build" note.
                        note(format!("cache hit {} after waiting ({:.2}s)", job.key, started.elapsed().as_secs_f64()));
                    }
                    return Ok(r);
                }
            }
            if let Some(l) = self.cache.try_lock_exclusive(&job.key)? {
                if !self.opts.force && self.is_hit(&job.key) {
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
            if !self.is_hit(&job.key) {
                // Not a builder after all (or it failed): build it ourselves.
                let l = self.cache.lock_exclusive(&job.key)?;
                if self.is_hit(&job.key) {
                    continue;
                }
                break l;
            }
        };
        // Local miss: another runner may have built it already.
        let remote_corrupt = match if self.opts.force { FromRemote::Nothing } else { self.pull_remote(&lock, &job.key) } {
            FromRemote::Entry(e) => {
                drop(lock);
                return self.pulled(*e, job.label);
            }
            FromRemote::Corrupt => true, // replaced by the upload after the build
            FromRemote::Nothing => false,
        };
        // Say why an old build of the same source is not reused (it never is).
        for e in self.cache.list().unwrap_or_default() {
            if let (true, Some(why)) = (e.meta.source == job.source, e.meta.stale_reason()) {
                note(format!("not reusing stale {} ({why}); `cargo ktstr kernel clean --stale` removes it", e.key));
            }
        }
        // ETA: this key's previous build, else its source's, else the last build under this label (a moved branch).
        let label_id = cache::label_timing_id(&job.label);
        progress::set_previous(self.cache.previous_duration(&job.key, Some(&job.source)).or_else(|| self.cache.previous_duration(&label_id, None)));
        if job.kind != "local" {
            progress::phase(Phase::Fetch, &format!("{} [{}, {base}]", job.source, job.key));
        }
        let tmp = match prefetched {
            Some(t) => t,
            None => self.cache.temp_build(&job.key)?,
        };
        let (src, sha) = fetch(tmp.path())?;
        if sha.is_some() {
            job.source_sha256 = sha;
        }
        let version = tree::source_version(&src).unwrap_or_else(|| job.label.clone());
        // The full log lives beside the entry so its path stays valid on failure.
        let log = self.cache.root().join(format!("{}.log", job.key));
        let _ = std::fs::remove_file(&log);
        config::configure(&src, &base, &self.fragments(), &self.make, &log)?;
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
            key_schema: cache::KEY_SCHEMA,
            source_kind: job.kind.to_string(),
            source_sha256: job.source_sha256.clone(),
            base_digest: job.digest.base.clone(),
            kconfig_sha256: job.digest.kconfig_sha256.clone(),
            extra_kconfig: self.opts.extra_kconfig.as_ref().map(|f| f.path.display().to_string()),
            extra_kconfig_sha256: job.digest.extra_sha256.clone(),
        };
        let entry = self.cache.store(&lock, &tmp, &art, Some(&log), meta)?;
        // Release waiters first; removing the multi-GB build dir takes a while.
        drop(lock);
        let lock = self.cache.lock_shared(&entry.key)?;
        self.cache.record_duration(&entry.key, started.elapsed().as_secs_f64());
        self.cache.record_duration(&label_id, started.elapsed().as_secs_f64());
        progress::done(format!("cached {} in {}: {}", entry.key, progress::short_duration(started.elapsed()), entry.dir.display()));
        drop(tmp);
        // After the exclusive lock is gone: local waiters take the entry meanwhile.
        self.push_remote(&entry, remote_corrupt);
        Ok(ResolvedKernel::cached(job.label, entry, lock, true))
    }

    /// Memo file of a local tarball: identified by path, size and mtime.
    fn memo_id(p: &Path) -> Option<String> {
        let m = std::fs::metadata(p).ok()?;
        let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
        Some(format!("{}|{}|{mtime}", p.canonicalize().ok()?.display(), m.len()))
    }

    fn memo_path(&self, id: &str) -> PathBuf {
        self.cache.root().join(".sources").join(format!("{:08x}", crc32fast::hash(id.as_bytes())))
    }

    fn memo_facts(&self, p: &Path) -> Option<(String, String)> {
        let id = Self::memo_id(p)?;
        let text = std::fs::read_to_string(self.memo_path(&id)).ok()?;
        let mut lines = text.lines();
        let (Some(got), Some(version), Some(sha)) = (lines.next(), lines.next(), lines.next()) else { return None };
        (got == id && sha.len() == 64).then(|| (version.to_string(), sha.to_string()))
    }

    fn remember_facts(&self, p: &Path, version: &str, sha: &str) {
        let Some(id) = Self::memo_id(p) else { return };
        let path = self.memo_path(&id);
        let Some(dir) = path.parent() else { return };
        let _ = std::fs::create_dir_all(dir);
        // Written to a temp file and renamed, so concurrent runs never read half.
        if let Ok(mut f) = tempfile::NamedTempFile::new_in(dir) {
            use std::io::Write;
            if writeln!(f, "{id}\n{version}\n{sha}").is_ok() {
                let _ = f.persist(&path);
            }
        }
    }
}

#[cfg(all(test, feature = "fetch"))]
mod tests {
    use super::*;

    /// A `.tar.xz` holding just a Makefile (version 6.12.9) and `extra`.
    fn tarball(dir: &Path, name: &str, extra: &str) -> PathBuf {
        let mut b = tar::Builder::new(xz2::write::XzEncoder::new(Vec::new(), 1));
        for (path, data) in [("linux/Makefile", "VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 9\n"), ("linux/x", extra)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, data.as_bytes()).unwrap();
        }
        let p = dir.join(name);
        std::fs::write(&p, b.into_inner().unwrap().finish().unwrap()).unwrap();
        p
    }

    fn key(spec: &Path, opts: &Options) -> String {
        let p = plan(spec.to_str().unwrap(), opts).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].status, PlanStatus::Miss);
        assert_eq!(p[0].label, "6.12.9");
        p[0].key.clone().unwrap()
    }

    #[test]
    fn tarball_keys_follow_content_and_config() {
        let d = tempfile::tempdir().unwrap();
        let opts = Options { cache_root: Some(d.path().join("cache")), ..Options::default() };
        let a = tarball(d.path(), "a.tar.xz", "vanilla");
        let b = tarball(d.path(), "b.tar.xz", "patched");
        let (ka, kb) = (key(&a, &opts), key(&b, &opts));
        assert_ne!(ka, kb, "same version, different bytes");
        let src7 = &fetch::sha256_file(&a).unwrap()[..7];
        assert!(ka.starts_with(&format!("6.12.9-tarball-{src7}-")), "{ka}");
        // Memoized: the same answer without re-reading (and a copy hashes alike).
        assert_eq!(key(&a, &opts), ka);
        let a2 = d.path().join("copy.tar.xz");
        std::fs::copy(&a, &a2).unwrap();
        assert_eq!(key(&a2, &opts), ka);
        let defconfig = Options { base: Some(Base::Defconfig), ..opts.clone() };
        assert_ne!(key(&a, &defconfig), ka);
        let frag = d.path().join("f");
        std::fs::write(&frag, "CONFIG_X=y\n").unwrap();
        let extra = Options { extra_kconfig: Some(Fragment::read(&frag).unwrap()), ..opts.clone() };
        assert_ne!(key(&a, &extra), ka);
        assert_ne!(key(&a, &extra), key(&a, &defconfig));
    }

    #[test]
    fn ranges_over_the_limit_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("m/v6.x")).unwrap();
        for p in 1..=17 {
            std::fs::write(d.path().join(format!("m/v6.x/linux-6.12.{p}.tar.xz")), b"").unwrap();
        }
        let opts = Options {
            cache_root: Some(d.path().join("cache")),
            mirror: Some(format!("file://{}", d.path().join("m").display())),
            ..Options::default()
        };
        let e = plan("6.12.1..6.12.17", &opts).unwrap_err();
        match e.downcast_ref::<ResolveError>() {
            Some(ResolveError::TooManyKernels { count: 17, max: 16, .. }) => {}
            _ => panic!("{e:#}"),
        }
        let e = resolve("6.12.1..6.12.17", &opts).unwrap_err().to_string();
        assert!(e.contains("expands to 17 kernels") && e.contains("--max-kernels 17"), "{e}");
        assert_eq!(plan("6.12.1..6.12.17", &Options { max_kernels: 17, ..opts.clone() }).unwrap().len(), 17);
        assert_eq!(plan("6.12.1..6.12.16", &opts).unwrap().len(), 16);
    }
}
