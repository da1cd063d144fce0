//! VM errors, typed by what the caller does with them: skip or fail.

use std::fmt;

/// One-line host resource snapshot attached to transient-pressure skips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSnapshot {
    pub fds: u64,
    pub vmrss_kib: u64,
    pub threads: u64,
    pub near_limit: bool,
}

impl ResourceSnapshot {
    /// Reads `/proc/self`; fields it cannot read are 0.
    pub fn take() -> Self {
        let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let vmrss_kib = field("VmRSS:");
        let threads = field("Threads:");
        let mut near_limit = false;
        // SAFETY: getrlimit writes into the struct we pass.
        unsafe {
            let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur != libc::RLIM_INFINITY {
                near_limit |= fds * 10 >= rl.rlim_cur * 9;
            }
        }
        Self { fds, vmrss_kib, threads, near_limit }
    }
}

impl fmt::Display for ResourceSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fds={}, vmrss={}MiB, threads={}, near_limit={}",
            self.fds,
            self.vmrss_kib / 1024,
            self.threads,
            self.near_limit
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` missing or not accessible: a configuration failure.
    #[error("{0}")]
    KvmUnavailable(String),
    /// Transient host pressure (ENOMEM, EBUSY, EMFILE, ENFILE, EAGAIN,
    /// persistent EINTR on KVM_CREATE_VM): the test is skipped.
    #[error("transient host pressure: {what}: {errno} ({snapshot})")]
    Transient { what: String, errno: std::io::Error, snapshot: ResourceSnapshot },
    /// The image is not a kernel we can boot.
    #[error("{0}")]
    BadImage(String),
    /// The test's definition (topology, memory split over NUMA nodes)
    /// is one the backend cannot honour on any host: a FAIL, the fix is
    /// in the test. (The macro rejects most such definitions at compile
    /// time.)
    #[error("the test's topology/memory cannot be honoured: {0}; fix the test definition")]
    Topology(String),
    /// A valid topology this host cannot give (more vCPUs than its KVM
    /// allows, say): a SKIP.
    #[error("topology not available on this host: {0}")]
    HostLimit(String),
    /// Saving or restoring a VM snapshot failed before the test started;
    /// the caller boots cold instead.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// A restored VM loaded but did not take this test's payload (it
    /// stalled, or ended part-way): the save is fine, this test boots cold.
    #[error("handing the test to the restored VM: {0}")]
    Payload(String),
    /// Any other host-side failure.
    #[error(transparent)]
    Host(#[from] anyhow::Error),
}

/// errnos that mean "the host is busy", not "the host is broken".
pub fn is_transient_errno(errno: i32) -> bool {
    matches!(errno, libc::ENOMEM | libc::EBUSY | libc::EMFILE | libc::ENFILE | libc::EAGAIN)
}

impl VmError {
    /// Classifies an errno from opening `/dev/kvm` or a KVM ioctl.
    /// With `KTSTR_CONTENTION_BYPASS=1` and no resource near its limit,
    /// transient errnos become hard failures (for hunting kernel bugs).
    pub fn from_kvm_errno(what: &str, errno: i32) -> Self {
        let err = std::io::Error::from_raw_os_error(errno);
        if is_transient_errno(errno) {
            let snapshot = ResourceSnapshot::take();
            let bypass = std::env::var("KTSTR_CONTENTION_BYPASS").is_ok_and(|v| v == "1");
            if !bypass || snapshot.near_limit {
                return VmError::Transient { what: what.to_string(), errno: err, snapshot };
            }
        }
        VmError::Host(anyhow::anyhow!("{what}: {err}"))
    }

    /// True when the right verdict is SKIP rather than FAIL.
    pub fn is_skip(&self) -> bool {
        matches!(self, VmError::Transient { .. } | VmError::HostLimit(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_classes() {
        for e in [libc::ENOMEM, libc::EBUSY, libc::EMFILE, libc::ENFILE, libc::EAGAIN] {
            assert!(is_transient_errno(e));
        }
        assert!(!is_transient_errno(libc::EINVAL));
        assert!(!is_transient_errno(libc::EACCES));
        assert!(!VmError::from_kvm_errno("KVM_CREATE_VM", libc::EINVAL).is_skip());
    }

    #[test]
    fn impossible_definitions_fail_host_limits_skip() {
        assert!(!VmError::Topology("512 MiB does not split evenly over 3 NUMA nodes".into()).is_skip());
        assert!(VmError::HostLimit("96 vCPUs, KVM allows 64".into()).is_skip());
    }

    #[test]
    fn snapshot_format_has_no_rlimits() {
        let s = ResourceSnapshot { fds: 3, vmrss_kib: 4096, threads: 2, near_limit: false };
        assert_eq!(s.to_string(), "fds=3, vmrss=4MiB, threads=2, near_limit=false");
    }
}
