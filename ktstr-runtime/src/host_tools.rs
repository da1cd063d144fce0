//! Host programs a test runs inside the guest (`host_tools = ["bpftool"]`).
//!
//! Unlike `include_files` (bytes embedded at compile time), a tool is found
//! on the host when the VM is built — `$PATH`, then the system bin/sbin
//! directories (`bpftool` lives in `/usr/sbin`, often off a user's PATH) —
//! and packed with its ELF interpreter and shared libraries (see
//! [`crate::initramfs::elf_deps`]) at `/ktstr/bin/{name}`, which guest init
//! puts first on `PATH`. The libraries come from the same host as the tool,
//! so the two always match. A tool the host lacks is a skip (a fail under
//! `KTSTR_NO_SKIP_MODE=1`), never a compile error.

use std::path::{Path, PathBuf};

use crate::initramfs::Initramfs;
use crate::registry::TestDef;
use crate::verdict::Verdict;

/// Where the tools land in the guest; first on the guest's `PATH`.
pub const GUEST_DIR: &str = "/ktstr/bin";

/// The guest's `PATH`: the tools first, then where packed files or a
/// tool's own lookups might expect programs.
pub const GUEST_PATH: &str = "/ktstr/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Searched after `$PATH` for a bare name.
const SYSTEM_DIRS: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// A tool the host does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub tool: String,
    /// Where we looked, in order.
    pub searched: Vec<PathBuf>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dirs: Vec<String> = self.searched.iter().map(|d| d.display().to_string()).collect();
        write!(
            f,
            "host tool `{}` not found (looked in {}); install it on the host (scripts/setup.sh installs the ones the example tests use)",
            self.tool,
            dirs.join(":")
        )
    }
}

impl std::error::Error for Missing {}

/// The file name a tool has in the guest (`/usr/sbin/bpftool` → `bpftool`).
pub fn name(tool: &str) -> &str {
    tool.rsplit('/').next().unwrap_or(tool)
}

/// Guest path of a tool.
pub fn guest_path(tool: &str) -> String {
    format!("{GUEST_DIR}/{}", name(tool))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `tool` on the host: a path (contains `/`) as is, a bare name in
/// `path` (a `$PATH` value) and then the system directories.
pub fn find_in(tool: &str, path: Option<&str>) -> Result<PathBuf, Missing> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return if is_executable(&p) { Ok(p) } else { Err(Missing { tool: tool.into(), searched: vec![p] }) };
    }
    let mut searched: Vec<PathBuf> = Vec::new();
    let dirs = path.into_iter().flat_map(|p| p.split(':')).filter(|d| !d.is_empty()).chain(SYSTEM_DIRS.iter().copied());
    for d in dirs {
        let d = PathBuf::from(d);
        if searched.contains(&d) {
            continue;
        }
        let c = d.join(tool);
        if is_executable(&c) {
            return Ok(c);
        }
        searched.push(d);
    }
    Err(Missing { tool: tool.into(), searched })
}

/// [`find_in`] with this process's `$PATH`.
pub fn find(tool: &str) -> Result<PathBuf, Missing> {
    find_in(tool, std::env::var("PATH").ok().as_deref())
}

/// Adds every tool of `def` (with its libraries) to the guest archive. A
/// tool the host lacks is a skip naming it; one that cannot be packed (a
/// library not found) is a fail.
pub fn pack(def: &TestDef, mut ir: Initramfs) -> Result<Initramfs, Verdict> {
    for tool in def.host_tools {
        let host = find(tool).map_err(|m| Verdict::skip(format!("{}: {m}", def.name)))?;
        ir = ir
            .file(&host, &guest_path(tool))
            .map_err(|e| Verdict::fail(format!("host_tools: packing {tool} from {}: {e:#}", host.display())))?;
    }
    Ok(ir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn exe(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn finds_bare_names_in_path_order_and_skips_non_executables() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        exe(a.path(), "ktstr-tool-x", 0o644);
        let want = exe(b.path(), "ktstr-tool-x", 0o755);
        let path = format!("{}:{}", a.path().display(), b.path().display());
        assert_eq!(find_in("ktstr-tool-x", Some(&path)).unwrap(), want);
        // An explicit path is taken as is.
        assert_eq!(find_in(want.to_str().unwrap(), None).unwrap(), want);
    }

    #[test]
    fn falls_back_to_system_dirs_off_path() {
        // `sh` is in /bin or /usr/bin on every host that runs these tests.
        let p = find_in("sh", Some("/nonexistent/ktstr")).unwrap();
        assert!(SYSTEM_DIRS.iter().any(|d| p.starts_with(d)), "{}", p.display());
    }

    #[test]
    fn missing_tool_names_itself_where_it_looked_and_the_fix() {
        let m = find_in("ktstr-no-such-tool", Some("/nonexistent/a::/nonexistent/a")).unwrap_err();
        assert_eq!(m.searched.iter().filter(|d| d.as_os_str() == "/nonexistent/a").count(), 1, "{m:?}");
        let s = m.to_string();
        assert!(s.contains("`ktstr-no-such-tool`") && s.contains("/nonexistent/a:/usr/local/sbin") && s.contains("install"), "{s}");
        let m = find_in("/nonexistent/bin/tool", None).unwrap_err();
        assert!(m.to_string().contains("/nonexistent/bin/tool"));
    }

    #[test]
    fn guest_paths_use_the_file_name() {
        assert_eq!(guest_path("/usr/sbin/bpftool"), "/ktstr/bin/bpftool");
        assert_eq!(guest_path("script"), "/ktstr/bin/script");
        assert!(GUEST_PATH.starts_with(GUEST_DIR));
    }

    #[test]
    fn pack_adds_the_tool_with_its_libraries_or_skips() {
        static SH: TestDef = TestDef { name: "t", host_tools: &["sh"], ..TestDef::DEFAULT };
        let ir = pack(&SH, Initramfs::default()).unwrap();
        let paths = ir.paths();
        assert!(paths.contains(&"ktstr/bin/sh"), "{paths:?}");
        // dash is dynamically linked: its interpreter and libc come along.
        assert!(paths.iter().any(|p| p.contains("libc.so")), "{paths:?}");
        assert!(paths.iter().any(|p| p.contains("ld-linux")), "{paths:?}");

        static GONE: TestDef = TestDef { name: "t", host_tools: &["sh", "ktstr-no-such-tool"], ..TestDef::DEFAULT };
        let v = pack(&GONE, Initramfs::default()).unwrap_err();
        assert_eq!(v.outcome, crate::verdict::Outcome::Skip, "{}", v.message);
        assert!(v.message.starts_with("t: host tool `ktstr-no-such-tool` not found"), "{}", v.message);
    }
}
