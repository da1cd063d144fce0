//! The remote kernel cache: cache entries shared between machines through
//! an S3-compatible object store (`KTSTR_REMOTE_CACHE=s3://bucket/prefix`).
//!
//! Layout under the prefix, per key:
//! - `{key}/objects/{upload}/{file}`: the entry's files of one upload
//!   (`vmlinux` zstd-compressed as `vmlinux.zst`), `{upload}` unique per
//!   uploader, so two runners never write the same object;
//! - `{key}/manifest.json`: names the upload and every file's size and
//!   SHA-256. It is written last and only if absent: it is the commit
//!   point, so a killed upload leaves no visible entry and of two runners
//!   uploading one key, the first manifest wins (the loser deletes its
//!   objects).
//!
//! A download verifies every file against the manifest and is stored like
//! a build (temp dir beside the entry, then rename, under the exclusive
//! lock); anything that does not verify is a [`Pulled::Corrupt`], which the
//! resolver reports on one line and rebuilds over.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use crate::cache::{Cache, CacheEntry, EntryLock, Metadata};
use crate::fetch::HashingReader;
use crate::tree;

/// `s3://bucket[/prefix]`: turns the remote cache on.
pub const REMOTE_ENV: &str = "KTSTR_REMOTE_CACHE";
/// Endpoint of a self-hosted S3-compatible store (else `AWS_ENDPOINT_URL`).
pub const ENDPOINT_ENV: &str = "KTSTR_REMOTE_ENDPOINT";
/// `1`: allow a plain-http endpoint that is not on the loopback.
pub const ALLOW_HTTP_ENV: &str = "KTSTR_REMOTE_ALLOW_HTTP";
/// Test hook: sleep this many seconds after the objects are uploaded and
/// before the manifest is written (how the tests kill an upload midway).
pub const STALL_ENV: &str = "KTSTR_REMOTE_STALL_BEFORE_COMMIT";

const MANIFEST: &str = "manifest.json";
const MANIFEST_SCHEMA: u32 = 1;
/// zstd level for vmlinux: fast, and most of its bytes are debug info that squeezes well.
const ZSTD_LEVEL: i32 = 3;

/// Where the remote cache is, parsed from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The `s3://…` URL as given (trailing `/` dropped), for messages.
    pub url: String,
    pub bucket: String,
    /// Object prefix without leading or trailing `/` (may be empty).
    pub prefix: String,
    pub endpoint: Option<String>,
    pub allow_http: bool,
}

impl Config {
    /// Parses `s3://bucket[/prefix]` with an optional endpoint override.
    pub fn parse(url: &str, endpoint: Option<&str>, allow_http: bool) -> Result<Config> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            anyhow!("{REMOTE_ENV}={url:?} is not an s3:// URL; use s3://BUCKET/PREFIX (other stores: an S3-compatible endpoint in {ENDPOINT_ENV})")
        })?;
        let rest = rest.trim_end_matches('/');
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("{REMOTE_ENV}={url:?} names no bucket; use s3://BUCKET/PREFIX");
        }
        let endpoint = endpoint.map(|e| e.trim_end_matches('/').to_string()).filter(|e| !e.is_empty());
        if let Some(e) = &endpoint {
            if let Some(hostport) = e.strip_prefix("http://") {
                let host = hostport.split('/').next().unwrap_or("");
                let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
                let loopback = host == "localhost" || host == "[::1]" || host.starts_with("127.");
                if !loopback && !allow_http {
                    bail!("remote cache endpoint {e} is plain http off the loopback (credentials in the clear); use https, or set {ALLOW_HTTP_ENV}=1");
                }
            } else if !e.starts_with("https://") {
                bail!("remote cache endpoint {e:?} is not an http(s):// URL; set {ENDPOINT_ENV}=https://HOST[:PORT]");
            }
        }
        let allow_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        Ok(Config {
            url: format!("s3://{}", rest),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint,
            allow_http,
        })
    }

    /// From [`REMOTE_ENV`] (unset or empty: `None`), [`ENDPOINT_ENV`] else
    /// `AWS_ENDPOINT_URL`, and [`ALLOW_HTTP_ENV`].
    pub fn from_env() -> Result<Option<Config>> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let Some(url) = var(REMOTE_ENV) else { return Ok(None) };
        let endpoint = var(ENDPOINT_ENV).or_else(|| var("AWS_ENDPOINT_URL"));
        Config::parse(&url, endpoint.as_deref(), var(ALLOW_HTTP_ENV).as_deref() == Some("1")).map(Some)
    }
}

