//! How many CPUs the guest kernel brings up itself, for both backends
//! (`KTSTR_TCG_BOOT_CPUS`, `KTSTR_KVM_BOOT_CPUS`).

use super::VmError;

/// `One` boots with `maxcpus=1` and guest init onlines the rest
/// (`guest::cpus`): under multi-threaded TCG the boot-time text patching
/// then never runs while another vCPU executes the patched code, which
/// could leave a stale breakpoint translation behind (`Oops: int3`,
/// docs/vmm.md). `All` lets the kernel bring up every CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootCpus {
    One,
    All,
}

impl BootCpus {
    fn name(self) -> &'static str {
        match self {
            BootCpus::One => "one",
            BootCpus::All => "all",
        }
    }

    /// The mode `value` of variable `var` names (unset or empty: `default`).
    pub fn parse(var: &str, value: Option<&str>, default: BootCpus) -> Result<Self, VmError> {
        match value.unwrap_or("") {
            "" => Ok(default),
            "one" => Ok(BootCpus::One),
            "all" => Ok(BootCpus::All),
            other => {
                let alt = if default == BootCpus::One { BootCpus::All } else { BootCpus::One };
                Err(VmError::Host(anyhow::anyhow!(
                    "{var}={other:?} is not a boot mode; use {} or {}",
                    default.name(),
                    alt.name()
                )))
            }
        }
    }

    /// The mode in the environment variable `var`.
    pub fn from_env(var: &str, default: BootCpus) -> Result<Self, VmError> {
        Self::parse(var, std::env::var(var).ok().as_deref(), default)
    }

    /// `cmdline` as the guest gets it for `cpus` vCPUs: with `maxcpus=1`
    /// when this is `One` and there are several.
    pub fn cmdline(self, cmdline: &str, cpus: u32) -> String {
        if self == BootCpus::One && cpus > 1 {
            format!("{cmdline} maxcpus=1")
        } else {
            cmdline.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_adds_maxcpus_only_with_several_cpus() {
        let p = |v| BootCpus::parse("KTSTR_KVM_BOOT_CPUS", v, BootCpus::All).unwrap();
        assert_eq!(p(None).cmdline("console=ttyS0", 4), "console=ttyS0");
        assert_eq!(p(Some("all")).cmdline("console=ttyS0", 4), "console=ttyS0");
        assert_eq!(p(Some("one")).cmdline("console=ttyS0", 4), "console=ttyS0 maxcpus=1");
        assert_eq!(p(Some("one")).cmdline("console=ttyS0", 1), "console=ttyS0");
        let e = BootCpus::parse("KTSTR_KVM_BOOT_CPUS", Some("some"), BootCpus::All).unwrap_err().to_string();
        assert!(e.contains("KTSTR_KVM_BOOT_CPUS=\"some\" is not a boot mode; use all or one"), "{e}");
        assert_eq!(BootCpus::parse("KTSTR_TCG_BOOT_CPUS", None, BootCpus::One).unwrap(), BootCpus::One);
        let e = BootCpus::parse("KTSTR_TCG_BOOT_CPUS", Some("x"), BootCpus::One).unwrap_err().to_string();
        assert!(e.contains("KTSTR_TCG_BOOT_CPUS=\"x\" is not a boot mode; use one or all"), "{e}");
    }
}
