//! Which kernel a VM test boots: the multi-kernel list entry named by the
//! test's suffix, else `KTSTR_TEST_KERNEL`, `KTSTR_KERNEL`, the newest
//! valid cache entry, `./linux`, `../linux`, `/boot/vmlinuz-$(uname -r)`.

use std::path::{Path, PathBuf};

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

/// The kernel cache root of the design contract.
pub fn cache_root() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("KTSTR_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("ktstr/kernels")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/ktstr/kernels")))
}

/// Newest entry holding a boot image and a parseable `metadata.json`
/// (temp dirs of in-flight stores start with `.` and are ignored).
pub fn newest_cache_entry(root: &Path) -> Option<PathBuf> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let dir = e.path();
        if e.file_name().to_string_lossy().starts_with('.') || !dir.is_dir() {
            continue;
        }
        let meta = dir.join("metadata.json");
        let valid = std::fs::read(&meta)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v.is_object());
        let image = dir.join("bzImage");
        if !valid || !image.is_file() {
            continue;
        }
        let t = std::fs::metadata(&meta).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, image));
        }
    }
    best.map(|(_, p)| p)
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
    if let Some(root) = cache_root() {
        if let Some(image) = newest_cache_entry(&root) {
            return Ok(Found { how: format!("kernel cache {}", root.display()), image });
        }
        looked.push(format!("cache {}", root.display()));
    }
    for dir in ["./linux", "../linux"] {
        let tree = Path::new(dir);
        if let Some(image) = [tree.join("arch/x86/boot/bzImage"), tree.join("bzImage")].into_iter().find(|p| p.is_file()) {
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
mod tests {
    use super::*;

    #[test]
    fn newest_valid_cache_entry_wins() {
        let root = tempfile::tempdir().unwrap();
        let mk = |name: &str, meta: &str, image: bool| {
            let d = root.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("metadata.json"), meta).unwrap();
            if image {
                std::fs::write(d.join("bzImage"), b"x").unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(newest_cache_entry(root.path()), None);
        mk("old", "{}", true);
        mk("newer-but-no-image", "{}", false);
        mk("newer-bad-meta", "not json", true);
        mk(".tmp-in-flight", "{}", true);
        assert_eq!(newest_cache_entry(root.path()), Some(root.path().join("old/bzImage")));
        mk("new", "{\"version\":\"6.12\"}", true);
        assert_eq!(newest_cache_entry(root.path()), Some(root.path().join("new/bzImage")));
    }
}
