//! Host side: finding the scheduler binary to pack into the initramfs.
//!
//! A bare name is looked up, in order, in `$KTSTR_SCHEDULER_DIR` (a
//! `:`-separated list), the test binary's directory and its parent
//! (nextest runs `target/debug/deps/…`), `target/{debug,release}` of the
//! current directory or an ancestor, `$PATH`, and last the fixture cache
//! of `scripts/build-scx.sh` (`$KTSTR_SCX_CACHE_DIR`, else
//! `~/.cache/ktstr/scx`): the entry named like the booted kernel's cache
//! key first, then the newest; then the scx project's schedulers built by
//! `scripts/build-scx-rs.sh` (`$KTSTR_SCX_RS_CACHE_DIR`, else
//! `~/.cache/ktstr/scx-rs`, its `bin`). A name containing `/` is a path.
//! `$KTSTR_SCHEDULER` (a path) overrides all of it: an exported `.run`
//! sets it to the binary it carries.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{SchedFail, Scheduler};

/// Names the scheduler binary outright (set by exported `.run` files).
pub const EXPLICIT_ENV: &str = "KTSTR_SCHEDULER";

/// Where the lookup goes, in order, given the environment it reads.
#[derive(Debug, Clone, Default)]
pub struct SearchEnv {
    /// `KTSTR_SCHEDULER`: the binary to use, whatever the test names.
    pub explicit: Option<PathBuf>,
    pub scheduler_dir: Option<String>,
    pub current_exe: Option<PathBuf>,
    pub cwd: Option<PathBuf>,
    pub path: Option<String>,
    pub scx_cache: Option<PathBuf>,
    /// `bin` of the scx project scheduler cache (scripts/build-scx-rs.sh).
    pub scx_rs_bin: Option<PathBuf>,
    /// Cache key (directory name) of the kernel the VM boots, if known.
    pub kernel_key: Option<String>,
}

/// `bin` of the cache `scripts/build-scx-rs.sh` fills: symlinks to the
/// pinned scx_bpfland, scx_rusty builds.
pub fn scx_rs_bin() -> Option<PathBuf> {
    ktstr_cache("KTSTR_SCX_RS_CACHE_DIR", "scx-rs").map(|r| r.join("bin"))
}

/// Root of the fixture cache written by `scripts/build-scx.sh`.
pub fn scx_cache_root() -> Option<PathBuf> {
    ktstr_cache("KTSTR_SCX_CACHE_DIR", "scx")
}

/// `$var` if set, else `ktstr/sub` under `$XDG_CACHE_HOME` or `~/.cache`.
fn ktstr_cache(var: &str, sub: &str) -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env(var)
        .or_else(|| env("XDG_CACHE_HOME").map(|x| x.join("ktstr").join(sub)))
        .or_else(|| env("HOME").map(|h| h.join(".cache/ktstr").join(sub)))
}

impl SearchEnv {
    /// From this process's environment; `kernel` is the image (or its
    /// cache entry directory) the test boots.
    pub fn from_process(kernel: Option<&Path>) -> Self {
        let kernel_key = kernel.and_then(|k| {
            let dir = if k.is_dir() { k } else { k.parent()? };
            Some(dir.file_name()?.to_string_lossy().into_owned())
        });
        Self {
            explicit: std::env::var_os(EXPLICIT_ENV).filter(|s| !s.is_empty()).map(PathBuf::from),
            scheduler_dir: std::env::var("KTSTR_SCHEDULER_DIR").ok().filter(|s| !s.is_empty()),
            current_exe: std::env::current_exe().ok(),
            cwd: std::env::current_dir().ok(),
            path: std::env::var("PATH").ok(),
            scx_cache: scx_cache_root(),
            scx_rs_bin: scx_rs_bin(),
            kernel_key,
        }
    }

