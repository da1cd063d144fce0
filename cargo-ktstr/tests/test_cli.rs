//! `cargo ktstr test`, `completions` and `--help` through the real binary,
//! with a stand-in `cargo` (via `$CARGO`) that records what it was exec'd
//! with: the hand-off env vars, nextest's argv, and that bad input never
//! reaches it. Fast; always run. The real nextest run is plugin_e2e.rs.

mod fixture;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    /// A `cargo` that writes its argv and the KTSTR_ env to `record`, and a
    /// `cargo-nextest` on PATH so the plugin's install check passes.
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let record = dir.path().join("record");
        script(
            &bin.join("cargo"),
            &format!(
                "#!/bin/sh\n{{ printf 'argv:'; printf ' [%s]' \"$@\"; echo; env | grep '^KTSTR_' | sort; }} > '{}'\nexit 7\n",
                record.display()
            ),
        );
        script(&bin.join("cargo-nextest"), "#!/bin/sh\nexit 0\n");
        Fake { dir }
    }

    fn run(&self, args: &[&str], with_nextest: bool) -> Output {
        self.run_env(args, with_nextest, &[])
    }

    /// [`Fake::run`] with `env` set on top of a scrubbed environment.
    fn run_env(&self, args: &[&str], with_nextest: bool, env: &[(&str, &str)]) -> Output {
        let bin = self.dir.path().join("bin");
        let path = if with_nextest { format!("{}:/usr/bin:/bin", bin.display()) } else { "/usr/bin:/bin".into() };
        let mut c = fixture::cargo_ktstr(&self.dir.path().join("cache"));
        c.args(args).current_dir(self.dir.path());
        c.envs(env.iter().copied());
        c.env("CARGO", bin.join("cargo"))
            .env("PATH", path)
            .env("CARGO_HOME", self.dir.path().join("no-cargo-home"))
            .output()
            .unwrap()
    }

    fn record(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("record")).ok()
    }

    fn image(&self, dir: &str) -> PathBuf {
        let d = self.dir.path().join(dir);
        std::fs::create_dir_all(&d).unwrap();
        let mut img = vec![0u8; 4096];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(d.join("bzImage"), img).unwrap();
        d.join("bzImage").canonicalize().unwrap()
    }
}

fn script(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_one_error_line(o: &Output, wants: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for w in wants {
        assert!(lines[0].contains(w), "missing {w:?} in {err}");
    }
}

#[test]
fn bad_kernels_fail_before_nextest() {
    let f = Fake::new();
    assert_one_error_line(&f.run(&["test", "--kernel", "does-not-exist"], true), &["does-not-exist"]);
    assert_one_error_line(&f.run(&["test", "--kernel", "6.12..6.10"], true), &["6.12..6.10", "swap the endpoints"]);
    // A bad spec after a good one still stops everything before nextest.
    let img = f.image("k1");
    assert_one_error_line(&f.run(&["test", "--kernel", img.to_str().unwrap(), "--kernel", "git+https://h/x.git"], true), &["#REF"]);
    assert_eq!(f.record(), None, "cargo nextest must not have started");
}

#[test]
fn missing_nextest_is_one_line_with_the_install_command() {
    let f = Fake::new();
    assert_one_error_line(&f.run(&["test"], false), &["cargo install cargo-nextest --locked"]);
    assert_eq!(f.record(), None);
}

#[test]
fn hands_kernels_to_nextest_and_passes_args_untouched() {
    let f = Fake::new();
    // Directories holding an image: labels carry the directory's name.
    let (a, b) = (f.image("alpha"), f.image("beta"));
    let (da, db) = (a.parent().unwrap(), b.parent().unwrap());
    let o = f.run(
        &["test", "--kernel", da.to_str().unwrap(), "--kernel", db.to_str().unwrap(), "-p", "mine", "--", "-E", "test(kernel_x)", "--no-fail-fast"],
        true,
    );
    // exec: the stand-in's exit code is ours.
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let rec = f.record().expect("cargo was exec'd");
    assert!(rec.starts_with("argv: [nextest] [run] [-p] [mine] [-E] [test(kernel_x)] [--no-fail-fast]\n"), "{rec}");
    let kernel = rec.lines().find_map(|l| l.strip_prefix("KTSTR_KERNEL=")).unwrap();
    assert_eq!(kernel, a.to_str().unwrap());
    let list = rec.lines().find_map(|l| l.strip_prefix("KTSTR_KERNEL_LIST=")).expect("two kernels give a list");
    let entries: Vec<(&str, &str)> = list.split(';').map(|e| e.split_once('=').unwrap()).collect();
    assert_eq!(entries.len(), 2, "{list}");
    assert!(entries[0].0.starts_with("path_alpha_") && entries[0].1 == a.to_str().unwrap(), "{list}");
    assert!(entries[1].0.starts_with("path_beta_") && entries[1].1 == b.to_str().unwrap(), "{list}");

    // One kernel: KTSTR_KERNEL only, and a stale list from the caller is dropped.
    let o = f.run_env(
        &["test", "--kernel", a.to_str().unwrap()],
        true,
        &[("KTSTR_KERNEL_LIST", "stale=/nowhere"), ("KTSTR_TEST_KERNEL", "/nowhere/bzImage")],
    );
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let rec = f.record().unwrap();
    assert!(rec.contains(&format!("KTSTR_KERNEL={}\n", a.display())), "{rec}");
    assert!(!rec.contains("KTSTR_KERNEL_LIST=") && !rec.contains("KTSTR_TEST_KERNEL="), "{rec}");

    // No --kernel: nothing handed over; the test binaries discover one.
    let o = f.run(&["test"], true);
    assert_eq!(o.status.code(), Some(7));
    let rec = f.record().unwrap();
    assert!(rec.starts_with("argv: [nextest] [run]\n") && !rec.contains("KTSTR_KERNEL"), "{rec}");
}

#[test]
fn help_shows_examples_and_completions_generate() {
    let f = Fake::new();
    for sub in [&["test", "--help"][..], &["export", "--help"], &["kernel", "build", "--help"], &["--help"]] {
        let o = f.run(sub, true);
        assert!(o.status.success(), "{sub:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Examples:"), "{sub:?} has no examples");
    }
    for shell in ["bash", "zsh", "fish"] {
        let o = f.run(&["completions", shell], true);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("cargo-ktstr") && text.contains("export"), "{shell}: {text}");
    }
    let o = f.run(&["completions", "bash"], true);
    let st = Command::new("bash").arg("-n").stdin(std::process::Stdio::piped()).spawn().and_then(|mut c| {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(&o.stdout)?;
        c.wait()
    });
    assert!(st.unwrap().success(), "bash completion script does not parse");
}

