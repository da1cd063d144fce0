//! In-process newc initramfs: `/init` is a given binary, packed with its
//! ELF interpreter and every shared library it needs, plus extra files.
//! Archives are cached by content hash so the second VM of the same
//! binary reuses the first one's archive; the cache keeps the most
//! recently used archives within a size budget (every rebuilt test
//! binary makes a new one, so it would otherwise grow without bound).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Where libraries are looked up when the ELF names no RUNPATH that has them.
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// Directories every guest needs as mount points.
const DIRS: &[&str] = &["dev", "proc", "sys", "tmp", "run", "sys/fs/cgroup"];

#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    /// guest path (no leading '/') → content
    entries: BTreeMap<String, Source>,
}

#[derive(Debug, Clone)]
enum Source {
    File { host: PathBuf, mode: u32 },
    Bytes { data: Vec<u8>, mode: u32 },
}

impl Initramfs {
    /// An archive whose `/init` is `init` (with its libraries).
    pub fn new(init: impl AsRef<Path>) -> Result<Self> {
        let mut me = Self::default();
        me.add_binary(init.as_ref(), "init")?;
        Ok(me)
    }

    /// Adds a host file at `guest` path; ELF executables bring their
    /// interpreter and libraries along.
    pub fn file(mut self, host: impl AsRef<Path>, guest: &str) -> Result<Self> {
        self.add_binary(host.as_ref(), guest.trim_start_matches('/'))?;
        Ok(self)
    }

    /// Adds literal bytes at `guest` path.
    pub fn data(mut self, guest: &str, data: Vec<u8>, mode: u32) -> Self {
        self.entries.insert(guest.trim_start_matches('/').to_string(), Source::Bytes { data, mode });
        self
    }

    /// Guest paths in the archive, sorted (for tests and diagnostics).
    pub fn paths(&self) -> Vec<&str> {
        self.entries.keys().map(String::as_str).collect()
    }

    fn add_binary(&mut self, host: &Path, guest: &str) -> Result<()> {
        let bytes = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = file_mode(host)? | 0o100;
        self.entries.insert(guest.to_string(), Source::File { host: host.to_path_buf(), mode });
        if bytes.starts_with(b"\x7fELF") {
            for dep in elf_deps(host, &bytes)? {
                let key = dep.to_string_lossy().trim_start_matches('/').to_string();
                let mode = file_mode(&dep)?;
                self.entries.entry(key).or_insert(Source::File { host: dep, mode });
            }
        }
        Ok(())
    }

    /// Serialises the archive (uncompressed newc).
    pub fn build(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut ino = 1u32;
        let mut dirs: BTreeSet<String> = DIRS.iter().map(|s| s.to_string()).collect();
        for path in self.entries.keys() {
            let mut p = Path::new(path).parent();
            while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(d.to_string_lossy().into_owned());
                p = d.parent();
            }
        }
        // BTreeSet order puts parents before children.
        for d in &dirs {
            out = cpio::newc::Builder::new(d).ino(next(&mut ino)).mode(0o40755).nlink(2).write(out, 0).finish()?;
        }
        out = cpio::newc::Builder::new("dev/console")
            .ino(next(&mut ino))
            .mode(0o20600)
            .rdev_major(5)
            .rdev_minor(1)
            .write(out, 0)
            .finish()?;
        for (path, src) in &self.entries {
            let (data, mode) = match src {
                Source::File { host, mode } => (guest_bytes(host)?, *mode),
                Source::Bytes { data, mode } => (data.clone(), *mode),
            };
            let mut w = cpio::newc::Builder::new(path)
                .ino(next(&mut ino))
                .mode(0o100000 | (mode & 0o7777))
                .nlink(1)
                .write(out, data.len() as u32);
            w.write_all(&data)?;
            out = w.finish()?;
        }
        Ok(cpio::newc::trailer(out)?)
    }

    /// Content hash over every path, mode and byte that goes in.
    pub fn content_hash(&self) -> Result<String> {
        let mut h = Sha256::new();
        for (path, src) in &self.entries {
            h.update(path.as_bytes());
            match src {
                Source::File { host, mode } => {
                    h.update(mode.to_le_bytes());
                    let mut f = std::fs::File::open(host).with_context(|| format!("reading {}", host.display()))?;
                    std::io::copy(&mut f, &mut h)?;
                }
                Source::Bytes { data, mode } => {
                    h.update(mode.to_le_bytes());
                    h.update(data);
                }
            }
            h.update([0u8]);
        }
        Ok(hex(&h.finalize()[..16]))
    }

    /// Builds into the initramfs cache unless an archive with the same
    /// content hash is already there; returns the archive's path.
    pub fn build_cached(&self) -> Result<PathBuf> {
        let dir = cache_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.cpio", self.content_hash()?));
        if path.is_file() {
            // A hit is a use: the mtime orders archives for eviction.
            let _ = std::fs::File::options().append(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(path);
        }
        let bytes = self.build()?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
        tmp.write_all(&bytes)?;
        tmp.persist(&path).with_context(|| format!("storing {}", path.display()))?;
        prune(&dir, cache_budget(), &path);
        Ok(path)
    }
}