/// One file of an entry as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    /// Name in the entry directory (`bzImage`, `vmlinux`, `.config`, `metadata.json`).
    pub name: String,
    /// Object path relative to the key's directory.
    pub object: String,
    /// `identity` or `zstd`.
    pub encoding: String,
    /// Size and SHA-256 of the file itself (after decoding).
    pub size: u64,
    pub sha256: String,
    /// Bytes of the object as stored.
    pub stored_size: u64,
}

/// `{key}/manifest.json`: the commit point of one upload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub schema: u32,
    pub key: String,
    pub upload: String,
    /// Unix seconds of the upload.
    pub uploaded: u64,
    pub files: Vec<FileRecord>,
    /// The entry's metadata.json, for listings without a download.
    pub metadata: Metadata,
}

impl Manifest {
    /// Bytes the objects take in the store.
    pub fn stored_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.stored_size).sum()
    }
}

/// What [`Remote::pull`] found.
#[derive(Debug)]
pub enum Pulled {
    /// Downloaded, verified and stored in the local cache.
    Hit { entry: Box<CacheEntry>, bytes: u64, elapsed: Duration },
    /// No manifest under the key.
    Missing,
    /// A manifest whose objects are missing or do not verify; the reason.
    Corrupt(String),
}

/// What [`Remote::push`] did.
#[derive(Debug, PartialEq)]
pub enum Pushed {
    Uploaded { bytes: u64, elapsed: Duration },
    /// Another upload's manifest was there first (nothing of ours stays).
    AlreadyThere,
}

/// A connection to the remote cache.
pub struct Remote {
    cfg: Config,
    store: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.cfg.url).finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// The files of an entry that travel, and how.
fn travelling(entry: &CacheEntry) -> Vec<(PathBuf, &'static str, bool)> {
    let mut v = vec![(entry.image(), tree::image_name(), false)];
    for name in crate::cache::ENTRY_FILES {
        let p = entry.dir.join(name);
        // vmlinux is optional, and large: it travels compressed.
        if name != "vmlinux" || p.is_file() {
            v.push((p, name, name == "vmlinux"));
        }
    }
    v
}

