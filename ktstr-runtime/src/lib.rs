//! ktstr runtime, linked into every ktstr test binary.

pub mod artifacts;
pub mod cause;
pub mod cgroup;
pub mod channel;
pub mod checks;
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
pub mod metrics;
pub mod nextest;
pub mod output;
pub mod policy;
pub mod prelude;
pub mod registry;
pub mod report;
pub mod scheduler;
pub mod shell;
pub mod summary;
pub mod testing;
pub mod verdict;
pub mod vmm;
pub mod work;
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
