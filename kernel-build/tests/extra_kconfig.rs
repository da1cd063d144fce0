//! `--extra-kconfig` against a real kernel tree: the fragment is merged
//! after ktstr.kconfig (later lines win) and verified like it. Configures
//! only (no compile): about a minute. Runs with KTSTR_SLOW_TESTS=1.

use std::path::Path;
use std::process::Command;

use kernel_build::build::Make;
use kernel_build::config::{configure, parse_config, DroppedOptions};
use kernel_build::{Base, KCONFIG};

const TARBALL: &str = "/usr/src/linux-source-6.12.tar.xz";

/// `None` unless slow tests are opted into (as in cargo-ktstr's
/// kernel_slow.rs); once they are, a missing tarball is a failure.
fn enabled(name: &str) -> Option<()> {
    if std::env::var("KTSTR_SLOW_TESTS").is_ok_and(|v| v == "1") {
        assert!(Path::new(TARBALL).is_file(), "{name}: KTSTR_SLOW_TESTS=1 but {TARBALL} is missing (apt-get install linux-source-6.12)");
        return Some(());
    }
    // kernel-build cannot use ktstr_runtime::testing (it depends on us):
    // the same contract by hand, a visible SKIP or a FAIL under no-skip mode.
    let why = format!("{name}: a slow test (KTSTR_SLOW_TESTS is not 1); set KTSTR_SLOW_TESTS=1 to configure a real kernel tree");
    assert!(std::env::var("KTSTR_NO_SKIP_MODE").map_or(true, |v| v != "1"), "ktstr: FAIL: premise missing under KTSTR_NO_SKIP_MODE=1: {why}");
    eprintln!("ktstr: SKIP: {why}");
    None
}

#[test]
fn extra_fragment_is_merged_after_ktstr_kconfig_and_verified() {
    let Some(()) = enabled("extra_fragment_is_merged_after_ktstr_kconfig_and_verified") else { return };
    let d = tempfile::tempdir().unwrap();
    let st = Command::new("tar").args(["-xJf", TARBALL, "-C"]).arg(d.path()).status().unwrap();
    assert!(st.success());
    let src = kernel_build::tree::find_source_root(d.path()).expect("a source tree");
    let make = Make::new(None, false);
    let log = d.path().join("log");
    let cfg = |src: &Path| -> Vec<(String, String)> { parse_config(&std::fs::read_to_string(src.join(".config")).unwrap()) };
    let has = |c: &[(String, String)], k: &str, v: &str| c.iter().any(|(a, b)| a == k && b == v);

    // ktstr.kconfig turns IKCONFIG_PROC (a leaf) on; the extra fragment
    // turns it off and adds MAGIC_SYSRQ (which tinyconfig leaves off).
    assert!(has(&parse_config(KCONFIG), "CONFIG_IKCONFIG_PROC", "y"), "premise: ktstr.kconfig sets IKCONFIG_PROC");
    let extra = "# CONFIG_IKCONFIG_PROC is not set\nCONFIG_MAGIC_SYSRQ=y\n";
    configure(&src, &Base::Tinyconfig, &[KCONFIG, extra], &make, &log).unwrap();
    let c = cfg(&src);
    assert!(!c.iter().any(|(k, v)| k == "CONFIG_IKCONFIG_PROC" && v == "y"), "the extra fragment wins");
    assert!(has(&c, "CONFIG_IKCONFIG", "y"));
    assert!(has(&c, "CONFIG_MAGIC_SYSRQ", "y"));
    assert!(has(&c, "CONFIG_SCHED_CLASS_EXT", "y"), "ktstr.kconfig still applies");

    // An option Kconfig does not know is dropped and named.
    let e = configure(&src, &Base::Tinyconfig, &[KCONFIG, "CONFIG_KTSTR_NO_SUCH_OPTION=y\n"], &make, &log).unwrap_err();
    let dropped = e.downcast_ref::<DroppedOptions>().unwrap_or_else(|| panic!("{e:#}"));
    assert_eq!(dropped.0.len(), 1, "{dropped}");
    assert_eq!(dropped.0[0].option, "CONFIG_KTSTR_NO_SUCH_OPTION");
}
