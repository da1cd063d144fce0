//! Producer-side kernel labels (design.md, "Kernel labels").

use std::path::Path;

/// The consumer-side form of a label that test names carry (design.md,
/// "Sanitized labels"): `kernel_` + the lowercase label with every run of
/// non-alphanumerics as one `_` and no `_` at either end. One function for
/// the runtime (test names) and cargo-ktstr (collisions before nextest).
pub fn sanitize(label: &str) -> String {
    let mut out = String::from("kernel_");
    let mut pending = false;
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            if pending && out.len() > "kernel_".len() {
                out.push('_');
            }
            pending = false;
            out.push(c.to_ascii_lowercase());
        } else {
            pending = true;
        }
    }
    out
}

/// A version or range member: the version itself, e.g. `6.12.9`.
pub fn version_label(version: &str) -> String {
    version.to_string()
}

/// A cache key: its version prefix (`6.12.9-tarball-…` → `6.12.9`,
/// `6.12.9-tarball-abcdef0-…` → `6.12.9`,
/// `v6.12-git-abc1234-…` → `v6.12`, `local-abc1234-…` → `local-abc1234`).
pub fn cache_key_label(key: &str) -> String {
    // Drop `-{arch}-kc{kc}`, then the source kind.
    let head = key.rsplit_once("-kc").map(|(h, _)| h).unwrap_or(key);
    let head = head.rsplit_once('-').map(|(h, _)| h).unwrap_or(head);
    if let Some(v) = head.strip_suffix("-tarball") {
        return v.to_string();
    }
    if let Some((v, src7)) = head.rsplit_once("-tarball-") {
        if src7.len() == 7 && src7.bytes().all(|b| b.is_ascii_hexdigit()) {
            return v.to_string();
        }
    }
    if let Some((r, hash)) = head.rsplit_once("-git-") {
        if hash.len() == 7 {
            return r.to_string();
        }
    }
    head.to_string()
}

/// A git spec: `git_{owner}_{repo}_{ref}`.
#[cfg(feature = "fetch")]
pub fn git_label(url: &str, git_ref: &str) -> String {
    let (owner, repo) = crate::git::owner_repo(url);
    format!("git_{owner}_{repo}_{git_ref}")
}

/// A path: `path_{basename}_{hash6}`, `_dirty` for a dirty or non-git tree.
/// `hash6` is the first 6 hex digits of the CRC32 of the canonical path.
pub fn path_label(path: &Path, dirty: bool) -> String {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let base = canon.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
    let crc = format!("{:08x}", crc32fast::hash(canon.as_os_str().as_encoded_bytes()));
    let mut l = format!("path_{base}_{}", &crc[..6]);
    if dirty {
        l.push_str("_dirty");
    }
    l
}

/// `label` made unique within a run: `_{hash6}` appended, the first 6 hex
/// digits of the CRC32 of `id` (the kernel's cache key, or its image path).
pub fn with_hash6(label: &str, id: &str) -> String {
    format!("{label}_{}", &format!("{:08x}", crc32fast::hash(id.as_bytes()))[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizer() {
        assert_eq!(sanitize("6.14.2"), "kernel_6_14_2");
        assert_eq!(sanitize("6.15-rc3"), "kernel_6_15_rc3");
        assert_eq!(sanitize("git_tj_sched_ext_for-next"), "kernel_git_tj_sched_ext_for_next");
        assert_eq!(sanitize("--Path__Foo..Bar--"), "kernel_path_foo_bar");
        assert_eq!(sanitize("-a--B-"), "kernel_a_b");
        assert_eq!(sanitize("path_linux_a1b2c3_dirty"), "kernel_path_linux_a1b2c3_dirty");
        assert_eq!(sanitize("6.12.9-tarball-x86_64-kc1a2b3c4d"), "kernel_6_12_9_tarball_x86_64_kc1a2b3c4d");
        assert_eq!(sanitize("..."), "kernel_");
    }

    #[test]
    fn labels() {
        assert_eq!(version_label("6.12.9"), "6.12.9");
        assert_eq!(cache_key_label("6.12.9-tarball-x86_64-kc1a2b3c4d"), "6.12.9");
        assert_eq!(cache_key_label("6.15-rc3-tarball-x86_64-kc1a2b3c4d"), "6.15-rc3");
        assert_eq!(cache_key_label("6.12.9-tarball-abcdef0-x86_64-kc1a2b3c4d"), "6.12.9");
        assert_eq!(cache_key_label("for-next-git-abc1234-x86_64-kc1a2b3c4d"), "for-next");
        assert_eq!(cache_key_label("local-abc1234-x86_64-kc1a2b3c4d"), "local-abc1234");
        #[cfg(feature = "fetch")]
        assert_eq!(git_label("https://git.kernel.org/pub/scm/linux/kernel/git/tj/sched_ext.git", "for-next"), "git_tj_sched_ext_for-next");
        let d = tempfile::tempdir().unwrap();
        let canon = d.path().canonicalize().unwrap();
        let crc = format!("{:08x}", crc32fast::hash(canon.as_os_str().as_encoded_bytes()));
        let base = canon.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(path_label(d.path(), false), format!("path_{base}_{}", &crc[..6]));
        assert!(path_label(d.path(), true).ends_with("_dirty"));
        let k = "6.12.9-tarball-abcdef0-x86_64-kc1a2b3c4d";
        assert_eq!(with_hash6("6.12.9", k), format!("6.12.9_{}", &format!("{:08x}", crc32fast::hash(k.as_bytes()))[..6]));
    }
}
