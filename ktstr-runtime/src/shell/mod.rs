//! `cargo ktstr shell`: a VM with the kernel under test and a busybox
//! userland, driven from the host's terminal.
//!
//! - [`guest`]: what PID 1 does in such a VM (mount, bring CPUs online,
//!   run `/bin/sh` on the serial console, report its exit status).
//! - [`host`]: packs the userland, boots the VM with a live console link,
//!   puts the terminal in raw mode, and turns how the VM ended into an
//!   exit status (a failed boot: the console tail and 1).
//! - [`stream`]: the console filter between the two (boot noise hidden,
//!   the exit marker cut out).
//! - [`term`]: the raw-mode guard that restores the terminal however we end.

pub mod guest;
pub mod host;
pub mod stream;
pub mod term;

/// Kernel command-line flag: init opens the shell instead of running a test body.
pub const SHELL_ARG: &str = "ktstr.shell";
/// The guest's copy of [`GuestConfig`].
pub const CONFIG_PATH: &str = "/ktstr/shell.json";
/// Where `-i FILE` lands in the guest (as a test's `include_files` do).
pub const INCLUDE_DIR: &str = "/include";
/// Printed by init on the console right before the shell starts.
pub const READY: &[u8] = b"\x02ktstr-shell-ready\x03";
/// Printed by init after the shell or command ended: this, the decimal
/// exit status, then [`MARKER_END`]. The status also goes on the data channel.
pub const EXIT_PREFIX: &[u8] = b"\x02ktstr-shell-exit=";
pub const MARKER_END: u8 = 0x03;
/// The escape key: Ctrl-] ends the VM (as in telnet).
pub const ESCAPE: u8 = 0x1d;
pub const ESCAPE_NAME: &str = "Ctrl-]";

/// What the host tells the guest's init (packed at [`CONFIG_PATH`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestConfig {
    /// `--exec CMD`: run this with `sh -c`, then power off.
    pub exec: Option<String>,
    /// The host's `$TERM`.
    pub term: Option<String>,
    /// The host terminal's size, so line editing and pagers fit.
    pub rows: u16,
    pub cols: u16,
}

/// Topology presets for `--preset NAME`: (name, numa nodes, LLCs per node,
/// cores per LLC, threads per core, what it is for).
pub const PRESETS: &[(&str, u32, u32, u32, u32, &str)] = &[
    ("tiny", 1, 1, 1, 1, "one CPU"),
    ("smp4", 1, 1, 4, 1, "4 CPUs, one LLC"),
    ("smt", 1, 1, 2, 2, "2 cores x 2 SMT threads"),
    ("llc2", 1, 2, 2, 1, "2 LLCs x 2 cores"),
    ("numa2", 2, 1, 2, 1, "2 NUMA nodes x 2 cores"),
    ("big", 2, 2, 2, 2, "2 nodes x 2 LLCs x 2 cores x 2 threads (16 CPUs)"),
];

/// The topology of a preset name.
pub fn preset(name: &str) -> Result<crate::vmm::Topology, String> {
    PRESETS.iter().find(|p| p.0 == name).map(|p| crate::vmm::Topology::new(p.1, p.2, p.3, p.4)).ok_or_else(|| {
        let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
        format!("unknown topology preset {name:?}; use one of {}", names.join(", "))
    })
}

/// `N,L,C,T` (NUMA nodes, LLCs per node, cores per LLC, threads per core).
pub fn parse_topology(s: &str) -> Result<crate::vmm::Topology, String> {
    let bad = || format!("--topology {s:?}: expected N,L,C,T (NUMA nodes, LLCs per node, cores per LLC, threads per core), e.g. 2,1,2,1");
    let v: Vec<u32> = s.split(',').map(|x| x.trim().parse::<u32>().map_err(|_| bad())).collect::<Result<_, _>>()?;
    let [n, l, c, t] = v[..] else { return Err(bad()) };
    let topo = crate::vmm::Topology::new(n, l, c, t);
    topo.validate().map_err(|e| format!("--topology {s}: {e}"))?;
    Ok(topo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::Topology;

    #[test]
    fn topology_forms() {
        assert_eq!(parse_topology("2,1,2,1").unwrap(), Topology::new(2, 1, 2, 1));
        assert!(parse_topology("2,1,2").unwrap_err().contains("expected N,L,C,T"));
        assert!(parse_topology("2,x,2,1").is_err());
        assert!(parse_topology("0,1,1,1").unwrap_err().contains("at least 1"));
        assert_eq!(preset("numa2").unwrap(), Topology::new(2, 1, 2, 1));
        assert_eq!(preset("big").unwrap().total_cpus(), 16);
        let e = preset("huge").unwrap_err();
        assert!(e.contains("\"huge\"") && e.contains("tiny, smp4"), "{e}");
        for p in PRESETS {
            preset(p.0).unwrap().validate().unwrap();
        }
    }
}
