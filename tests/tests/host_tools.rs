//! Real host programs inside the guest. `host_tools` names programs the
//! host has (found on its PATH or in the sbin/bin directories); each is
//! packed with its ELF interpreter and shared libraries at
//! `/ktstr/bin/{name}`, first on the guest's PATH. A tool the host lacks
//! SKIPs the test (FAILs under `KTSTR_NO_SKIP_MODE=1`); scripts/setup.sh
//! installs the ones used here (bpftool, util-linux's `script`).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use ktstr_runtime::prelude::*;

const SIMPLE: Scheduler = Scheduler::new("scx_simple").binary("scx_simple").args(&["-f"]);

/// Runs `cmd` to completion; its stdout, or an error with both streams.
fn run(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "{what}: {}\nstdout:\n{stdout}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    Ok(stdout)
}

/// Names of the struct_ops programs in `bpftool prog show` output
/// (`12: struct_ops  name simple_enqueue  tag …`).
fn struct_ops_names(listing: &str) -> BTreeSet<&str> {
    listing
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.next()?.strip_suffix(':')?.parse::<u32>().ok()?;
            (w.next()? == "struct_ops" && w.next()? == "name").then_some(())?;
            w.next()
        })
        .collect()
}

/// Debian's bpftool (dynamically linked: libelf, libz, libcap, libc) sees
/// the BPF programs of the scheduler sched_ext runs. On a kernel without
/// sched_ext the scheduler start SKIPs the test.
#[ktstr_test(scheduler = SIMPLE, cpus = 2, memory_mib = 512, timeout_s = 60, host_tools = ["bpftool"])]
fn bpftool_lists_scheduler_struct_ops(ctx: &Ctx) -> Result<()> {
    let listing = run(Command::new(ctx.tool("bpftool")?).args(["prog", "show"]))?;
    let names = struct_ops_names(&listing);
    println!("bpftool: struct_ops programs {names:?}");
    // scx_simple's ops (tools/sched_ext/scx_simple.bpf.c), each a struct_ops
    // program; simple_select_cpu is left out as its 16+ character name shows
    // whole only when bpftool reads it from BTF.
    let ops = ["simple_enqueue", "simple_dispatch", "simple_running", "simple_stopping", "simple_enable", "simple_init", "simple_exit"];
    for want in ops {
        ensure!(names.contains(want), "bpftool shows struct_ops programs {names:?}, without {want}; listing:\n{listing}");
    }
    Ok(())
}

/// util-linux `script` opens a pty pair and runs `tty` (through `sh -c`,
/// the dash of $SHELL) on its slave side: tty names a /dev/pts device.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 30, host_tools = ["script", "sh", "tty"])]
fn script_runs_a_command_on_a_pty(ctx: &Ctx) -> Result<()> {
    let out = run(Command::new(ctx.tool("script")?).args(["-qec", "tty", "/dev/null"]).env("SHELL", ctx.tool("sh")?))?;
    let tty = out.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
    let n = tty.strip_prefix("/dev/pts/").and_then(|n| n.parse::<u32>().ok());
    ensure!(n.is_some(), "tty under script printed {tty:?}, not /dev/pts/N; whole output: {out:?}");
    Ok(())
}

const TRACING: &str = "/sys/kernel/tracing";

fn write_tracefs(file: &str, value: &str) -> Result<()> {
    let p = Path::new(TRACING).join(file);
    std::fs::write(&p, value).with_context(|| format!("writing {value:?} to {}", p.display()))
}

/// Disables the sched_switch event when dropped, whatever the body did.
struct EventOn;

impl Drop for EventOn {
    fn drop(&mut self) {
        let _ = write_tracefs("events/sched/sched_switch/enable", "0");
    }
}