/// Default size budget of the initramfs cache, in MiB.
const CACHE_BUDGET_MIB: u64 = 2048;

/// `KTSTR_INITRAMFS_CACHE_MIB`, else [`CACHE_BUDGET_MIB`], in bytes.
fn cache_budget() -> u64 {
    let mib = std::env::var("KTSTR_INITRAMFS_CACHE_MIB").ok().and_then(|v| v.trim().parse().ok());
    mib.unwrap_or(CACHE_BUDGET_MIB) << 20
}

/// Removes the least recently used archives in `dir` until the rest fit
/// in `budget` bytes, never `keep` (the archive just stored). A running
/// VM that already opened a removed archive keeps reading it. Returns
/// the paths removed.
pub fn prune(dir: &Path, budget: u64, keep: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut entries: Vec<(SystemTime, u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "cpio"))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    entries.sort();
    let mut removed = Vec::new();
    for (_, len, path) in entries {
        if total <= budget {
            break;
        }
        if path != keep && std::fs::remove_file(&path).is_ok() {
            total -= len;
            removed.push(path);
        }
    }
    removed
}

/// A host file's bytes as the guest gets them: an ELF file with DWARF
/// goes in without it (`objcopy --strip-debug`; symbols stay). A debug
/// test binary is mostly DWARF (78 of 80 MB), which the guest never
/// reads but must hold twice while unpacking, in as little as 256 MiB.
/// Without objcopy the file goes in whole, with a warning.
fn guest_bytes(host: &Path) -> Result<Vec<u8>> {
    let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
    if !has_debug_info(&data) {
        return Ok(data);
    }
    let Ok(tmp) = tempfile::NamedTempFile::new() else { return Ok(data) };
    let stripped = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(host)
        .arg(tmp.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match stripped.then(|| std::fs::read(tmp.path())) {
        Some(Ok(small)) if !small.is_empty() => Ok(small),
        _ => {
            eprintln!(
                "ktstr: warning: objcopy --strip-debug failed on {}; it goes into the guest with its debug info ({} MiB; install binutils)",
                host.display(),
                data.len() >> 20
            );
            Ok(data)
        }
    }
}

/// Whether `data` is an ELF file with DWARF (`.debug_info`; Rust's
/// allocated `.debug_gdb_scripts` stays after stripping and does not count).
fn has_debug_info(data: &[u8]) -> bool {
    if !data.starts_with(b"\x7fELF") {
        return false;
    }
    let Ok(elf) = goblin::elf::Elf::parse(data) else { return false };
    elf.section_headers.iter().any(|sh| elf.shdr_strtab.get_at(sh.sh_name).is_some_and(|n| n == ".debug_info"))
}

fn next(ino: &mut u32) -> u32 {
    *ino += 1;
    *ino
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn file_mode(p: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(p).with_context(|| format!("stat {}", p.display()))?.permissions().mode() & 0o7777)
}

/// `$KTSTR_CACHE_DIR/../initramfs`-style sibling of the kernel cache:
/// `$XDG_CACHE_HOME/ktstr/initramfs` or `~/.cache/ktstr/initramfs`.
pub fn cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("ktstr/initramfs");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/ktstr/initramfs")
}