impl Remote {
    pub fn new(cfg: Config) -> Result<Remote> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            // Self-hosted stores rarely have per-bucket DNS names.
            .with_virtual_hosted_style_request(false)
            .with_allow_http(cfg.allow_http)
            // An unreachable store must cost seconds, not the default minutes of retries.
            .with_retry(RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(20), ..RetryConfig::default() });
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            b = b.with_region("us-east-1");
        }
        let store = b.build().with_context(|| format!("remote kernel cache {}: bad S3 settings (AWS_* variables)", cfg.url))?;
        Remote::with_store(cfg, Arc::new(store))
    }

    /// A remote on any object store (the unit tests use an in-memory one).
    pub fn with_store(cfg: Config, store: Arc<dyn ObjectStore>) -> Result<Remote> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the remote cache's I/O runtime")?;
        Ok(Remote { cfg, store, rt })
    }

    /// The remote cache of [`Config::from_env`], if configured.
    pub fn from_env() -> Result<Option<Remote>> {
        Config::from_env()?.map(Remote::new).transpose()
    }

    pub fn url(&self) -> &str {
        &self.cfg.url
    }

    fn path(&self, rel: &str) -> ObjPath {
        if self.cfg.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.cfg.prefix))
        }
    }

    fn get(&self, rel: &str) -> std::result::Result<bytes::Bytes, object_store::Error> {
        let p = self.path(rel);
        self.rt.block_on(async { self.store.get(&p).await?.bytes().await })
    }

    /// The manifest under `key`: `Ok(None)` when there is none, `Ok(Some(Err(why)))`
    /// when it does not parse or names another key; `Err` for transport errors.
    pub fn manifest_state(&self, key: &str) -> Result<Option<std::result::Result<Manifest, String>>> {
        let rel = format!("{key}/{MANIFEST}");
        let raw = match self.get(&rel) {
            Ok(b) => b,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => {
                return Err(anyhow!(
                    "remote kernel cache {}: reading {rel}: {e} (check {ENDPOINT_ENV}/AWS_ENDPOINT_URL and the AWS_* credentials)",
                    self.cfg.url
                ))
            }
        };
        let m: Manifest = match serde_json::from_slice(&raw) {
            Ok(m) => m,
            Err(e) => return Ok(Some(Err(format!("its manifest does not parse ({e})")))),
        };
        if m.key != key || m.schema != MANIFEST_SCHEMA {
            return Ok(Some(Err(format!("its manifest names key {} (schema {}), expected {key} (schema {MANIFEST_SCHEMA})", m.key, m.schema))));
        }
        Ok(Some(Ok(m)))
    }

    /// The manifest under `key`, `None` when there is none; a bad one is an error.
    pub fn manifest(&self, key: &str) -> Result<Option<Manifest>> {
        match self.manifest_state(key)? {
            None => Ok(None),
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(why)) => bail!("{}/{key}: {why}", self.cfg.url),
        }
    }

    /// Every committed entry (keys with a manifest), sorted by key.
    /// Unreadable manifests are listed with their error.
    pub fn list(&self) -> Result<Vec<(String, Result<Manifest>)>> {
        let root = if self.cfg.prefix.is_empty() { None } else { Some(ObjPath::from(self.cfg.prefix.as_str())) };
        let res = self
            .rt
            .block_on(self.store.list_with_delimiter(root.as_ref()))
            .with_context(|| format!("listing remote kernel cache {}", self.cfg.url))?;
        let mut keys: Vec<String> = res.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            match self.manifest(&k) {
                Ok(Some(m)) => out.push((k, Ok(m))),
                Ok(None) => {} // objects of an upload that never committed
                Err(e) => out.push((k, Err(e))),
            }
        }
        Ok(out)
    }

    /// Uploads the local `entry` whole: its objects under a fresh upload id,
    /// then the manifest, only if absent (`overwrite`: replace one, used
    /// over a corrupt entry). The caller holds a lock on the entry.
    pub fn push(&self, entry: &CacheEntry, overwrite: bool) -> Result<Pushed> {
        let started = Instant::now();
        let key = &entry.key;
        // A manifest already there (good or bad) would refuse ours: skip the
        // upload. PutMode::Create below still settles a race.
        if !overwrite && self.manifest_state(key)?.is_some() {
            return Ok(Pushed::AlreadyThere);
        }
        let upload = format!("{}-{}-{:x}", now_secs(), std::process::id(), rand_suffix());
        let mut files = Vec::new();
        let mut bytes = 0u64;
        for (path, name, compress) in travelling(entry) {
            let raw = std::fs::read(&path).with_context(|| format!("reading {} to upload {key}", path.display()))?;
            let sha256 = crate::sha256_hex(&raw);
            let size = raw.len() as u64;
            let (data, object, encoding) = if compress {
                let z = zstd::bulk::compress(&raw, ZSTD_LEVEL).with_context(|| format!("compressing {}", path.display()))?;
                (z, format!("objects/{upload}/{name}.zst"), "zstd")
            } else {
                (raw, format!("objects/{upload}/{name}"), "identity")
            };
            let stored_size = data.len() as u64;
            let p = self.path(&format!("{key}/{object}"));
            self.rt
                .block_on(self.store.put(&p, PutPayload::from(data)))
                .with_context(|| format!("uploading {key}/{object} to {}", self.cfg.url))?;
            bytes += stored_size;
            files.push(FileRecord { name: name.to_string(), object, encoding: encoding.to_string(), size, sha256, stored_size });
        }
        if let Some(secs) = std::env::var(STALL_ENV).ok().and_then(|s| s.parse::<f64>().ok()) {
            crate::progress::note(format!("{key}: objects uploaded, stalling {secs}s before the manifest ({STALL_ENV})"));
            std::thread::sleep(Duration::from_secs_f64(secs));
        }
        let m = Manifest { schema: MANIFEST_SCHEMA, key: key.clone(), upload: upload.clone(), uploaded: now_secs(), files, metadata: entry.meta.clone() };
        let body = PutPayload::from(serde_json::to_vec_pretty(&m)?);
        let mp = self.path(&format!("{key}/{MANIFEST}"));
        let previous = if overwrite { self.manifest(key).ok().flatten() } else { None };
        let mode = if overwrite { PutMode::Overwrite } else { PutMode::Create };
        match self.rt.block_on(self.store.put_opts(&mp, body, PutOptions { mode, ..PutOptions::default() })) {
            Ok(_) => {
                // The replaced upload's objects are unreachable now.
                if let Some(old) = previous.filter(|o| o.upload != upload) {
                    self.delete_upload(key, &old.upload);
                }
                Ok(Pushed::Uploaded { bytes, elapsed: started.elapsed() })
            }
            Err(object_store::Error::AlreadyExists { .. }) | Err(object_store::Error::Precondition { .. }) => {
                self.delete_upload(key, &upload);
                Ok(Pushed::AlreadyThere)
            }
            Err(e) => Err(anyhow!("committing {key}/{MANIFEST} to {}: {e}", self.cfg.url)),
        }
    }

    /// Removes the objects of one upload (best effort: orphans only cost space).
    fn delete_upload(&self, key: &str, upload: &str) {
        use futures::StreamExt;
        let prefix = self.path(&format!("{key}/objects/{upload}"));
        self.rt.block_on(async {
            let objs: Vec<_> = self.store.list(Some(&prefix)).filter_map(|r| async move { r.ok() }).collect().await;
            for o in objs {
                let _ = self.store.delete(&o.location).await;
            }
        });
    }

    /// Downloads `key` into `cache` and verifies it, under the caller's
    /// exclusive `lock` on the key. Transport errors are `Err`.
    pub fn pull(&self, cache: &Cache, lock: &EntryLock, key: &str) -> Result<Pulled> {
        let started = Instant::now();
        let m = match self.manifest_state(key)? {
            Some(Ok(m)) => m,
            None => return Ok(Pulled::Missing),
            Some(Err(why)) => return Ok(Pulled::Corrupt(why)),
        };
        let tmp = cache.temp_build(&format!("pull-{key}"))?;
        let staged = tmp.path().join("entry");
        std::fs::create_dir_all(&staged)?;
        let mut bytes = 0u64;
        let image = tree::image_name();
        for need in [image, ".config", "metadata.json"] {
            if !m.files.iter().any(|f| f.name == need) {
                return Ok(Pulled::Corrupt(format!("its manifest lists no {need}")));
            }
        }
        let mut meta = None;
        for f in &m.files {
            if f.name.contains('/') || f.name.starts_with("..") || f.name.is_empty() {
                return Ok(Pulled::Corrupt(format!("its manifest names a bad file {:?}", f.name)));
            }
            let data = match self.get(&format!("{key}/{}", f.object)) {
                Ok(d) => d,
                Err(e) if is_not_found(&e) => return Ok(Pulled::Corrupt(format!("object {} is missing", f.object))),
                Err(e) => return Err(anyhow!("downloading {key}/{} from {}: {e}", f.object, self.cfg.url)),
            };
            bytes += data.len() as u64;
            // Hashed on the way: the identity bytes as downloaded, zstd while decoding.
            let (plain, got) = match f.encoding.as_str() {
                "identity" => {
                    let got = crate::sha256_hex(&data);
                    (data, got)
                }
                "zstd" => {
                    let mut out = Vec::with_capacity(f.size as usize);
                    match zstd::stream::read::Decoder::new(&data[..]).map(HashingReader::new).and_then(|mut d| {
                        d.read_to_end(&mut out)?;
                        Ok(d.hex())
                    }) {
                        Ok(got) => (bytes::Bytes::from(out), got),
                        Err(e) => return Ok(Pulled::Corrupt(format!("{} does not decompress ({e})", f.object))),
                    }
                }
                other => return Ok(Pulled::Corrupt(format!("{} has unknown encoding {other:?}", f.object))),
            };
            if got != f.sha256 || plain.len() as u64 != f.size {
                return Ok(Pulled::Corrupt(format!(
                    "{} has SHA-256 {}… ({} bytes), its manifest says {}… ({} bytes)",
                    f.name,
                    &got[..12],
                    plain.len(),
                    &f.sha256[..12.min(f.sha256.len())],
                    f.size
                )));
            }
            std::fs::write(staged.join(&f.name), &plain).with_context(|| format!("writing {} into {}", f.name, staged.display()))?;
            if f.name == "metadata.json" {
                meta = Some(plain);
            }
        }
        // The manifest lists a metadata.json (checked above), so it was read.
        let meta: Metadata = match serde_json::from_slice(meta.as_deref().unwrap_or_default()) {
            Ok(m) => m,
            Err(e) => return Ok(Pulled::Corrupt(format!("its metadata.json does not parse ({e})"))),
        };
        if meta.key != key {
            return Ok(Pulled::Corrupt(format!("its metadata.json names key {}", meta.key)));
        }
        if let Some(why) = meta.stale_reason() {
            return Ok(Pulled::Corrupt(format!("it is stale ({why})")));
        }
        let entry = cache.install(lock, &tmp, &staged, meta)?;
        Ok(Pulled::Hit { entry: Box::new(entry), bytes, elapsed: started.elapsed() })
    }

    /// Deletes the manifest (and objects) of `key`; for tests and tools.
    pub fn remove(&self, key: &str) -> Result<()> {
        use futures::StreamExt;
        let prefix = self.path(key);
        self.rt.block_on(async {
            let objs: Vec<_> = self.store.list(Some(&prefix)).collect().await;
            for o in objs {
                let o = o?;
                self.store.delete(&o.location).await?;
            }
            Ok::<_, object_store::Error>(())
        })?;
        Ok(())
    }

    /// Writes raw bytes at `{key}/{rel}` (tests use it to tamper with an entry).
    pub fn put_raw(&self, key: &str, rel: &str, data: Vec<u8>) -> Result<()> {
        let p = self.path(&format!("{key}/{rel}"));
        self.rt.block_on(self.store.put(&p, PutPayload::from(data)))?;
        Ok(())
    }

    /// Object paths (relative to the prefix) under `key`, sorted.
    pub fn objects(&self, key: &str) -> Result<Vec<String>> {
        use futures::StreamExt;
        let prefix = self.path(key);
        let strip = if self.cfg.prefix.is_empty() { String::new() } else { format!("{}/", self.cfg.prefix) };
        let mut v: Vec<String> = self.rt.block_on(async {
            self.store.list(Some(&prefix)).collect::<Vec<_>>().await.into_iter().collect::<std::result::Result<Vec<_>, _>>()
        })?
        .into_iter()
        .map(|o| o.location.to_string().trim_start_matches(&strip).to_string())
        .collect();
        v.sort();
        Ok(v)
    }
}

