//! The early constructor that picks a test binary's role before `main`:
//! PID 1 → guest init; `--ktstr-export-test=NAME` → export; under
//! `NEXTEST`, `--list` and `--exact ktstr/…` → the runtime; else libtest.

use std::io::Write;

use crate::discovery;
use crate::host::{self, KernelChoice};
use crate::nextest::{self, Args, PASSTHROUGH_ENV};
use crate::registry::{self, TestDef};
use crate::verdict::{self, Outcome};

#[ctor::ctor]
fn ktstr_early_dispatch() {
    dispatch();
}

fn exit(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}

fn dispatch() {
    // Binaries without tests (the VMM's probe init) keep their own PID 1 role.
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == 1 && !registry::TESTS.is_empty() {
        crate::guest::init();
    }
    // std::env::args() would panic on a non-UTF-8 argument, and a panic in
    // a constructor aborts the process.
    let args = match utf8_args(std::env::args_os()) {
        Ok(a) => a,
        // Not a ktstr test binary: its own main decides what to make of it.
        Err(_) if registry::TESTS.is_empty() => return,
        Err(bad) => {
            eprintln!(
                "ktstr: FAIL: argument {:?} is not valid UTF-8; test names, filters and ktstr flags must be UTF-8",
                bad.to_string_lossy()
            );
            exit(1);
        }
    };
    if let Some(code) = crate::export::dispatch_registry(&args) {
        exit(code);
    }
    // `cargo ktstr shell --test NAME` finds the binary holding NAME, then opens the shell through it.
    if let Some(name) = args.iter().find_map(|a| a.strip_prefix(crate::shell::host::HAS_TEST_FLAG)) {
        let name = name.strip_prefix("ktstr/").unwrap_or(name);
        if registry::find(name).is_some() {
            println!("{}", crate::shell::host::HAS_TEST_YES);
            exit(0);
        }
        exit(1);
    }
    if let Some(name) = args.iter().find_map(|a| a.strip_prefix(crate::shell::host::TEST_FLAG)) {
        exit(crate::shell::host::run_test(name));
    }
    if let Some(name) = args.iter().find_map(|a| a.strip_prefix(crate::export::RUN_HOST_FLAG)) {
        exit(run_on_host(name));
    }
    // Nothing to add to libtest's answers in a binary without ktstr tests.
    if std::env::var_os(PASSTHROUGH_ENV).is_some() || registry::TESTS.is_empty() {
        return;
    }
    let a = Args::parse(args.get(1..).unwrap_or_default());
    if std::env::var_os("NEXTEST").is_some() {
        if a.list {
            exit(nextest::list(&args));
        }
        if a.exact && a.filters.len() == 1 && nextest::is_ktstr_name(&a.filters[0]) {
            exit(nextest::run_exact(&a.filters[0]));
        }
        return;
    }
    let has_vm_tests = registry::TESTS.iter().any(|t| !t.host_only);
    if has_vm_tests && !a.list && std::env::var("KTSTR_CARGO_TEST_MODE").map_or(true, |v| v != "1") {
        eprintln!(
            "ktstr: warning: under plain `cargo test` each #[ktstr_test] runs once; kernel and topology \
             variants do not expand (use `cargo ktstr test` or `cargo nextest run`; KTSTR_CARGO_TEST_MODE=1 silences this)"
        );
    }
}

/// The arguments as strings, or the first that is not UTF-8.
fn utf8_args(args: impl Iterator<Item = std::ffi::OsString>) -> Result<Vec<String>, std::ffi::OsString> {
    args.map(|a| a.into_string()).collect()
}

/// `--ktstr-run-host=NAME` (used by exported `.run` files): the body on
/// this host, supervised like in the guest; exits with the verdict code.
fn run_on_host(name: &str) -> i32 {
    let name = name.strip_prefix("ktstr/").unwrap_or(name);
    match registry::find(name) {
        Some(def) => {
            let run = host::run_on_host(|| match def.scheduler() {
                // The .run names the binary it carries through KTSTR_SCHEDULER.
                Some(s) => match crate::scheduler::host::find_binary(&s, None) {
                    Ok(bin) => crate::scheduler::guest::run_under_expecting(&s, &bin, def.expect_scx_error, || host::run_host_only(def)),
                    Err(e) => verdict::Verdict::fail(e.to_string()),
                },
                None => host::run_host_only(def),
            });
            let full = format!("ktstr/{name}");
            let (v, artifacts) = crate::conclude::conclude(&full, def, run);
            nextest::print_pass(&full, &v);
            verdict::finish(&v, artifacts.as_deref())
        }
        None => {
            eprintln!("ktstr: FAIL: no ktstr test named {name} in this binary");
            1
        }
    }
}

/// Body of the `#[test]` wrapper each `#[ktstr_test]` gets for plain
/// `cargo test`: one run against the first (or discovered) kernel.
pub fn cargo_test(def: &'static TestDef) {
    let (def, refused) = crate::cpu_override::for_run(def).unwrap_or_else(|m| panic!("ktstr: FAIL: {m}"));
    let run = if let Some(why) = refused {
        host::run_on_host(|| verdict::Verdict::skip(why))
    } else if def.host_only {
        host::run_on_host(|| host::run_host_only(def))
    } else {
        let choice = match discovery::kernel_list() {
            Ok(Some(ks)) => KernelChoice::Entry(ks[0].clone()),
            Ok(None) => KernelChoice::Discover,
            Err(e) => panic!("ktstr: FAIL: {e}"),
        };
        host::run_vm_full(def, &choice)
    };
    let (v, artifacts) = crate::conclude::conclude(&format!("ktstr/{}", def.name), def, run);
    let no_skip = verdict::no_skip_mode();
    let banner = verdict::banner(&v, no_skip, artifacts.as_deref());
    match verdict::exit_code(v.outcome, no_skip) {
        0 => {
            match (banner, &artifacts) {
                (Some(b), _) => eprintln!("{b}"),
                (None, Some(dir)) => eprintln!("ktstr: artifacts: {}", dir.display()),
                (None, None) => {}
            }
            if v.outcome == Outcome::Skip {
                crate::testing::record_skip(&format!("ktstr/{}", def.name), &v.message);
            }
        }
        _ if v.outcome == Outcome::Inconclusive => panic!("{}", banner.unwrap_or_default()),
        _ => panic!("{}", banner.unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn non_utf8_arguments_are_reported_not_panicked_on() {
        let ok = utf8_args(["bin", "--exact", "ktstr/x"].into_iter().map(OsString::from)).unwrap();
        assert_eq!(ok, ["bin", "--exact", "ktstr/x"]);
        let bad = OsString::from_vec(b"ktstr/\xff".to_vec());
        let err = utf8_args([OsString::from("bin"), bad.clone()].into_iter()).unwrap_err();
        assert_eq!(err, bad);
    }
}
