//! Facts about a kernel source tree or a prebuilt image on disk.

use std::io::Read;
use std::path::{Path, PathBuf};

/// A kernel source tree has a top-level `Makefile` and `Kconfig`.
pub fn is_source_tree(dir: &Path) -> bool {
    dir.join("Makefile").is_file() && dir.join("Kconfig").is_file()
}

/// `dir` itself, or its single top-level directory, when that is a source tree.
pub fn find_source_root(dir: &Path) -> Option<PathBuf> {
    if is_source_tree(dir) {
        return Some(dir.to_path_buf());
    }
    let subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    match subdirs.as_slice() {
        [one] if is_source_tree(one) => Some(one.clone()),
        _ => None,
    }
}

/// Release-style version from Makefile fields: `6.12.9`, `6.12` (SUBLEVEL 0), `6.13-rc3`.
pub fn parse_makefile_version(text: &str) -> Option<String> {
    let field = |name: &str| -> Option<String> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let version = field("VERSION")?;
    let patchlevel = field("PATCHLEVEL")?;
    let sublevel = field("SUBLEVEL").unwrap_or_default();
    let extra = field("EXTRAVERSION").unwrap_or_default();
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut v = format!("{version}.{patchlevel}");
    if !sublevel.is_empty() && sublevel != "0" {
        v.push('.');
        v.push_str(&sublevel);
    }
    v.push_str(&extra);
    Some(v)
}

/// Version of the tree at `dir`, from its Makefile.
pub fn source_version(dir: &Path) -> Option<String> {
    parse_makefile_version(&std::fs::read_to_string(dir.join("Makefile")).ok()?)
}

/// The host architecture as cache keys spell it.
pub fn arch() -> &'static str {
    std::env::consts::ARCH
}

/// The kernel's `ARCH=` directory, make target and image path for this host.
pub fn image_target() -> (&'static str, &'static str) {
    match arch() {
        "aarch64" => ("Image", "arch/arm64/boot/Image"),
        "riscv64" => ("Image", "arch/riscv/boot/Image"),
        _ => ("bzImage", "arch/x86/boot/bzImage"),
    }
}

/// File name of the boot image inside a cache entry.
pub fn image_name() -> &'static str {
    image_target().0
}

/// True when the file starts like a bootable kernel: x86 boot protocol
/// header ("HdrS" at 0x202), an arm64 Image ("ARM\x64" at 0x38), or ELF.
pub fn looks_like_image(path: &Path) -> bool {
    let mut buf = [0u8; 0x210];
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let n = f.read(&mut buf).unwrap_or(0);
    (n >= 0x206 && &buf[0x202..0x206] == b"HdrS")
        || (n >= 0x3c && &buf[0x38..0x3c] == b"ARM\x64")
        || (n >= 4 && &buf[..4] == b"\x7fELF")
}

/// A boot image inside a directory: a cache entry, a built tree, or /boot-like.
pub fn find_image_in(dir: &Path) -> Option<PathBuf> {
    let (name, rel) = image_target();
    for cand in [dir.join(name), dir.join(rel)] {
        if cand.is_file() {
            return Some(cand);
        }
    }
    let mut vmlinuz: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz"))
        })
        .collect();
    vmlinuz.sort();
    vmlinuz.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makefile_versions() {
        let mk = |s: &str, e: &str| format!("# c\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = {s}\nEXTRAVERSION ={e}\nNAME = x\n");
        assert_eq!(parse_makefile_version(&mk("117", "")).as_deref(), Some("6.12.117"));
        assert_eq!(parse_makefile_version(&mk("0", "")).as_deref(), Some("6.12"));
        assert_eq!(parse_makefile_version(&mk("0", " -rc3")).as_deref(), Some("6.12-rc3"));
        assert_eq!(parse_makefile_version("all:\n\techo hi\n"), None);
    }
}