/// `--repeat N` runs nextest N times with one artifacts run id and
/// `KTSTR_REPEAT=i/N`; failed tests (nextest's 100) do not stop the
/// repeats, anything else (a build failure, 101) does.
#[test]
fn repeat_runs_nextest_n_times_under_one_run_id() {
    let f = Fake::new();
    let log = f.dir.path().join("calls");
    // Exit codes per call, from a file the stand-in pops a line off.
    let codes = f.dir.path().join("codes");
    script(
        &f.dir.path().join("bin/cargo"),
        &format!(
            "#!/bin/sh\necho \"$KTSTR_RUN_ID $KTSTR_REPEAT $*\" >> '{log}'\nc=$(head -n1 '{codes}'); sed -i 1d '{codes}'\nexit ${{c:-0}}\n",
            log = log.display(),
            codes = codes.display()
        ),
    );
    std::fs::write(&codes, "0\n100\n0\n").unwrap();
    let o = f.run(&["test", "--repeat", "3", "--", "-E", "test(x)"], true);
    assert_eq!(o.status.code(), Some(100), "a failed repeat is the exit code: {}", stderr(&o));
    let calls = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 3, "{calls}");
    let id = lines[0].split(' ').next().unwrap();
    assert!(id.ends_with("Z-r3") && id.len() == "20260101T020304.123Z-r3".len(), "{calls}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("{id} {}/3 nextest run -E test(x)", i + 1));
    }
    assert!(stderr(&o).contains(&format!("`cargo ktstr stats {id}`")), "{}", stderr(&o));

    std::fs::remove_file(&log).unwrap();
    std::fs::write(&codes, "101\n0\n").unwrap();
    let o = f.run(&["test", "--repeat", "2"], true);
    assert_eq!(o.status.code(), Some(101), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1, "a build failure stops the repeats");
    assert!(stderr(&o).contains("the remaining repeats are not run"), "{}", stderr(&o));

    // Without --repeat, a KTSTR_REPEAT left in the caller's environment is dropped.
    std::fs::remove_file(&log).unwrap();
    let o = f.run_env(&["test"], true, &[("KTSTR_REPEAT", "2/3")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "  nextest run\n");

    // --repeat 0 is a usage error; nextest never starts.
    std::fs::remove_file(&log).unwrap();
    let o = f.run(&["test", "--repeat", "0"], true);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!log.exists());
}
