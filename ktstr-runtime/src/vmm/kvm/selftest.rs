//! KVM self-test. PLACEHOLDER: being implemented.

use crate::vmm::VmError;

#[derive(Debug, Clone)]
pub struct Verdict {
    pub ok: bool,
    pub detail: String,
}

impl Verdict {
    pub fn usable(&self) -> bool {
        self.ok
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

pub fn verdict() -> Result<Verdict, VmError> {
    Ok(Verdict { ok: false, detail: "self-test not implemented".into() })
}
