//! `cargo ktstr shell` end to end on real kernels (QEMU TCG here, whatever
//! `KTSTR_VMM=auto` picks elsewhere): `--exec` output and exit status on
//! the ktstr kernel (`KTSTR_TEST_KERNEL`) and Debian's cloud kernel
//! (`KTSTR_DEBIAN_KERNEL`), a panicking and a hanging boot, `--test`, and
//! an interactive session driven through tmux as a person would.
//! Missing kernels or tmux skip (fail under `KTSTR_NO_SKIP_MODE=1`).

mod fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ktstr_runtime::testing::require;

fn kernel(var: &str) -> Option<PathBuf> {
    let k = std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_file());
    require(k, &format!("a kernel image in {var}"), "run through .ci/run, or set it to a bzImage/vmlinuz (scripts/setup.sh builds and fetches them)")
}

/// `cargo ktstr shell ARGS` with a kernel cache of the test's own.
fn shell(cache: &Path, args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let mut c = fixture::cargo_ktstr(cache);
    c.arg("shell").args(args);
    let o = c.output().expect("run cargo-ktstr shell");
    (o, t.elapsed())
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn exec_streams_output_and_returns_the_status_on_both_kernels() {
    let (Some(ktstr), Some(debian)) = (kernel("KTSTR_TEST_KERNEL"), kernel("KTSTR_DEBIAN_KERNEL")) else { return };
    let cache = tempfile::tempdir().unwrap();
    for k in [&ktstr, &debian] {
        let k = k.to_str().unwrap();
        let (o, _) = shell(cache.path(), &["--kernel", k, "--cpus", "3", "--exec", "nproc"]);
        assert_eq!(o.status.code(), Some(0), "{k}: {}", err(&o));
        assert_eq!(String::from_utf8_lossy(&o.stdout), "3\n", "{k}: exactly the command's output: {}", err(&o));
        let (o, _) = shell(cache.path(), &["--kernel", k, "--exec", "exit 7"]);
        assert_eq!(o.status.code(), Some(7), "{k}: {}", err(&o));
        assert!(o.stdout.is_empty(), "{k}: {:?}", String::from_utf8_lossy(&o.stdout));
    }
    // busybox's poweroff signals init, which ends the session with status 0
    // and nothing after it runs.
    let (o, _) = shell(cache.path(), &["--kernel", ktstr.to_str().unwrap(), "--exec", "poweroff; sleep 30; echo not-here"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(o.stdout.is_empty(), "{:?}", String::from_utf8_lossy(&o.stdout));
    // Output is streamed whole and byte for byte (no \r), the last line too;
    // a command killed by a signal gives 128 + the signal.
    let (o, _) = shell(cache.path(), &["--kernel", ktstr.to_str().unwrap(), "--exec", "seq 1 5000; echo err >&2; kill -9 $$"]);
    let mut want: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    want.push_str("err\n");
    assert_eq!(String::from_utf8_lossy(&o.stdout), want, "{}", err(&o));
    assert_eq!(o.status.code(), Some(137), "{}", err(&o));
    // The last command (exec'd by sh, so the one process left) ends with
    // output the UART has not sent yet: none of it may be lost.
    let (o, _) = shell(cache.path(), &["--kernel", ktstr.to_str().unwrap(), "--exec", "seq 1 5000 > /tmp/s; cat /tmp/s"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), want.trim_end_matches("err\n"), "{}", err(&o));
}

#[test]
fn a_failed_boot_prints_the_cause_and_the_console_and_exits_1() {
    let Some(ktstr) = kernel("KTSTR_TEST_KERNEL") else { return };
    let Some(debian) = kernel("KTSTR_DEBIAN_KERNEL") else { return };
    let cache = tempfile::tempdir().unwrap();
    // A real panic: no init to run (the ktstr kernel: "No working init found";
    // Debian's then looks for a root fs: "VFS: Unable to mount root fs").
    for k in [&ktstr, &debian] {
        let (o, took) =
            shell(cache.path(), &["--kernel", k.to_str().unwrap(), "--cmdline", "rdinit=/nonexistent", "--exec", "true"]);
        let e = err(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        let first = e.lines().find(|l| l.starts_with("ktstr: shell:")).unwrap_or_default();
        assert!(
            first.starts_with("ktstr: shell: FAIL: guest kernel panic before the shell started: ")
                && first.contains("Kernel panic - not syncing"),
            "the cause comes first: {e}"
        );
        assert!(e.contains("guest console (last 40 lines):") && e.contains("Linux version"), "{e}");
        assert!(took < Duration::from_secs(60), "within the boot timeout: {took:?}");
    }
    // A guest that never gets to the shell: init is a script that loops.
    let dir = tempfile::tempdir().unwrap();
    let hang = dir.path().join("hang.sh");
    std::fs::write(&hang, "#!/bin/busybox sh\nwhile :; do /bin/busybox sleep 1; done\n").unwrap();
    let args = ["--kernel", ktstr.to_str().unwrap(), "-i", hang.to_str().unwrap(), "--cmdline", "rdinit=/include/hang.sh"];
    let (o, took) = shell(cache.path(), &[&args[..], &["--boot-timeout", "8", "--exec", "true"]].concat());
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("ktstr: shell: FAIL: the guest did not start the shell within 8s (the boot timeout"), "{e}");
    assert!(e.contains("Run /include/hang.sh as init process") || e.contains("Linux version"), "the console tail: {e}");
    assert!(took >= Duration::from_secs(8) && took < Duration::from_secs(40), "{took:?}");
}

#[test]
fn test_flag_boots_the_tests_topology() {
    let Some(ktstr) = kernel("KTSTR_TEST_KERNEL") else { return };
    let cache = tempfile::tempdir().unwrap();
    let mut c = fixture::cargo_ktstr(cache.path());
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // two_cgroups_share_cpu asks for 2 CPUs; the shell's own default is 1.
    c.current_dir(ws).args(["shell", "--kernel", ktstr.to_str().unwrap(), "--test", "two_cgroups_share_cpu", "-p", "ktstr-tests"]);
    c.args(["--exec", "nproc; ls /sys/fs/cgroup/cgroup.subtree_control && cat /proc/cmdline"]);
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", err(&o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"2"), "{out}");
    assert!(lines.iter().any(|l| l.contains("ktstr.test=two_cgroups_share_cpu") && l.contains("ktstr.shell")), "{out}");

    // A sched_ext test: its scheduler runs under the shell (the ktstr kernel
    // has sched_ext). A small output from the command sh execs last used to
    // be lost to the tty hangup at its exit; every line must arrive.
    let mut c = fixture::cargo_ktstr(cache.path());
    c.current_dir(ws).args(["shell", "--kernel", ktstr.to_str().unwrap(), "--test", "scx_simple_workload", "-p", "ktstr-tests"]);
    c.args(["--exec", "nproc; cat /sys/kernel/sched_ext/state /sys/kernel/sched_ext/root/ops"]);
    if let Some(d) = std::env::var_os("KTSTR_SCHEDULER_DIR") {
        c.env("KTSTR_SCHEDULER_DIR", d);
    }
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", err(&o));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"ktstr: scheduler scx_simple is running (sched_ext ops: simple)"), "{out}");
    assert_eq!(lines.get(1..4), Some(&["2", "enabled", "simple"][..]), "{out}");
}

/// A private tmux server (its own socket, no user config), killed on drop.
struct Tmux {
    sock: String,
}

impl Tmux {
    fn start() -> Tmux {
        let t = Tmux { sock: format!("ktstr-shell-test-{}", std::process::id()) };
        let ok = t.cmd(&["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "200", "-y", "60", "env PS1='host$ ' bash --norc --noprofile"]);
        assert!(ok.status.success(), "tmux new-session: {}", err(&ok));
        t
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.sock).args(args).output().expect("run tmux")
    }

    fn keys(&self, keys: &[&str]) {
        let o = self.cmd(&[&["send-keys", "-t", "t"][..], keys].concat());
        assert!(o.status.success(), "send-keys {keys:?}: {}", err(&o));
    }

    /// Types `line` literally, then Enter.
    fn line(&self, line: &str) {
        let o = self.cmd(&["send-keys", "-t", "t", "-l", line]);
        assert!(o.status.success(), "{}", err(&o));
        self.keys(&["Enter"]);
    }

    fn pane(&self) -> Vec<String> {
        let o = self.cmd(&["capture-pane", "-p", "-J", "-S", "-500", "-t", "t"]);
        let mut lines: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(|l| l.trim_end().to_string()).collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }

    /// Clears the screen and the scrollback, so later waits see only new lines.
    fn clear(&self) {
        self.line("clear");
        std::thread::sleep(Duration::from_millis(500));
        let o = self.cmd(&["clear-history", "-t", "t"]);
        assert!(o.status.success(), "{}", err(&o));
    }

    fn size(&self) -> String {
        let o = self.cmd(&["display-message", "-p", "-t", "t", "#{pane_height} #{pane_width}"]);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Waits until `done` holds for the pane's lines; panics showing the pane.
    fn wait(&self, what: &str, limit: Duration, done: impl Fn(&[String]) -> bool) {
        let t = Instant::now();
        loop {
            let p = self.pane();
            if done(&p) {
                return;
            }
            if t.elapsed() > limit {
                panic!("tmux: no {what} within {limit:?}; the pane:\n{}", p.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for a line equal to `want` after the last line containing `after`.
    fn wait_output(&self, after: &str, want: &str, limit: Duration) {
        self.wait(&format!("line {want:?} after {after:?}"), limit, |p| {
            p.iter().rposition(|l| l.contains(after)).is_some_and(|i| p[i + 1..].iter().any(|l| l == want))
        });
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The fixture's command as one line for a shell: `env -u … K=V … PROGRAM ARGS`.
fn command_line(c: &Command) -> String {
    let mut s = String::from("env");
    // env takes its -u options before the assignments.
    for (k, _) in c.get_envs().filter(|(_, v)| v.is_none()) {
        s.push_str(&format!(" -u {}", k.to_string_lossy()));
    }
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!(" {}={}", k.to_string_lossy(), quote(&v.to_string_lossy())));
        }
    }
    s.push(' ');
    s.push_str(&quote(&c.get_program().to_string_lossy()));
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&quote(&a.to_string_lossy()));
    }
    s
}

/// The guest's prompt (`ktstr# `, trailing space trimmed when empty).
fn prompt(l: &str) -> bool {
    l == "ktstr#" || l.starts_with("ktstr# ")
}

const BOOT: Duration = Duration::from_secs(120);
const STEP: Duration = Duration::from_secs(30);

#[test]
fn interactive_session_in_tmux() {
    let Some(ktstr) = kernel("KTSTR_TEST_KERNEL") else { return };
    let tmux = ktstr_runtime::host_tools::find("tmux").ok();
    let Some(_) = require(tmux, "tmux", "apt-get install tmux (scripts/setup.sh installs it)") else { return };
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let inc = dir.path().join("shell-test-include.txt");
    std::fs::write(&inc, "hello\n").unwrap();
    let mut c = fixture::cargo_ktstr(cache.path());
    c.args(["shell", "--kernel", ktstr.to_str().unwrap(), "--cpus", "2", "-i", inc.to_str().unwrap()]);
    let run = format!("{}; echo rc=$?", command_line(&c));
    let t = Tmux::start();
    t.wait("host prompt", STEP, |p| p.iter().any(|l| l.starts_with("host$")));

    t.line(&run);
    let booted = |t: &Tmux| {
        t.wait("guest prompt (or the command's end)", BOOT, |p| p.iter().any(|l| prompt(l) || l.starts_with("rc=")));
        let p = t.pane();
        assert!(!p.iter().any(|l| l.starts_with("rc=")), "cargo ktstr shell ended before the prompt:\n{}", p.join("\n"));
    };
    booted(&t);
    t.line("ls /include");
    t.wait_output("ktstr# ls /include", "shell-test-include.txt", STEP);
    t.line("cat /proc/cpuinfo | grep -c processor");
    t.wait_output("grep -c processor", "2", STEP);
    // The guest gets the terminal's size.
    t.line("stty size");
    t.wait_output("ktstr# stty size", &t.size(), STEP);
    // Ctrl-C reaches the guest's foreground job; the shell and the VM stay.
    t.line("sleep 100");
    t.wait("sleep to start", STEP, |p| p.last().is_some_and(|l| l == "ktstr# sleep 100"));
    std::thread::sleep(Duration::from_secs(2));
    t.keys(&["C-c"]);
    t.line("echo alive-$((6*7))");
    t.wait_output("echo alive-", "alive-42", STEP);
    t.line("poweroff");
    t.wait_output("ktstr# poweroff", "rc=0", STEP);
    // The host shell works, and its terminal is back in cooked mode.
    t.line(r"echo T:$(stty -a | grep -o -w -e '-\?isig' -e '-\?icanon' -e '-\?echo' | tr '\n' ' ')");
    t.wait("stty output", STEP, |p| p.iter().any(|l| l.starts_with("T:")));
    let stty: Vec<String> = t.pane().into_iter().filter(|l| l.starts_with("T:")).collect();
    assert_eq!(stty, ["T:isig icanon echo"], "terminal modes after the VM ended");

    // The escape key ends the VM at once, even with a command running.
    t.clear();
    t.line(&run);
    booted(&t);
    t.line("sleep 100");
    t.wait("second sleep to start", STEP, |p| p.last().is_some_and(|l| l == "ktstr# sleep 100"));
    t.keys(&["C-]"]);
    t.wait_output("VM ended by Ctrl-]", "rc=0", STEP);
    t.line("echo host-ok-$((1+1))");
    t.wait_output("echo host-ok-", "host-ok-2", STEP);

    // Leaving the shell ends the VM with the shell's status.
    t.clear();
    t.line(&run);
    booted(&t);
    t.line("exit 3");
    t.wait_output("ktstr# exit 3", "rc=3", STEP);
}

/// The input run of the rig: keys typed once the prompt is up (stdin a
/// pipe, so no raw mode) must reach the guest's shell through the KVM
/// backend's COM1 receive FIFO, and `poweroff` must end it.
const RIG_INPUT: &str = r#"mkfifo /tmp/in
/t/ck ktstr shell --kernel /k/ktstr/bzImage --cpus 2 </tmp/in >/tmp/i 2>&1 &
pid=$!
exec 3>/tmp/in
i=0; until grep -q 'ktstr#' /tmp/i || [ $i -ge 240 ]; do sleep 1; i=$((i+1)); done
printf 'echo typed-$((2+3))\n' >&3; sleep 5; printf 'poweroff\n' >&3
wait $pid; rc=$?; cat /tmp/i; echo "shell rc=$rc"; [ $rc = 0 ] && grep -q typed-5 /tmp/i"#;

/// The KVM backend with real kernels, where this host's own KVM cannot
/// boot one: scripts/nested-kvm.sh runs cargo-ktstr inside a TCG guest
/// whose nested /dev/kvm works (docs/vmm.md). Slow: KTSTR_SLOW_TESTS=1.
#[test]
fn kvm_backend_shell_under_nested_kvm() {
    if !ktstr_runtime::testing::slow_tests_enabled() {
        return;
    }
    let (Some(ktstr), Some(debian)) = (kernel("KTSTR_TEST_KERNEL"), kernel("KTSTR_DEBIAN_KERNEL")) else { return };
    let cache = tempfile::tempdir().unwrap();
    let bin = PathBuf::from(fixture::cargo_ktstr(cache.path()).get_program());
    let rig = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("scripts/nested-kvm.sh");
    let runs = [
        ("exec", "/t/ck ktstr shell --kernel /k/ktstr/bzImage --cpus 2 --exec 'nproc; echo kvm-exec-ok' > /tmp/o; cat /tmp/o; test \"$(cat /tmp/o)\" = \"$(printf '2\\nkvm-exec-ok')\"".to_string()),
        ("status", "/t/ck ktstr shell --kernel /k/debian/bzImage --exec 'exit 7'; test $? = 7".to_string()),
        ("input", RIG_INPUT.to_string()),
        ("panic", "/t/ck ktstr shell --kernel /k/ktstr/bzImage --cmdline rdinit=/nonexistent --exec true 2>/tmp/e; rc=$?; cat /tmp/e; [ $rc = 1 ] && grep -q 'FAIL: guest kernel panic before the shell started' /tmp/e".to_string()),
    ];
    let mut c = Command::new(&rig);
    c.arg("--bin").arg(format!("ck={}", bin.display()));
    c.arg("--kernel").arg(format!("ktstr={}", ktstr.display()));
    c.arg("--kernel").arg(format!("debian={}", debian.display()));
    for (label, cmd) in &runs {
        c.arg("--run").arg(format!("{label}={cmd}"));
    }
    fixture::scrub_env(&mut c);
    let o = c.output().expect("run scripts/nested-kvm.sh");
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("{out}{}", err(&o));
    for (label, _) in &runs {
        let line = out.lines().find(|l| l.starts_with("nested-kvm: RESULT ") && l.contains(&format!(" run={label} ")));
        assert!(line.is_some_and(|l| l.starts_with("nested-kvm: RESULT PASS ")), "run {label}: {line:?}");
    }
    assert!(out.contains("nested-kvm: out| typed-5"), "the typed command ran in the guest");
    assert!(o.status.success(), "rig exit status {:?}", o.status);
}
