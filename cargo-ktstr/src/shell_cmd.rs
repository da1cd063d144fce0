//! `cargo ktstr shell`: boot the kernel under test with a busybox
//! userland and get a shell on its console, or run one command.
//!
//! Without `--test`, this binary is the guest's `/init` too (main hands
//! PID 1 to `ktstr_runtime::shell::guest`). With `--test NAME`, the test
//! binary holding NAME builds and boots that test's VM itself (it knows
//! the test's topology, include files and scheduler).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use ktstr_runtime::shell::host::{self as shell, Options, HAS_TEST_FLAG, HAS_TEST_YES, OPTIONS_ENV, TEST_FLAG};
use ktstr_runtime::shell as guest_shell;
use ktstr_runtime::vmm::{Topology, Vm};

const EXAMPLES: &str = "\
Examples:
  cargo ktstr shell --kernel 6.12                        # interactive; Ctrl-] or `poweroff` ends it
  cargo ktstr shell --kernel 6.12 --cpus 4 --exec nproc  # prints 4; exit status is the command's
  cargo ktstr shell --topology 2,1,2,1 -i ./my-bench     # /include/my-bench, with its shared libraries
  cargo ktstr shell --test two_cgroups_share_cpu         # that test's VM (and scheduler), a shell for a body

Presets (--preset): tiny (1 CPU), smp4, smt (2x2 SMT), llc2 (2 LLCs x 2), numa2 (2 nodes x 2), big (16 CPUs).
Exit status: the shell's or command's; 0 after `poweroff` or Ctrl-]; 1 when the guest fails
to boot (the cause and the console tail are printed) or dies before it reports a status.";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct ShellArgs {
    /// Kernel to boot (VERSION, TARBALL, git+URL#REF, PATH or CACHE-KEY); default: discovery (cache, ./linux, /boot).
    #[arg(long = "kernel", value_name = "SPEC")]
    pub kernel: Option<String>,
    /// Number of CPUs (one node, one LLC).
    #[arg(long, value_name = "N", conflicts_with_all = ["topology", "preset", "test"])]
    pub cpus: Option<u32>,
    /// NUMA nodes, LLCs per node, cores per LLC, threads per core.
    #[arg(long, value_name = "N,L,C,T", conflicts_with_all = ["preset", "test"])]
    pub topology: Option<String>,
    /// A named topology (see below).
    #[arg(long, value_name = "NAME", conflicts_with = "test")]
    pub preset: Option<String>,
    /// Guest memory in MiB.
    #[arg(long = "memory-mib", value_name = "M", conflicts_with = "test")]
    pub memory_mib: Option<u64>,
    /// Host file to copy to /include/NAME in the guest, with its shared libraries (repeatable).
    #[arg(short = 'i', long = "include", value_name = "FILE")]
    pub include: Vec<PathBuf>,
    /// Run CMD with `sh -c` instead of an interactive shell; exit with its status.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Boot this #[ktstr_test]'s VM (kernel, topology, memory, include files, scheduler) with a shell for a body.
    #[arg(long, value_name = "NAME")]
    pub test: Option<String>,
    /// Package(s) whose test binaries to search for --test (repeatable).
    #[arg(short = 'p', long = "package", value_name = "PKG", requires = "test")]
    pub packages: Vec<String>,
    /// Extra kernel command-line arguments.
    #[arg(long, value_name = "ARGS")]
    pub cmdline: Vec<String>,
    /// Seconds the guest gets from start to a running shell before the command fails.
    #[arg(long = "boot-timeout", value_name = "SECS", default_value_t = ktstr_runtime::shell::host::BOOT_TIMEOUT_S)]
    pub boot_timeout: u64,
    /// Build the test binaries in release mode (with --test).
    #[arg(long, requires = "test")]
    pub release: bool,
    #[command(flatten)]
    pub common: crate::kernel_cmd::CommonArgs,
}

/// Default memory: room for the initramfs (this binary, busybox, includes) and its unpacked copy.
const DEFAULT_MEMORY_MIB: u64 = 512;

/// The topology the flags ask for (one CPU without any).
pub fn topology(a: &ShellArgs) -> Result<Topology> {
    let t = match (a.cpus, &a.topology, &a.preset) {
        (Some(n), _, _) => Topology::cpus(n),
        (_, Some(t), _) => guest_shell::parse_topology(t).map_err(|e| anyhow::anyhow!(e))?,
        (_, _, Some(p)) => guest_shell::preset(p).map_err(|e| anyhow::anyhow!(e))?,
        _ => Topology::cpus(1),
    };
    t.validate().map_err(|e| anyhow::anyhow!("--cpus/--topology/--preset: {e}"))?;
    Ok(t)
}

fn options(a: &ShellArgs) -> Result<Options> {
    let mut includes = Vec::new();
    for f in &a.include {
        let abs = if f.is_absolute() { f.clone() } else { std::env::current_dir()?.join(f) };
        if !abs.is_file() {
            bail!("-i {}: no such file (give a regular file; it lands at /include/NAME)", f.display());
        }
        includes.push(abs);
    }
    Ok(Options { exec: a.exec.clone(), includes, boot_timeout_s: a.boot_timeout, cmdline: a.cmdline.clone() })
}