    /// The directories searched for a bare name, in order, with a label
    /// for messages.
    pub fn dirs(&self) -> Vec<(String, PathBuf)> {
        let mut v: Vec<(String, PathBuf)> = Vec::new();
        for d in self.scheduler_dir.iter().flat_map(|s| s.split(':')).filter(|s| !s.is_empty()) {
            v.push(("KTSTR_SCHEDULER_DIR".into(), PathBuf::from(d)));
        }
        if let Some(dir) = self.current_exe.as_deref().and_then(Path::parent) {
            v.push(("test binary dir".into(), dir.to_path_buf()));
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(p) = dir.parent() {
                    v.push(("test binary dir".into(), p.to_path_buf()));
                }
            }
        }
        if let Some(target) =
            self.cwd.as_deref().and_then(|c| c.ancestors().map(|a| a.join("target")).find(|t| t.is_dir()))
        {
            for prof in ["debug", "release"] {
                v.push(("target dir".into(), target.join(prof)));
            }
        }
        for d in self.path.iter().flat_map(|s| s.split(':')).filter(|s| !s.is_empty()) {
            v.push(("PATH".into(), PathBuf::from(d)));
        }
        if let Some(root) = &self.scx_cache {
            let mut entries: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path().join("bin"))
                .filter(|b| b.is_dir())
                .map(|b| (b.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), b))
                .collect();
            entries.sort_by_key(|e| std::cmp::Reverse(e.0));
            let matching = self.kernel_key.as_ref().map(|k| root.join(k).join("bin"));
            if let Some(m) = matching.as_ref().filter(|m| m.is_dir()) {
                v.push(("scx fixture cache (this kernel)".into(), m.clone()));
            }
            for (_, b) in entries {
                if Some(&b) != matching.as_ref() {
                    v.push(("scx fixture cache".into(), b));
                }
            }
            if !v.last().is_some_and(|l| l.0.starts_with("scx")) {
                v.push(("scx fixture cache (empty; run scripts/build-scx.sh)".into(), root.clone()));
            }
        }
        if let Some(b) = &self.scx_rs_bin {
            v.push(("scx project schedulers; scripts/build-scx-rs.sh".into(), b.clone()));
        }
        v
    }
}

