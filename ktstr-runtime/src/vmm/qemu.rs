//! QEMU TCG backend. PLACEHOLDER.
use super::{VmConfig, VmError, VmResult};
pub fn run(_cfg: &VmConfig) -> Result<VmResult, VmError> {
    Err(VmError::Host(anyhow::anyhow!("qemu backend not implemented yet")))
}
