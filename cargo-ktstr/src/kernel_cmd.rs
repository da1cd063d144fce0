//! `cargo ktstr kernel build|list|clean`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use kernel_build::{Base, Cache, Options};

use crate::remote_cmd;

const EXAMPLES: &str = "\
Examples:
  cargo ktstr kernel build 6.12                          # newest 6.12.x from kernel.org
  cargo ktstr kernel build /usr/src/linux-source-6.12.tar.xz
  cargo ktstr kernel build git+https://git.kernel.org/pub/scm/linux/kernel/git/tj/sched_ext.git#for-next
  cargo ktstr kernel build ../linux --base defconfig     # build a tree in place
  cargo ktstr kernel build 6.10..6.12 --mirror file:///srv/kernel.org/
  cargo ktstr kernel build --dry-run 6.12 --base defconfig  # key and hit/miss, builds nothing
  cargo ktstr kernel build 6.12 --extra-kconfig debug.kconfig
  cargo ktstr kernel build --offline 6.12                # newest cached 6.12.x, no network
  cargo ktstr kernel list --json
  cargo ktstr kernel clean --keep 2
  cargo ktstr kernel clean --stale                       # entries a resolve will not reuse
  KTSTR_REMOTE_CACHE=s3://ci-kernels/ktstr cargo ktstr kernel list --remote
  cargo ktstr kernel push 6.12.117-tarball-585a4a0-x86_64-kc22c3df21   # upload a cached entry
  cargo ktstr kernel pull 6.12.117-tarball-585a4a0-x86_64-kc22c3df21   # download one into the cache

Spec forms: VERSION (6.12, 6.12.9, 6.13-rc3), RANGE (6.10..6.12), TARBALL (path or URL,
.tar.xz/.tar.gz), git+URL#REF, PATH (source tree, image file, or a directory holding one),
CACHE-KEY. Build prints `label=image` on stdout, one line per kernel; --dry-run prints
`SPEC KEY hit|miss` instead.

Remote cache: KTSTR_REMOTE_CACHE=s3://BUCKET/PREFIX (credentials from AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION; a self-hosted store's URL in KTSTR_REMOTE_ENDPOINT or
AWS_ENDPOINT_URL). A local miss downloads from it before building; a build is uploaded.";

#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct KernelArgs {
    #[command(subcommand)]
    pub command: KernelCommand,
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Fetch, configure (base + ktstr.kconfig) and build a kernel into the cache.
    Build(BuildArgs),
    /// List cached kernels, newest first (STALE: a resolve will not reuse it).
    List {
        /// Print JSON (an array of metadata.json objects plus dir and disk size).
        #[arg(long)]
        json: bool,
        /// List the remote cache (KTSTR_REMOTE_CACHE) instead: committed entries only.
        #[arg(long)]
        remote: bool,
    },
    /// Upload cached entries to the remote cache (KTSTR_REMOTE_CACHE).
    Push {
        /// Cache keys (see `kernel list`).
        #[arg(value_name = "KEY", required = true)]
        keys: Vec<String>,
        /// Replace the remote entry even if one is there.
        #[arg(long)]
        force: bool,
    },
    /// Download entries from the remote cache into the local one (verified).
    Pull {
        /// Cache keys (see `kernel list --remote`).
        #[arg(value_name = "KEY", required = true)]
        keys: Vec<String>,
    },
    /// Remove cached kernels (never ones whose lock is held).
    Clean {
        /// Keep the N newest entries, remove the rest.
        #[arg(long, value_name = "N", conflicts_with_all = ["keys", "stale"])]
        keep: Option<usize>,
        /// Remove only the entries `kernel list` marks STALE (old key shape, other inputs).
        #[arg(long, conflicts_with = "keys")]
        stale: bool,
        /// Remove these entries only.
        #[arg(value_name = "KEY")]
        keys: Vec<String>,
    },
}

#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct BuildArgs {
    /// VERSION, RANGE, TARBALL, git+URL#REF, PATH or CACHE-KEY (see docs).
    #[arg(value_name = "SPEC", required = true)]
    pub specs: Vec<String>,
    /// Release mirror base URL in kernel.org layout (http(s):// or file://).
    #[arg(long, value_name = "URL", env = "KTSTR_KERNEL_MIRROR")]
    pub mirror: Option<String>,
    /// Base config the ktstr fragment is merged onto.
    #[arg(long, value_name = "BASE", value_parser = ["tinyconfig", "defconfig"], conflicts_with = "config")]
    pub base: Option<String>,
    /// Your own .config as the base.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Rebuild even if the kernel is cached.
    #[arg(long)]
    pub force: bool,
    /// Parallel make jobs (default: CPU count).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Print each spec's cache key and `hit` or `miss`; fetch and build nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Options `kernel build` and `test` share.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Kconfig fragment merged after ktstr.kconfig (part of the cache key).
    #[arg(long, value_name = "FILE")]
    pub extra_kconfig: Option<PathBuf>,
    /// Never touch the network: version specs resolve to cached builds only.
    #[arg(long, env = "KTSTR_OFFLINE", value_parser = clap::builder::BoolishValueParser::new(), num_args = 0, default_missing_value = "true")]
    pub offline: bool,
    /// Most kernels one range may expand to.
    #[arg(long, value_name = "N", default_value_t = kernel_build::DEFAULT_MAX_KERNELS)]
    pub max_kernels: usize,
    /// Hide the per-kernel progress lines (fetch, configure, build); warnings and errors still print.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