fn is_executable_file(p: &Path) -> bool {
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The host path of `s`'s binary, or a failure naming every place looked at.
pub fn find_binary_in(s: &Scheduler, env: &SearchEnv) -> Result<PathBuf, SchedFail> {
    let not_found = |looked: Vec<String>| SchedFail::BinaryNotFound {
        name: s.name.to_string(),
        binary: s.binary.to_string(),
        looked,
    };
    let given = env.explicit.as_ref().map(|p| (p.clone(), EXPLICIT_ENV)).or_else(|| {
        s.binary.contains('/').then(|| (PathBuf::from(s.binary), "given path"))
    });
    if let Some((p, how)) = given {
        let p = match (&env.cwd, p.is_relative()) {
            (Some(c), true) => c.join(p),
            _ => p,
        };
        return if is_executable_file(&p) {
            Ok(p)
        } else {
            Err(not_found(vec![format!("{} ({how}; missing or not executable)", p.display())]))
        };
    }
    let mut looked = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (label, dir) in env.dirs() {
        if !seen.insert(dir.clone()) {
            continue;
        }
        let cand = dir.join(s.binary);
        if is_executable_file(&cand) {
            return Ok(cand);
        }
        looked.push(format!("{} ({label})", dir.display()));
    }
    Err(not_found(looked))
}

/// [`find_binary_in`] with this process's environment.
pub fn find_binary(s: &Scheduler, kernel: Option<&Path>) -> Result<PathBuf, SchedFail> {
    find_binary_in(s, &SearchEnv::from_process(kernel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(dir: &Path, name: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn lookup_order_and_failure_message() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let s = Scheduler::new("scx_x");
        let env = SearchEnv {
            explicit: None,
            scheduler_dir: Some(format!("{}:{}", root.join("a").display(), root.join("b").display())),
            current_exe: Some(root.join("ws/target/debug/deps/tests-123")),
            cwd: Some(root.join("ws/tests")),
            path: Some(root.join("bin").display().to_string()),
            scx_cache: Some(root.join("scx")),
            scx_rs_bin: Some(root.join("scx-rs/bin")),
            kernel_key: Some("6.12.9-tarball-x86_64-kc1".into()),
        };
        std::fs::create_dir_all(root.join("ws/tests")).unwrap();
        std::fs::create_dir_all(root.join("ws/target/debug/deps")).unwrap();

        let err = find_binary_in(&s, &env).unwrap_err().to_string();
        assert!(err.contains("scheduler scx_x: binary `scx_x` not found"), "{err}");
        for part in ["a (KTSTR_SCHEDULER_DIR)", "b (KTSTR_SCHEDULER_DIR)", "deps (test binary dir)", "target/release (target dir)", "bin (PATH)", "scx (scx fixture cache (empty", "scx-rs/bin (scx project schedulers; scripts/build-scx-rs.sh)"] {
            assert!(err.contains(part), "{part} missing in {err}");
        }

        // The scx project cache comes last.
        let rs = exe(&root.join("scx-rs/bin"), "scx_x");
        assert_eq!(find_binary_in(&s, &env).unwrap(), rs);
        // The scx cache: the entry of the booted kernel wins over a newer one.
        let mine = exe(&root.join("scx/6.12.9-tarball-x86_64-kc1/bin"), "scx_x");
        std::thread::sleep(std::time::Duration::from_millis(20));
        exe(&root.join("scx/other/bin"), "scx_x");
        assert_eq!(find_binary_in(&s, &env).unwrap(), mine);
        let p = exe(&root.join("bin"), "scx_x");
        assert_eq!(find_binary_in(&s, &env).unwrap(), p);
        let p = exe(&root.join("ws/target/release"), "scx_x");
        assert_eq!(find_binary_in(&s, &env).unwrap(), p);
        let p = exe(&root.join("ws/target/debug"), "scx_x");
        assert_eq!(find_binary_in(&s, &env).unwrap(), p);
        let p = exe(&root.join("b"), "scx_x");
        assert_eq!(find_binary_in(&s, &env).unwrap(), p);
        let p = exe(&root.join("a"), "scx_x");
        assert_eq!(find_binary_in(&s, &env).unwrap(), p);

        // Not executable: skipped.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_binary_in(&s, &env).unwrap(), root.join("b/scx_x"));
    }

    #[test]
    fn paths_are_taken_as_given() {
        let t = tempfile::tempdir().unwrap();
        let p = exe(t.path(), "sched");
        let env = SearchEnv { cwd: Some(t.path().to_path_buf()), ..Default::default() };
        const BY_PATH: Scheduler = Scheduler::new("s").binary("./sched");
        assert_eq!(find_binary_in(&BY_PATH, &env).unwrap(), t.path().join("./sched"));
        let abs: &'static str = Box::leak(p.display().to_string().into_boxed_str());
        assert_eq!(find_binary_in(&Scheduler::new("s").binary(abs), &env).unwrap(), p);
        const MISSING: Scheduler = Scheduler::new("s").binary("/nonexistent/sched");
        let e = find_binary_in(&MISSING, &env).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/sched (given path"), "{e}");
        // KTSTR_SCHEDULER wins over the name and over a given path.
        let env = SearchEnv { explicit: Some(p.clone()), ..env };
        assert_eq!(find_binary_in(&MISSING, &env).unwrap(), p);
        assert_eq!(find_binary_in(&Scheduler::new("scx_other"), &env).unwrap(), p);
        let env = SearchEnv { explicit: Some(t.path().join("gone")), ..env };
        let e = find_binary_in(&Scheduler::new("scx_other"), &env).unwrap_err().to_string();
        assert!(e.contains("gone (KTSTR_SCHEDULER; missing"), "{e}");
    }
}
