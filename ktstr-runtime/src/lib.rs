//! ktstr runtime, linked into every ktstr test binary.
//!
//! The path of one test, host to guest and back:
//!
//! 1. `#[ktstr_test]` registers a [`registry::TestDef`]; [`dispatch`] runs
//!    before `main` and answers nextest's protocol ([`nextest`]: listing,
//!    one name per kernel in multi-kernel mode, [`label`]).
//! 2. Running a test, [`discovery`] resolves its kernel (the kernel cache
//!    shared with `kernel-build`), [`initramfs`] packs the test binary,
//!    include files, [`host_tools`] and the [`scheduler`].
//! 3. [`vmm`] boots the VM on KVM or QEMU TCG ([`host`] picks and builds it),
//!    or restores a [`snapshot`] saved at the guest's ready point and hands
//!    it the test's files and name.
//! 4. In the guest the binary is PID 1: [`guest`] mounts, brings CPUs
//!    online, starts the scheduler, runs the body under supervision.
//! 5. The body drives [`ctx`]: [`cgroup`]s, [`workers`] doing [`work`] under
//!    a [`policy`], measured by [`metrics`]; a [`report`] and its
//!    [`summary`] are judged by [`checks`].
//! 6. Verdict, body [`output`] and metrics travel back over the data
//!    [`channel`]; [`conclude`] names the [`cause`], prints the banner
//!    ([`verdict`]) and writes the run's [`artifacts`].
//! 7. Around it: [`export`] writes `.run` reproducers, [`shell`] boots a VM
//!    with a shell instead of a body.

pub mod artifacts;
pub mod cause;
pub mod cgroup;
pub mod channel;
pub mod checks;
pub mod conclude;
pub mod cpu_override;
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
pub mod preset;
pub mod registry;
pub mod report;
pub mod scenario;
pub mod scheduler;
pub mod shell;
pub mod snapshot;
pub mod summary;
pub mod testing;
pub mod topo_view;
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