/// Everything trace_pipe yields for `window` (consuming reads; the pipe is
/// non-blocking so an idle trace cannot hang the body).
fn read_trace_pipe(window: Duration) -> Result<String> {
    let p = Path::new(TRACING).join("trace_pipe");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))?;
    let (t0, mut out, mut buf) = (Instant::now(), Vec::new(), vec![0u8; 64 << 10]);
    while t0.elapsed() < window {
        match f.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(20)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn sched_switch_lines(trace: &str) -> Vec<&str> {
    trace.lines().filter(|l| l.contains(" sched_switch: prev_comm=") && l.contains(" ==> next_comm=")).collect()
}

/// tracefs at /sys/kernel/tracing: with events/sched/sched_switch enabled,
/// trace_pipe carries sched_switch events while sleepers switch; once it
/// is disabled again, no new ones arrive.
#[ktstr_test(cpus = 2, memory_mib = 256, timeout_s = 30)]
fn trace_pipe_shows_sched_switch(ctx: &Ctx) -> Result<()> {
    let enable = Path::new(TRACING).join("events/sched/sched_switch/enable");
    if !enable.exists() {
        return Err(Skip(format!("this kernel has no sched_switch tracepoint ({} is missing)", enable.display())).into());
    }
    write_tracefs("tracing_on", "1")?;
    write_tracefs("trace", "")?; // empty the ring buffer
    let on = EventOn;
    write_tracefs("events/sched/sched_switch/enable", "1")?;
    let report = ctx.run(&[ctx.sleepers(2, Duration::from_millis(1), Duration::from_millis(2))], Duration::from_millis(500))?;
    report.assert_no_starvation()?;
    let trace = read_trace_pipe(Duration::from_secs(1))?;
    let events = sched_switch_lines(&trace);
    let head: Vec<&str> = trace.lines().take(10).collect();
    ensure!(!events.is_empty(), "no sched_switch event in trace_pipe; it gave {} bytes:\n{}", trace.len(), head.join("\n"));
    println!("{} sched_switch events, first: {}", events.len(), events[0].trim());

    drop(on);
    let state = std::fs::read_to_string(&enable)?;
    ensure!(state.trim() == "0", "{} reads {state:?} after disabling", enable.display());
    // What was buffered before the disable drains first; then silence.
    read_trace_pipe(Duration::from_millis(300))?;
    ctx.run(&[ctx.sleepers(1, Duration::from_millis(1), Duration::from_millis(2))], Duration::from_millis(200))?;
    let after = read_trace_pipe(Duration::from_millis(300))?;
    let late = sched_switch_lines(&after);
    ensure!(late.is_empty(), "{} sched_switch events after disabling, first: {}", late.len(), late[0]);
    Ok(())
}

/// Names a tool no host has: the host SKIPs it before booting a VM.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 10, host_tools = ["ktstr-no-such-tool"])]
fn demo_host_tool_missing(_ctx: &Ctx) -> Result<()> {
    bail!("the body must not run without its host tool")
}

/// The missing-tool path, run like nextest runs a test (`NEXTEST=1
/// --exact`) on the first kernel: a SKIP naming the tool and the fix,
/// before any VM boots; under KTSTR_NO_SKIP_MODE=1 a FAIL (exit 1).
#[test]
fn missing_host_tool_skips_and_fails_under_no_skip_mode() {
    let first = std::env::var("KTSTR_KERNEL_LIST").ok().and_then(|l| l.split(';').find_map(|e| Some(e.split_once('=')?.1.to_string())));
    let found = first.or_else(|| ktstr_runtime::discovery::discover().ok().map(|f| f.image.display().to_string()));
    let Some(kernel) = ktstr_runtime::testing::require(found, "a kernel image", "run through `cargo ktstr test --kernel …` or set KTSTR_TEST_KERNEL") else {
        return;
    };
    let run = |no_skip: bool| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "ktstr/demo_host_tool_missing", "--ignored", "--nocapture"]).env("NEXTEST", "1");
        for k in ["KTSTR_KERNEL_LIST", "KTSTR_KERNEL", "KTSTR_NO_SKIP_MODE", "KTSTR_SKIP_LOG", "KTSTR_EXPECTED_SKIPS"] {
            cmd.env_remove(k);
        }
        cmd.env("KTSTR_TEST_KERNEL", &kernel);
        if no_skip {
            cmd.env("KTSTR_NO_SKIP_MODE", "1");
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        for l in stderr.lines() {
            eprintln!("  | {l}");
        }
        (out.status.code(), stderr)
    };
    let (code, stderr) = run(false);
    assert_eq!(code, Some(0), "a skip exits 0:\n{stderr}");
    let skip = stderr.lines().find(|l| l.starts_with("ktstr: SKIP: ")).unwrap_or_else(|| panic!("no SKIP line:\n{stderr}"));
    assert!(skip.contains("host tool `ktstr-no-such-tool` not found") && skip.contains("install it"), "{skip}");
    assert!(!stderr.contains("guest uname -r"), "a VM booted although the tool is missing:\n{stderr}");
    let (code, stderr) = run(true);
    assert_eq!(code, Some(1), "KTSTR_NO_SKIP_MODE=1 turns the skip into a fail:\n{stderr}");
    assert!(stderr.contains("ktstr: FAIL: ") && stderr.contains("ktstr-no-such-tool"), "{stderr}");
}

#[test]
fn struct_ops_names_parses_bpftool_listing() {
    let listing = "\
3: cgroup_device  name sd_devices  tag 1234  gpl
\tloaded_at 2025-01-01T00:00:00+0000  uid 0
12: struct_ops  name simple_enqueue  tag abcd  gpl
\txlated 160B  jited 100B  memlock 4096B  map_ids 3,4
13: struct_ops  name simple_init  tag ef01  gpl
";
    assert_eq!(struct_ops_names(listing), BTreeSet::from(["simple_enqueue", "simple_init"]));
    assert!(struct_ops_names("").is_empty());
}

#[test]
fn sched_switch_lines_match_event_lines_only() {
    let trace = "\
          <idle>-0       [001] d..2.   10.5: sched_switch: prev_comm=swapper/1 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=init next_pid=1 next_prio=120
             init-1      [000] d..3.   10.6: sched_wakeup: comm=kworker/0:1 pid=20 prio=120 target_cpu=000
";
    let got = sched_switch_lines(trace);
    assert_eq!(got.len(), 1);
    assert!(got[0].contains("next_comm=init"));
}
