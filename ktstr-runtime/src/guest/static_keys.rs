//! Kernel static keys that cgroups flip, flipped once before the other
//! CPUs come up.
//!
//! A test's first child cgroup with the memory controller enables
//! `memcg_kmem_online_key` (for good) and `memcg_sockets_enabled_key`; its
//! first child cpuset enables `cpusets_enabled_key`; removing the last one
//! disables the counted keys again. Every flip patches kernel text, and
//! multi-threaded TCG can then run a stale int3 on another vCPU (seen:
//! `Oops: int3` at `kmem_cache_free+0x105`, a `memcg_kmem_online_key`
//! site, on Debian's kernel; docs/vmm.md). Done while a TCG guest has one
//! CPU online, and held by one empty cgroup, no test flips them later.

use std::path::Path;

use crate::cgroup::CGROUP_ROOT;

/// The empty cgroup that keeps the counted keys enabled.
pub const HOLDER: &str = "ktstr-static-keys";

/// Enables the test controllers at the root and creates [`HOLDER`] (an
/// existing one is fine). An error names the path.
pub fn flip() -> Result<(), String> {
    super::enable_test_controllers();
    let dir = Path::new(CGROUP_ROOT).join(HOLDER);
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(format!("creating {}: {e}", dir.display())),
        _ => Ok(()),
    }
}
