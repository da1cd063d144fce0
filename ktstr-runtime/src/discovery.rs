//! Which kernel a VM test boots: the multi-kernel list entry named by the
//! test's suffix, else `KTSTR_TEST_KERNEL`, `KTSTR_KERNEL`, the newest
//! valid cache entry, `./linux`, `../linux`, `/boot/vmlinuz-$(uname -r)`.

use std::path::{Path, PathBuf};

use kernel_build::Cache;

use crate::label::{parse_kernel_list, KernelEntry};
use crate::vmm::builder::find_image;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub image: PathBuf,
    /// Where it came from, for messages ("KTSTR_TEST_KERNEL", "cache entry X", ...).
    pub how: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoveryError {
    /// Nothing anywhere: the harness is not configured (a skip).
    NotFound { looked: Vec<String> },
    /// Something was named but is unusable (a failure).
    Bad(String),
}

pub const FIX_HINT: &str =
    "run the tests through `cargo ktstr test --kernel 6.12`, or set KTSTR_TEST_KERNEL=/path/to/bzImage";

impl std::fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiscoveryError::NotFound { looked } => write!(
                f,
                "harness not configured: no kernel found (looked at {}); fix: {FIX_HINT}",
                looked.join(", ")
            ),
            DiscoveryError::Bad(m) => f.write_str(m),
        }
    }
}

/// The kernel cache root of the design contract (kernel-build's own).
pub fn cache_root() -> PathBuf {
    kernel_build::cache::default_root()
}

/// The image of the entry the cache itself calls newest (by the build time
/// in its metadata; incomplete entries and in-flight temp dirs never count).
pub fn newest_cache_entry(root: &Path) -> Option<PathBuf> {
    Cache::at(Some(root)).newest().map(|e| e.image())
}

fn from_env(var: &str) -> Option<Result<Found, DiscoveryError>> {
    let v = std::env::var_os(var).filter(|v| !v.is_empty())?;
    let p = PathBuf::from(&v);
    Some(match find_image(&p) {
        Some(image) => Ok(Found { image, how: var.to_string() }),
        None => Err(DiscoveryError::Bad(format!(
            "{var}={} does not exist or holds no kernel image (bzImage/vmlinuz)",
            p.display()
        ))),
    })
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Single-kernel discovery (no multi-kernel suffix involved).
pub fn discover() -> Result<Found, DiscoveryError> {
    for var in ["KTSTR_TEST_KERNEL", "KTSTR_KERNEL"] {
        if let Some(r) = from_env(var) {
            return r;
        }
    }
    let mut looked = vec!["KTSTR_TEST_KERNEL".to_string(), "KTSTR_KERNEL".to_string()];
    let root = cache_root();
    if let Some(image) = newest_cache_entry(&root) {
        return Ok(Found { how: format!("kernel cache {}", root.display()), image });
    }
    looked.push(format!("cache {}", root.display()));
    for dir in ["./linux", "../linux"] {
        if let Some(image) = kernel_build::tree::find_image_in(Path::new(dir)) {
            return Ok(Found { image, how: dir.to_string() });
        }
        looked.push(dir.to_string());
    }
    let boot = PathBuf::from(format!("/boot/vmlinuz-{}", uname_release()));
    // Readable, not just present: distro images are often root-only.
    if std::fs::File::open(&boot).is_ok() {
        return Ok(Found { image: boot, how: "host /boot".into() });
    }
    looked.push(boot.display().to_string());
    Err(DiscoveryError::NotFound { looked })
}

/// `KTSTR_KERNEL_LIST` when it names two or more kernels (multi-kernel
/// mode); `Ok(None)` in single-kernel mode.
pub fn kernel_list() -> Result<Option<Vec<KernelEntry>>, String> {
    match std::env::var("KTSTR_KERNEL_LIST") {
        Ok(s) => {
            let l = parse_kernel_list(&s)?;
            Ok(if l.len() >= 2 { Some(l) } else { None })
        }
        Err(_) => Ok(None),
    }
}

/// The image of a multi-kernel entry.
pub fn entry_image(e: &KernelEntry) -> Result<Found, DiscoveryError> {
    find_image(&e.path).map(|image| Found { image, how: format!("KTSTR_KERNEL_LIST {}", e.label) }).ok_or_else(|| {
        DiscoveryError::Bad(format!(
            "KTSTR_KERNEL_LIST entry {}={} does not exist or holds no kernel image",
            e.label,
            e.path.display()
        ))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kernel_build::Metadata;

    /// `{name}-{arch}-kc{kc}`: a key the cache takes as current.
    pub(crate) fn key(name: &str) -> String {
        format!("{name}-{}-kc{}", kernel_build::tree::arch(), digest().kc())
    }

    fn digest() -> kernel_build::InputDigest {
        kernel_build::InputDigest::new(&kernel_build::Base::Tinyconfig, None, None).unwrap()
    }

    /// A complete entry `key(name)` as `Cache::store` writes it, built at
    /// `t` (unix seconds); returns its image. The one place the runtime's
    /// tests spell out cache metadata.
    pub(crate) fn entry(root: &Path, name: &str, t: u64) -> PathBuf {
        let key = key(name);
        let d = root.join(&key);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(kernel_build::tree::image_name()), b"img").unwrap();
        let meta = Metadata {
            key: key.clone(),
            spec: "s".into(),
            source: "src".into(),
            version: "6.12".into(),
            arch: kernel_build::tree::arch().into(),
            kconfig_hash: kernel_build::kconfig_hash(),
            base: "tinyconfig".into(),
            build_time: t,
            build_duration_secs: 1.0,
            image_size: 3,
            key_schema: kernel_build::cache::KEY_SCHEMA,
            source_kind: "local".into(),
            source_sha256: None,
            base_digest: digest().base,
            kconfig_sha256: digest().kconfig_sha256,
            extra_kconfig: None,
            extra_kconfig_sha256: None,
        };
        std::fs::write(d.join("metadata.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        d.join(kernel_build::tree::image_name())
    }

    #[test]
    fn newest_valid_cache_entry_wins() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert_eq!(newest_cache_entry(r), None);
        assert_eq!(newest_cache_entry(&r.join("missing")), None);
        entry(r, "old", 100);
        // Incomplete, corrupt, or in flight: never chosen, however new.
        std::fs::remove_file(entry(r, "newer-but-no-image", 200)).unwrap();
        std::fs::write(entry(r, "newer-bad-meta", 300).with_file_name("metadata.json"), "not json").unwrap();
        entry(r, ".tmp-in-flight", 400);
        assert_eq!(newest_cache_entry(r), Some(r.join(key("old")).join(kernel_build::tree::image_name())));
        assert!(!r.join("missing").exists(), "discovery creates nothing");
    }

    /// Discovery and `cache` agree on "newest" even when file mtimes say
    /// otherwise (an entry copied or touched later is not newer).
    #[test]
    fn discovery_picks_what_the_cache_calls_newest() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        entry(r, "b-built-last", 300);
        std::thread::sleep(std::time::Duration::from_millis(20));
        entry(r, "a-built-first", 100);
        std::thread::sleep(std::time::Duration::from_millis(20));
        entry(r, "c-built-second", 200);
        let newest = Cache::at(Some(r)).newest().unwrap();
        assert_eq!(newest.key, key("b-built-last"));
        assert_eq!(newest_cache_entry(r), Some(newest.image()));
    }
}
