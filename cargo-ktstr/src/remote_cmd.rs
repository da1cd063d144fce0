//! `cargo ktstr kernel list --remote | push KEY | pull KEY`: the remote
//! kernel cache (`KTSTR_REMOTE_CACHE`) by hand.

use anyhow::{anyhow, bail, Result};
use kernel_build::remote::{Pulled, Pushed, Remote, REMOTE_ENV};
use kernel_build::Cache;

use crate::kernel_cmd::{age, size};

/// The configured remote, or an error saying how to configure one.
pub fn remote() -> Result<Remote> {
    Remote::from_env()?.ok_or_else(|| anyhow!("no remote kernel cache: set {REMOTE_ENV}=s3://BUCKET/PREFIX (and AWS_* credentials)"))
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", kernel_build::progress::mib(b))
}

/// A key names a directory (and its lock file) in the cache root: refuse anything else.
fn check_key(key: &str, listing: &str) -> Result<()> {
    if !kernel_build::spec::looks_like_cache_key(key) {
        bail!("{key:?} is not a cache key; see `cargo ktstr {listing}`");
    }
    Ok(())
}

pub fn list(json: bool) -> Result<()> {
    let r = remote()?;
    let entries = r.list()?;
    if json {
        let v: Vec<serde_json::Value> = entries
            .iter()
            .map(|(k, m)| match m {
                Ok(m) => serde_json::json!({"key": k, "uploaded": m.uploaded, "stored_bytes": m.stored_bytes(), "metadata": m.metadata}),
                Err(e) => serde_json::json!({"key": k, "error": format!("{e:#}")}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if entries.is_empty() {
        eprintln!("no kernels in remote cache {}", r.url());
        return Ok(());
    }
    let kw = entries.iter().map(|(k, _)| k.len()).max().unwrap_or(3).max(3);
    println!("{:kw$}  {:10}  {:5}  {:>7}  SOURCE", "KEY", "VERSION", "AGE", "STORED");
    for (k, m) in &entries {
        match m {
            Ok(m) => println!("{k:kw$}  {:10}  {:5}  {:>7}  {}", m.metadata.version, age(m.uploaded), size(m.stored_bytes()), m.metadata.source),
            Err(e) => println!("{k:kw$}  BAD MANIFEST: {}", format!("{e:#}").replace('\n', " ")),
        }
    }
    Ok(())
}

pub fn push(keys: &[String], force: bool) -> Result<()> {
    let r = remote()?;
    let cache = Cache::open(None)?;
    for key in keys {
        check_key(key, "kernel list")?;
        // Keeps `kernel clean` off the files from the lookup to the end of the upload.
        let _lock = cache.lock_shared(key)?;
        let Some(entry) = cache.lookup(key) else {
            bail!("kernel cache {} has no entry {key}; see `cargo ktstr kernel list`", cache.root().display());
        };
        if let Some(why) = entry.meta.stale_reason() {
            bail!("cache entry {key} is stale ({why}); rebuild it before pushing");
        }
        match r.push(&entry, force)? {
            Pushed::Uploaded { bytes, elapsed } => {
                println!("pushed {key} to {} ({} in {:.1}s)", r.url(), mib(bytes), elapsed.as_secs_f64())
            }
            Pushed::AlreadyThere => println!("{} already has {key} (push --force replaces it)", r.url()),
        }
    }
    Ok(())
}

pub fn pull(keys: &[String]) -> Result<()> {
    let r = remote()?;
    let cache = Cache::open(None)?;
    for key in keys {
        check_key(key, "kernel list --remote")?;
        let lock = cache.lock_exclusive(key)?;
        if cache.lookup(key).is_some_and(|e| e.meta.stale_reason().is_none()) {
            println!("{key} is already cached: {}", cache.entry_dir(key).display());
            continue;
        }
        match r.pull(&cache, &lock, key)? {
            Pulled::Hit { entry, bytes, elapsed } => {
                println!("pulled {key} from {} ({} in {:.1}s): {}", r.url(), mib(bytes), elapsed.as_secs_f64(), entry.dir.display())
            }
            Pulled::Missing => bail!("remote cache {} has no entry {key}; see `cargo ktstr kernel list --remote`", r.url()),
            Pulled::Corrupt(why) => bail!("remote cache entry {}/{key} is corrupt ({why}); rebuild it and `kernel push --force {key}`", r.url()),
        }
    }
    Ok(())
}