/// The interpreter and the transitive closure of `DT_NEEDED` libraries
/// of an ELF file, as host paths (canonical, symlinks resolved).
pub fn elf_deps(path: &Path, bytes: &[u8]) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut queue: Vec<(PathBuf, Vec<u8>)> = vec![(path.to_path_buf(), bytes.to_vec())];
    while let Some((p, data)) = queue.pop() {
        let elf = goblin::elf::Elf::parse(&data).with_context(|| format!("{}: not a valid ELF file", p.display()))?;
        if let Some(interp) = elf.interpreter {
            // The interpreter must sit at its recorded path; keep that path.
            let ip = PathBuf::from(interp);
            if seen.insert(ip.clone()) {
                out.push(ip);
            }
        }
        let mut search: Vec<PathBuf> = Vec::new();
        let origin = p.parent().unwrap_or(Path::new("/")).to_path_buf();
        for rp in elf.runpaths.iter().chain(elf.rpaths.iter()) {
            for d in rp.split(':') {
                search.push(PathBuf::from(d.replace("$ORIGIN", &origin.to_string_lossy())));
            }
        }
        if let Some(lp) = std::env::var_os("LD_LIBRARY_PATH") {
            search.extend(std::env::split_paths(&lp));
        }
        search.extend(LIB_DIRS.iter().map(PathBuf::from));
        for lib in &elf.libraries {
            let Some(found) = search.iter().map(|d| d.join(lib)).find(|c| c.is_file()) else {
                bail!("{}: needs {lib}, found in none of {:?}", p.display(), search);
            };
            if seen.insert(found.clone()) {
                let data = std::fs::read(&found)?;
                out.push(found.clone());
                queue.push((found, data));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_dynamic_binary_with_libs() {
        let exe = std::env::current_exe().unwrap();
        let ird = Initramfs::new(&exe).unwrap().data("etc/hello", b"hi".to_vec(), 0o644);
        let paths = ird.paths();
        assert!(paths.contains(&"init"));
        assert!(paths.contains(&"etc/hello"));
        assert!(paths.iter().any(|p| p.contains("libc.so")), "{paths:?}");
        assert!(paths.iter().any(|p| p.contains("ld-linux")), "{paths:?}");

        // Read the archive back: every entry is present with its bytes.
        let bytes = ird.build().unwrap();
        let mut r = &bytes[..];
        let mut names = Vec::new();
        loop {
            let rd = cpio::newc::Reader::new(r).unwrap();
            if rd.entry().is_trailer() {
                break;
            }
            names.push(rd.entry().name().to_string());
            if rd.entry().name() == "etc/hello" {
                assert_eq!(rd.entry().file_size(), 2);
            }
            r = rd.finish().unwrap();
        }
        for want in ["dev", "proc", "dev/console", "init", "etc", "etc/hello"] {
            assert!(names.iter().any(|n| n == want), "missing {want} in {names:?}");
        }
        // Parent dirs precede their children.
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("etc") < pos("etc/hello"));
    }

    #[test]
    fn cache_hits_on_same_content() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("XDG_CACHE_HOME", dir.path());
        let a = Initramfs::new(std::env::current_exe().unwrap()).unwrap();
        use std::os::unix::fs::MetadataExt;
        let p1 = a.build_cached().unwrap();
        let i1 = std::fs::metadata(&p1).unwrap().ino();
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options().append(true).open(&p1).unwrap().set_modified(old).unwrap();
        let p2 = a.build_cached().unwrap();
        assert_eq!(p1, p2);
        // Not rewritten: the same file, its mtime moved up (a use, for eviction).
        assert_eq!(i1, std::fs::metadata(&p2).unwrap().ino());
        assert!(std::fs::metadata(&p2).unwrap().modified().unwrap() > old + std::time::Duration::from_secs(3000));
        let b = a.clone().data("x", vec![1], 0o644);
        assert_ne!(b.build_cached().unwrap(), p1);
    }

    #[test]
    fn prune_evicts_least_recently_used_first() {
        use std::time::Duration;
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(100);
        let mk = |name: &str, age: u64| {
            let p = dir.path().join(name);
            std::fs::write(&p, vec![0u8; 1000]).unwrap();
            let f = std::fs::File::options().append(true).open(&p).unwrap();
            f.set_modified(t0 + Duration::from_secs(age)).unwrap();
            p
        };
        let old = mk("a.cpio", 1);
        let kept = mk("b.cpio", 0); // the oldest, but the one just stored
        let mid = mk("c.cpio", 2);
        let new = mk("d.cpio", 3);
        std::fs::write(dir.path().join("notes.txt"), vec![0u8; 5000]).unwrap();
        // Budget for two archives: the oldest unprotected ones go.
        assert_eq!(prune(dir.path(), 2000, &kept), vec![old, mid]);
        assert!(kept.exists() && new.exists() && dir.path().join("notes.txt").exists());
        // Within budget: nothing goes.
        assert!(prune(dir.path(), 2000, &kept).is_empty());
    }

    /// This debug test binary goes in without its DWARF, still an ELF
    /// with its symbols; a file without DWARF goes in byte for byte.
    #[test]
    fn debug_info_is_stripped_from_packed_binaries() {
        let exe = std::env::current_exe().unwrap();
        let whole = std::fs::read(&exe).unwrap();
        assert!(has_debug_info(&whole), "a debug test binary has DWARF");
        let packed = guest_bytes(&exe).unwrap();
        assert!(packed.len() < whole.len() / 2, "{} of {} bytes", packed.len(), whole.len());
        let elf = goblin::elf::Elf::parse(&packed).unwrap();
        assert!(!has_debug_info(&packed));
        assert!(elf.syms.len() > 100, "symbols stay");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"#!/bin/sh\necho hi\n").unwrap();
        assert_eq!(guest_bytes(&plain).unwrap(), b"#!/bin/sh\necho hi\n");
    }

    #[test]
    fn missing_binary_is_an_error() {
        let e = Initramfs::new("/nonexistent/bin").unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/bin"));
    }
}
