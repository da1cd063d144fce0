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
            if let Err(e) = kvm::machine::open_kvm() {
                return Err(match e {
                    VmError::KvmUnavailable(m) => {
                        VmError::KvmUnavailable(format!("{m}; or set KTSTR_VMM=tcg to run under QEMU TCG (slow)"))
                    }
                    e => e,
                });
            }
            let verdict = kvm::selftest::verdict();
            match verdict {
                Ok(v) if v.usable() => Ok(BackendKind::Kvm),
                Ok(v) => {
                    notice_once(&format!("KVM unusable for kernels here ({v}); using QEMU TCG"));
                    Ok(BackendKind::QemuTcg)
                }
                Err(e) if e.is_skip() => Err(e),
                Err(e) => {
                    notice_once(&format!("KVM unavailable ({e}); using QEMU TCG"));
                    Ok(BackendKind::QemuTcg)
                }
            }
        }
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
