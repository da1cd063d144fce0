//! Our KVM VMM (x86_64). PLACEHOLDER: being implemented.

pub mod selftest;

use super::{VmConfig, VmError, VmResult};

pub fn run(_cfg: &VmConfig) -> Result<VmResult, VmError> {
    Err(VmError::Host(anyhow::anyhow!("KVM backend not implemented yet")))
}
