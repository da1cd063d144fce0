//! Backend choice: our KVM VMM when this host's KVM can boot kernels,
//! else QEMU TCG. `KTSTR_VMM=auto|kvm|tcg`.

use super::{kvm, qemu, VmConfig, VmError, VmResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackendKind {
    Kvm,
    QemuTcg,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Kvm => "kvm",
            BackendKind::QemuTcg => "qemu-tcg",
        })
    }
}

/// What the user asked for in `KTSTR_VMM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    Auto,
    Kvm,
    Tcg,
}

impl BackendChoice {
    pub fn from_env() -> Result<Self, VmError> {
        match std::env::var("KTSTR_VMM").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(Self::Auto),
            Ok("kvm") => Ok(Self::Kvm),
            Ok("tcg") | Ok("qemu") => Ok(Self::Tcg),
            Ok(other) => Err(VmError::Host(anyhow::anyhow!(
                "KTSTR_VMM={other:?} is not a backend; use auto, kvm or tcg"
            ))),
        }
    }
}

/// Picks the backend for `choice`, running (or reading the cached
/// verdict of) the KVM self-test when needed.
pub fn select(choice: BackendChoice) -> Result<BackendKind, VmError> {
    match choice {
        BackendChoice::Tcg => Ok(BackendKind::QemuTcg),
        BackendChoice::Kvm => {
            let verdict = kvm::selftest::verdict()?;
            if verdict.usable() {
                Ok(BackendKind::Kvm)
            } else {
                Err(VmError::Host(anyhow::anyhow!(
                    "KTSTR_VMM=kvm, but this host's KVM failed the ktstr self-test: {verdict}; \
                     unset KTSTR_VMM to fall back to QEMU TCG"
                )))
            }
        }
        BackendChoice::Auto => {
            // design.md: /dev/kvm missing or not writable is a FAIL with the
            // fix, even though QEMU could run; the cached self-test verdict
            // (per host boot, maybe another user's) must not hide that.
            let opened = kvm::machine::open_kvm().map(drop);
            auto(opened.and_then(|()| kvm::selftest::verdict()))
        }
    }
}

/// `KTSTR_VMM=auto` given opening /dev/kvm and the self-test: KVM when it
/// passed, QEMU TCG only when the self-test says KVM cannot boot kernels
/// here. Any error is the verdict's to give (a skip class skips, the rest
/// fail): falling back to TCG would hide a broken KVM setup.
fn auto(selftest: Result<kvm::selftest::Verdict, VmError>) -> Result<BackendKind, VmError> {
    match selftest {
        Ok(v) if v.usable() => Ok(BackendKind::Kvm),
        Ok(v) => {
            notice_once(&format!("KVM unusable for kernels here ({v}); using QEMU TCG"));
            Ok(BackendKind::QemuTcg)
        }
        Err(VmError::KvmUnavailable(m)) => {
            Err(VmError::KvmUnavailable(format!("{m}; or set KTSTR_VMM=tcg to run under QEMU TCG (slow)")))
        }
        Err(e) if e.is_skip() => Err(e),
        Err(e) => Err(VmError::Host(anyhow::anyhow!(
            "KTSTR_VMM=auto: the KVM self-test failed: {e}; fix KVM, or set KTSTR_VMM=tcg to run under QEMU TCG"
        ))),
    }
}

fn notice_once(msg: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("ktstr: {msg}"));
}

pub fn run(kind: BackendKind, cfg: &VmConfig) -> Result<VmResult, VmError> {
    match kind {
        BackendKind::Kvm => kvm::run(cfg),
        BackendKind::QemuTcg => qemu::run(cfg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::error::ResourceSnapshot;

    #[test]
    fn auto_falls_back_only_on_the_selftest_verdict() {
        let v = |ok| kvm::selftest::Verdict { ok, detail: "d".into() };
        assert_eq!(auto(Ok(v(true))).unwrap(), BackendKind::Kvm);
        assert_eq!(auto(Ok(v(false))).unwrap(), BackendKind::QemuTcg);
        let e = auto(Err(VmError::Host(anyhow::anyhow!("KVM_CREATE_VCPU: Invalid argument")))).unwrap_err();
        assert!(!e.is_skip(), "another KVM error is a FAIL, not a silent switch to TCG: {e}");
        assert!(e.to_string().contains("KVM_CREATE_VCPU: Invalid argument") && e.to_string().contains("KTSTR_VMM=tcg"), "{e}");
        let busy = VmError::Transient {
            what: "KVM_CREATE_VM".into(),
            errno: std::io::Error::from_raw_os_error(libc::EBUSY),
            snapshot: ResourceSnapshot { fds: 1, vmrss_kib: 0, threads: 1, near_limit: false },
        };
        assert!(auto(Err(busy)).unwrap_err().is_skip(), "transient pressure stays a skip");
        let e = auto(Err(VmError::KvmUnavailable("/dev/kvm does not exist".into()))).unwrap_err();
        assert!(matches!(e, VmError::KvmUnavailable(ref m) if m.contains("KTSTR_VMM=tcg")), "{e}");
    }
}