/// A few random bits for upload ids (two runners in one second and pid).
fn rand_suffix() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_le_bytes(b) ^ (SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) as u64)
}

/// Bytes of a path's file, or 0.
pub fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored entry in `root` whose metadata is current (not stale).
    fn entry(root: &Path, key: &str) -> (Cache, CacheEntry) {
        let c = Cache::open(Some(root)).unwrap();
        let d = crate::config::InputDigest::new(&crate::Base::Tinyconfig, None, None).unwrap();
        let key = format!("{key}-kc{}", d.kc());
        let dir = c.entry_dir(&key);
        std::fs::create_dir_all(&dir).unwrap();
        let mut img = vec![0u8; 8192];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(dir.join(tree::image_name()), img).unwrap();
        std::fs::write(dir.join("vmlinux"), b"\x7fELF".repeat(5000)).unwrap();
        std::fs::write(dir.join(".config"), "CONFIG_X=y\n").unwrap();
        std::fs::write(dir.join("build.log"), "not uploaded").unwrap();
        let meta = Metadata {
            key: key.clone(),
            spec: "s".into(),
            source: "src".into(),
            version: "6.12.9".into(),
            arch: tree::arch().into(),
            kconfig_hash: crate::kconfig_hash(),
            base: "tinyconfig".into(),
            build_time: 7,
            build_duration_secs: 1.0,
            image_size: 8192,
            key_schema: crate::cache::KEY_SCHEMA,
            source_kind: "local".into(),
            source_sha256: None,
            base_digest: d.base,
            kconfig_sha256: d.kconfig_sha256,
            extra_kconfig: None,
            extra_kconfig_sha256: None,
        };
        std::fs::write(dir.join("metadata.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        let e = c.lookup(&key).unwrap();
        (c, e)
    }

    fn memory_remote() -> Remote {
        let cfg = Config::parse("s3://b/p", None, false).unwrap();
        Remote::with_store(cfg, Arc::new(object_store::memory::InMemory::new())).unwrap()
    }

    fn pull_into(r: &Remote, root: &Path, key: &str) -> Pulled {
        let c = Cache::open(Some(root)).unwrap();
        let lock = c.lock_exclusive(key).unwrap();
        r.pull(&c, &lock, key).unwrap()
    }

    #[test]
    fn push_then_pull_round_trips_and_verifies() {
        let d = tempfile::tempdir().unwrap();
        let (_, e) = entry(&d.path().join("a"), "local-0123456-x86_64");
        let r = memory_remote();
        assert!(matches!(pull_into(&r, &d.path().join("b"), &e.key), Pulled::Missing));
        let Pushed::Uploaded { bytes, .. } = r.push(&e, false).unwrap() else { panic!("first push uploads") };
        let m = r.manifest(&e.key).unwrap().unwrap();
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [tree::image_name(), "vmlinux", ".config", "metadata.json"], "no build.log");
        let vm = m.files.iter().find(|f| f.name == "vmlinux").unwrap();
        assert_eq!(vm.encoding, "zstd");
        assert!(vm.stored_size < vm.size, "vmlinux travels compressed");
        // What push reports and the manifest records is what the store holds.
        let sizes: std::collections::BTreeMap<String, u64> = r
            .rt
            .block_on(async {
                use futures::StreamExt;
                r.store.list(Some(&r.path(&e.key))).collect::<Vec<_>>().await
            })
            .into_iter()
            .map(|o| o.unwrap())
            .filter(|o| !o.location.as_ref().ends_with(MANIFEST))
            .map(|o| (o.location.to_string(), o.size))
            .collect();
        assert_eq!(sizes.len(), m.files.len(), "{sizes:?}");
        for f in &m.files {
            assert_eq!(sizes.get(&r.path(&format!("{}/{}", e.key, f.object)).to_string()), Some(&f.stored_size), "{}", f.name);
        }
        assert_eq!(bytes, sizes.values().sum::<u64>());
        assert_eq!(r.list().unwrap().into_iter().map(|(k, m)| (k, m.is_ok())).collect::<Vec<_>>(), [(e.key.clone(), true)]);

        let Pulled::Hit { entry: got, .. } = pull_into(&r, &d.path().join("b"), &e.key) else { panic!("pull hits") };
        for f in [tree::image_name(), "vmlinux", ".config", "metadata.json"] {
            assert_eq!(std::fs::read(got.dir.join(f)).unwrap(), std::fs::read(e.dir.join(f)).unwrap(), "{f}");
        }
        assert_eq!(got.meta, e.meta);
        let leftovers: Vec<_> = std::fs::read_dir(d.path().join("b")).unwrap().flatten().filter(|x| x.file_name().to_string_lossy().starts_with(".tmp-")).collect();
        assert!(leftovers.is_empty(), "the download's temp dir is gone");
    }

    #[test]
    fn second_push_loses_and_removes_its_objects() {
        let d = tempfile::tempdir().unwrap();
        let (_, e) = entry(d.path(), "local-0123456-x86_64");
        let r = memory_remote();
        r.push(&e, false).unwrap();
        let first = r.manifest(&e.key).unwrap().unwrap().upload;
        assert_eq!(r.push(&e, false).unwrap(), Pushed::AlreadyThere);
        assert_eq!(r.manifest(&e.key).unwrap().unwrap().upload, first, "the first manifest stays");
        let objs = r.objects(&e.key).unwrap();
        assert!(objs.iter().all(|o| o.ends_with("manifest.json") || o.contains(&format!("/objects/{first}/"))), "{objs:?}");
        // --force replaces it, and the replaced upload's objects go.
        assert!(matches!(r.push(&e, true).unwrap(), Pushed::Uploaded { .. }));
        let second = r.manifest(&e.key).unwrap().unwrap().upload;
        assert_ne!(second, first);
        assert!(r.objects(&e.key).unwrap().iter().all(|o| !o.contains(&first)));
    }

    #[test]
    fn uncommitted_tampered_or_foreign_entries_are_not_used() {
        let d = tempfile::tempdir().unwrap();
        let (_, e) = entry(&d.path().join("a"), "local-0123456-x86_64");
        let r = memory_remote();
        r.push(&e, false).unwrap();
        let m = r.manifest(&e.key).unwrap().unwrap();
        let corrupt = |root: &str| match pull_into(&r, &d.path().join(root), &e.key) {
            Pulled::Corrupt(why) => {
                assert!(Cache::at(Some(&d.path().join(root))).lookup(&e.key).is_none(), "nothing stored");
                why
            }
            other => panic!("{other:?}"),
        };
        // Tampered image.
        let img = m.files.iter().find(|f| f.name == tree::image_name()).unwrap();
        r.put_raw(&e.key, &img.object, b"evil".to_vec()).unwrap();
        assert!(corrupt("t1").contains("SHA-256"));
        // Missing object (an upload cut short after someone deleted objects).
        r.rt.block_on(r.store.delete(&r.path(&format!("{}/{}", e.key, img.object)))).unwrap();
        assert!(corrupt("t2").contains("missing"));
        // A compressed object that is not zstd.
        let vm = m.files.iter().find(|f| f.name == "vmlinux").unwrap();
        r.push(&e, true).unwrap();
        let m2 = r.manifest(&e.key).unwrap().unwrap();
        let vm2 = m2.files.iter().find(|f| f.name == "vmlinux").unwrap();
        assert_ne!(vm.object, vm2.object);
        r.put_raw(&e.key, &vm2.object, b"not zstd".to_vec()).unwrap();
        assert!(corrupt("t3").contains("decompress"));
        // A manifest naming another key, and one that is not JSON.
        let mut other = m2.clone();
        other.key = "someone-else".into();
        r.put_raw(&e.key, MANIFEST, serde_json::to_vec(&other).unwrap()).unwrap();
        assert!(corrupt("t4").contains("names key someone-else"));
        r.put_raw(&e.key, MANIFEST, b"{".to_vec()).unwrap();
        assert!(corrupt("t5").contains("does not parse"));
        assert!(r.list().unwrap()[0].1.is_err(), "list shows the bad manifest as an error");
        // Objects without a manifest (a killed upload) are no entry at all.
        r.rt.block_on(r.store.delete(&r.path(&format!("{}/{MANIFEST}", e.key)))).unwrap();
        assert!(!r.objects(&e.key).unwrap().is_empty());
        assert!(matches!(pull_into(&r, &d.path().join("t6"), &e.key), Pulled::Missing));
        assert!(r.list().unwrap().is_empty());
    }

    #[test]
    fn config_parses_urls_and_guards_plain_http() {
        let c = Config::parse("s3://bkt/some/prefix/", Some("http://127.0.0.1:9000/"), false).unwrap();
        assert_eq!((c.bucket.as_str(), c.prefix.as_str(), c.url.as_str()), ("bkt", "some/prefix", "s3://bkt/some/prefix"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.allow_http);
        let c = Config::parse("s3://bkt", None, false).unwrap();
        assert_eq!((c.prefix.as_str(), c.endpoint.clone(), c.allow_http), ("", None, false));
        assert!(Config::parse("s3://bkt", Some("https://minio.example:9000"), false).is_ok_and(|c| !c.allow_http));
        assert!(Config::parse("s3://b", Some("http://localhost:1"), false).is_ok());
        let e = Config::parse("s3://b", Some("http://10.1.2.3:9000"), false).unwrap_err().to_string();
        assert!(e.contains(ALLOW_HTTP_ENV), "{e}");
        assert!(Config::parse("s3://b", Some("http://10.1.2.3:9000"), true).is_ok());
        for bad in ["gs://b/p", "s3:///p", "bkt/p"] {
            assert!(Config::parse(bad, None, false).is_err(), "{bad}");
        }
        assert!(Config::parse("s3://b", Some("ftp://x"), false).unwrap_err().to_string().contains(ENDPOINT_ENV));
    }
}