impl CommonArgs {
    /// Applies these flags to `opts` (reads the extra fragment).
    pub fn apply(&self, opts: &mut Options) -> Result<()> {
        if let Some(p) = &self.extra_kconfig {
            opts.extra_kconfig = Some(kernel_build::Fragment::read(p)?);
        }
        opts.offline = self.offline;
        opts.max_kernels = self.max_kernels;
        opts.quiet = self.quiet;
        opts.remote = kernel_build::remote::Config::from_env()?;
        Ok(())
    }
}

pub fn run(args: KernelArgs) -> Result<()> {
    match args.command {
        KernelCommand::Build(b) => build(b),
        KernelCommand::List { json, remote: true } => remote_cmd::list(json),
        KernelCommand::List { json, remote: false } => list(json),
        KernelCommand::Push { keys, force } => remote_cmd::push(&keys, force),
        KernelCommand::Pull { keys } => remote_cmd::pull(&keys),
        KernelCommand::Clean { keep, stale, keys } => clean(keep, stale, &keys),
    }
}

fn build(b: BuildArgs) -> Result<()> {
    let base = match (&b.base, &b.config) {
        (_, Some(f)) => {
            if !f.is_file() {
                bail!("--config {}: no such file", f.display());
            }
            Some(Base::File(f.clone()))
        }
        (Some(s), None) => Some(Base::parse(s)?),
        (None, None) => None,
    };
    let mut opts = Options { mirror: b.mirror, base, force: b.force, jobs: b.jobs, ..Options::default() };
    b.common.apply(&mut opts)?;
    // Parse every spec first so a typo in the last one fails before any build.
    for s in &b.specs {
        kernel_build::KernelSpec::parse(s)?;
    }
    if b.dry_run {
        for s in &b.specs {
            for p in kernel_build::plan(s, &opts)? {
                println!("{s} {} {}", p.key.as_deref().unwrap_or("-"), p.status);
            }
        }
        return Ok(());
    }
    for s in &b.specs {
        for k in kernel_build::resolve(s, &opts)? {
            // stdout: `label=image`, the KTSTR_KERNEL_LIST entry format.
            println!("{}={}", k.label, k.image.display());
        }
    }
    Ok(())
}

pub(crate) fn age(secs: u64) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let a = now.saturating_sub(secs);
    match a {
        0..=119 => format!("{a}s"),
        120..=7199 => format!("{}m", a / 60),
        7200..=172_799 => format!("{}h", a / 3600),
        _ => format!("{}d", a / 86400),
    }
}

pub(crate) fn size(bytes: u64) -> String {
    let mib = kernel_build::progress::mib(bytes);
    if mib >= 1024.0 {
        format!("{:.1}G", mib / 1024.0)
    } else {
        format!("{mib:.1}M")
    }
}

fn list(json: bool) -> Result<()> {
    let cache = Cache::open(None)?;
    let entries = cache.list()?;
    if json {
        let v: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let mut m = serde_json::to_value(&e.meta).unwrap_or_default();
                if let Some(o) = m.as_object_mut() {
                    o.insert("dir".into(), e.dir.display().to_string().into());
                    o.insert("image".into(), e.image().display().to_string().into());
                    o.insert("disk_size".into(), e.disk_size().into());
                    o.insert("stale".into(), e.meta.stale_reason().into());
                }
                m
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if entries.is_empty() {
        eprintln!("no cached kernels in {}", cache.root().display());
        return Ok(());
    }
    let kw = entries.iter().map(|e| e.key.len()).max().unwrap_or(3).max(3);
    let vw = entries.iter().map(|e| e.meta.version.len()).max().unwrap_or(7).max(7);
    println!("{:kw$}  {:vw$}  {:5}  {:>7}  SOURCE", "KEY", "VERSION", "AGE", "SIZE");
    let mut stale = 0;
    for e in &entries {
        let mark = match e.meta.stale_reason() {
            Some(r) => {
                stale += 1;
                format!("  STALE: {r}")
            }
            None => String::new(),
        };
        println!(
            "{:kw$}  {:vw$}  {:5}  {:>7}  {}{mark}",
            e.key,
            e.meta.version,
            age(e.meta.build_time),
            size(e.disk_size()),
            e.meta.source
        );
    }
    if stale > 0 {
        eprintln!("{stale} stale entr{} (never reused): remove with `cargo ktstr kernel clean --stale`", if stale == 1 { "y" } else { "ies" });
    }
    Ok(())
}

fn clean(keep: Option<usize>, stale: bool, keys: &[String]) -> Result<()> {
    let cache = Cache::open(None)?;
    let r = if stale {
        let keys = cache.stale_keys()?;
        if keys.is_empty() {
            eprintln!("no stale entries in {}", cache.root().display());
            return Ok(());
        }
        cache.clean(None, &keys)?
    } else {
        cache.clean(keep, keys)?
    };
    for k in &r.removed {
        println!("removed {k}");
    }
    for k in &r.locked {
        eprintln!("kept {k}: its lock is held (a build or test is using it)");
    }
    // VM snapshots are made from cached kernels; any clean drops them.
    let snaps = cache.clean_snapshots()?;
    for k in &snaps.removed {
        println!("removed VM snapshot {k}");
    }
    for k in &snaps.locked {
        eprintln!("kept VM snapshot {k}: a test is restoring from it");
    }
    if !r.missing.is_empty() {
        bail!("no such cache entr{}: {}", if r.missing.len() == 1 { "y" } else { "ies" }, r.missing.join(", "));
    }
    Ok(())
}
