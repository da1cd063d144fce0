//! ktstr runtime, linked into every ktstr test binary.

pub mod artifacts;
pub mod cause;
pub mod cgroup;
pub mod channel;
pub mod conclude;
pub mod cpuset;
pub mod ctx;
pub mod discovery;
pub mod dispatch;
pub mod export;
pub mod guest;
pub mod host;
pub mod host_tools;
pub mod initramfs;
pub mod label;
pub mod nextest;
pub mod output;
pub mod prelude;
pub mod preset;
pub mod registry;
pub mod report;
pub mod scheduler;
pub mod testing;
pub mod topo_view;
pub mod verdict;
pub mod vmm;
pub mod workers;

pub use ktstr_macros::ktstr_test;

#[doc(hidden)]
pub mod __private {
    pub use linkme;

    /// Converts a test body's trailing check chain to `Result<()>`.
    pub fn tail_result<T>(r: anyhow::Result<T>) -> anyhow::Result<()> {
        r.map(|_| ())
    }
}