/// Exit status of the session (the command's, or 1 on a failed boot).
pub fn run(a: ShellArgs) -> Result<i32> {
    let opts = options(&a)?;
    let mut kopts = kernel_build::Options::default();
    a.common.apply(&mut kopts)?;
    // Held (a shared lock on the cache entry) until the VM is gone.
    let resolved = match &a.kernel {
        Some(spec) => {
            Some(kernel_build::resolve_one(spec, &kopts).map_err(|e| anyhow::anyhow!("kernel {spec:?}: {e:#}"))?)
        }
        None => None,
    };
    if let Some(name) = &a.test {
        return run_test(&a, name, &opts, resolved.as_ref().map(|k| k.image.clone()));
    }
    let image = match &resolved {
        Some(k) => k.image.clone(),
        None => ktstr_runtime::discovery::discover().map_err(|e| anyhow::anyhow!("{e}; or pass --kernel SPEC"))?.image,
    };
    let topo = topology(&a)?;
    let memory = a.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
    let exe = std::env::current_exe().context("finding cargo-ktstr's own binary (the guest's /init)")?;
    let ir = ktstr_runtime::initramfs::Initramfs::new(&exe)?;
    let initrd = shell::add_userland(ir, &opts)?.build_cached()?;
    let mut b = Vm::builder().kernel(&image).initramfs(initrd).topo(topo).memory_mib(memory);
    for c in &opts.cmdline {
        b = b.cmdline(c.clone());
    }
    let what = format!("{} ({} CPUs, {memory} MiB)", image.display(), topo.total_cpus());
    Ok(shell::drive(b, &opts, &what))
}

/// `--test NAME`: builds the test binaries, finds the one holding NAME,
/// and lets it open the shell (it inherits our terminal).
fn run_test(a: &ShellArgs, name: &str, opts: &Options, kernel: Option<PathBuf>) -> Result<i32> {
    let name = name.strip_prefix("ktstr/").unwrap_or(name);
    if name.is_empty() || name.contains('/') {
        bail!("--test takes one test name (NAME or ktstr/NAME), got {name:?}");
    }
    let bins = crate::export_cmd::build_test_binaries(&a.packages, a.release)?;
    let mut holder = None;
    for b in &bins {
        let out = Command::new(b)
            .arg(format!("{HAS_TEST_FLAG}{name}"))
            .env_remove("NEXTEST")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .with_context(|| format!("running {}", b.display()))?;
        if out.status.success() && String::from_utf8_lossy(&out.stdout).lines().any(|l| l == HAS_TEST_YES) {
            holder = Some(b.clone());
            break;
        }
    }
    let Some(bin) = holder else {
        bail!("--test {name}: no test binary of this workspace has a ktstr test of that name (list them with `cargo nextest list`)");
    };
    let mut cmd = Command::new(&bin);
    cmd.arg(format!("{TEST_FLAG}{name}")).env(OPTIONS_ENV, serde_json::to_string(opts)?).env_remove("NEXTEST");
    if let Some(k) = kernel {
        cmd.env("KTSTR_TEST_KERNEL", k).env_remove("KTSTR_KERNEL_LIST");
    }
    if opts.exec.is_none() {
        eprintln!("ktstr: shell: test {name} is in {}", bin.display());
    }
    let st = cmd.status().with_context(|| format!("running {}", bin.display()))?;
    use std::os::unix::process::ExitStatusExt;
    Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(v: &[&str]) -> Result<ShellArgs, clap::Error> {
        let mut all = vec!["cargo-ktstr", "shell"];
        all.extend_from_slice(v);
        crate::Cli::try_parse_from(all).map(|c| match c.command {
            crate::Command::Shell(s) => s,
            _ => unreachable!(),
        })
    }

    #[test]
    fn topology_flags() {
        assert_eq!(topology(&args(&[]).unwrap()).unwrap(), Topology::cpus(1));
        assert_eq!(topology(&args(&["--cpus", "3"]).unwrap()).unwrap(), Topology::cpus(3));
        assert_eq!(topology(&args(&["--topology", "2,1,2,1"]).unwrap()).unwrap(), Topology::new(2, 1, 2, 1));
        assert_eq!(topology(&args(&["--preset", "smt"]).unwrap()).unwrap(), Topology::new(1, 1, 2, 2));
        assert!(topology(&args(&["--cpus", "0"]).unwrap()).unwrap_err().to_string().contains("at least 1"));
        assert!(args(&["--cpus", "2", "--preset", "smt"]).is_err(), "one way to give the topology");
        assert!(args(&["--test", "x", "--cpus", "2"]).is_err(), "--test brings its own topology");
        assert!(args(&["--test", "x", "--memory-mib", "256"]).is_err());
        let a = args(&["--exec", "exit 7", "-i", "/bin/sh", "-i", "Cargo.toml", "--cmdline", "quiet"]).unwrap();
        assert_eq!(a.exec.as_deref(), Some("exit 7"));
        assert_eq!(a.include.len(), 2);
        assert_eq!(a.boot_timeout, ktstr_runtime::shell::host::BOOT_TIMEOUT_S);
        let o = options(&a).unwrap();
        assert!(o.includes.iter().all(|p| p.is_absolute()));
        let e = options(&args(&["-i", "/nonexistent/file"]).unwrap()).unwrap_err().to_string();
        assert!(e.starts_with("-i /nonexistent/file: no such file"), "{e}");
    }
}
