//! VM snapshots (`ktstr_runtime::snapshot`) on a real kernel: each test
//! gets its own restored VM (files do not carry over, random bytes
//! differ, the clock is the host's), a corrupt save falls back to a cold
//! boot, and a changed memory size makes a new save.
//!
//! The `snap_*` bodies run as ordinary VM tests too (cold or restored, as
//! `KTSTR_SNAPSHOT` says); the plain `#[test]`s drive them with snapshots
//! on, in a private snapshot directory, and check what crossed over.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ktstr_runtime::host::{self, KernelChoice, Run};
use ktstr_runtime::prelude::*;
use ktstr_runtime::registry::{self, TestDef};
use ktstr_runtime::snapshot::{Options, StartKind};
use ktstr_runtime::verdict::Outcome;

/// Written by one test, so the next can check it is gone: one in a
/// tmpfs the ready init mounted, one in the initramfs root.
const MARKS: [&str; 2] = ["/tmp/ktstr-snapshot-mark", "/ktstr-snapshot-mark"];

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 20, gauntlet = false)]
fn snap_leaves_a_file(_ctx: &Ctx) -> Result<()> {
    for m in MARKS {
        // Present before we wrote it: a previous test's file reached this VM.
        ensure!(
            !Path::new(m).exists(),
            "{m} exists before this test wrote it"
        );
        std::fs::write(m, b"left behind")?;
    }
    Ok(())
}

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 20, gauntlet = false)]
fn snap_file_is_absent(_ctx: &Ctx) -> Result<()> {
    for m in MARKS {
        ensure!(
            !Path::new(m).exists(),
            "{m} from another test is visible here"
        );
    }
    Ok(())
}

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 20, gauntlet = false)]
fn snap_prints_random_bytes(_ctx: &Ctx) -> Result<()> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    println!(
        "urandom={}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    );
    Ok(())
}

#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 20, gauntlet = false)]
fn snap_prints_clock(_ctx: &Ctx) -> Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
    println!("realtime_ns={}", now.as_nanos());
    Ok(())
}

/// What this run's topology says and what the guest really has online.
#[ktstr_test(cpus = 1, memory_mib = 256, timeout_s = 20, gauntlet = false)]
fn snap_prints_cpus(ctx: &Ctx) -> Result<()> {
    println!("topology_cpus={}", ctx.topology().total_cpus());
    println!("online_cpus={}", std::thread::available_parallelism()?.get());
    println!("cpus_override={:?}", ctx.cpus_override());
    Ok(())
}

#[ktstr_test(
    cpus = 1,
    memory_mib = 256,
    timeout_s = 20,
    gauntlet = false,
    cold_boot
)]
fn snap_opts_out(_ctx: &Ctx) -> Result<()> {
    Ok(())
}

/// A kernel to boot (either backend saves VMs), or a skip that says how
/// to get one. A named kernel that is unusable fails.
fn kernel() -> Option<()> {
    use ktstr_runtime::discovery::DiscoveryError;
    let found = match ktstr_runtime::discovery::discover() {
        Ok(f) => Some(f),
        Err(DiscoveryError::NotFound { .. }) => None,
        Err(DiscoveryError::Bad(m)) => panic!("{m}"),
    };
    ktstr_runtime::testing::require(
        found,
        "a kernel to boot",
        "set KTSTR_TEST_KERNEL to a bzImage, or run under `cargo ktstr test --kernel ...`",
    )
    .map(drop)
}

/// Setup for a test that drives snapshots: a kernel, and a private store.
fn setup() -> Option<(tempfile::TempDir, Options)> {
    kernel()?;
    Some(private_store())
}

/// `r` booted cold after snapshots were tried, for a reason naming `why`.
fn assert_fallback(r: &Run, why: &str) {
    match &r.start {
        StartKind::Fallback { reason } => assert!(reason.contains(why), "{reason}"),
        other => panic!("a save was used where it must not be ({why}): {other:?}"),
    }
}

fn def(name: &str) -> &'static TestDef {
    registry::find(name).unwrap_or_else(|| panic!("no test {name} in this binary"))
}

fn run(d: &'static TestDef, opts: &Options) -> Run {
    let r = host::run_vm_with(d, &KernelChoice::Discover, Some(opts));
    assert_eq!(
        r.verdict.outcome,
        Outcome::Pass,
        "{}: {} {}",
        d.name,
        r.verdict.message,
        r.verdict.details
    );
    r
}

fn stdout(r: &Run) -> String {
    r.output
        .iter()
        .map(|c| String::from_utf8_lossy(&c.bytes).into_owned())
        .collect()
}

fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in the body's output: {out}"))
}

fn private_store() -> (tempfile::TempDir, Options) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        root: dir.path().join("snapshots"),
        explicit: true,
    };
    (dir, opts)
}

fn saves(opts: &Options) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(&opts.root)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.is_dir() && !p.file_name().unwrap().to_string_lossy().starts_with('.')
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn restored_tests_do_not_see_each_others_files() {
    let Some((_dir, opts)) = setup() else { return };
    assert_eq!(
        run(def("snap_leaves_a_file"), &opts).start,
        StartKind::Restored { created: true }
    );
    // The same test again: its own marks must be gone (it fails otherwise).
    assert_eq!(
        run(def("snap_leaves_a_file"), &opts).start,
        StartKind::Restored { created: false }
    );
    assert_eq!(
        run(def("snap_file_is_absent"), &opts).start,
        StartKind::Restored { created: false }
    );
    assert_eq!(
        saves(&opts).len(),
        1,
        "one save for one kernel, topology and memory size"
    );
}

#[test]
fn restored_tests_draw_different_random_bytes() {
    let Some((_dir, opts)) = setup() else { return };
    let d = def("snap_prints_random_bytes");
    let runs: Vec<Run> = (0..3).map(|_| run(d, &opts)).collect();
    let starts: Vec<&StartKind> = runs.iter().map(|r| &r.start).collect();
    assert_eq!(
        starts,
        [
            &StartKind::Restored { created: true },
            &StartKind::Restored { created: false },
            &StartKind::Restored { created: false }
        ]
    );
    let bytes: Vec<String> = runs
        .iter()
        .map(|r| value(&stdout(r), "urandom=").to_string())
        .collect();
    assert!(bytes.iter().all(|b| b.len() == 64), "{bytes:?}");
    // The two that restored the same save (without writing it) matter most.
    assert_ne!(
        bytes[1], bytes[2],
        "two restores drew the same random bytes"
    );
    assert_ne!(bytes[0], bytes[1]);
}

#[test]
fn restored_clock_is_the_hosts() {
    let Some((_dir, opts)) = setup() else { return };
    let d = def("snap_prints_clock");
    run(d, &opts);
    // Let the save age: a guest clock left at the save's time would now be far behind.
    std::thread::sleep(Duration::from_secs(6));
    let r = run(d, &opts);
    let end = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(r.start, StartKind::Restored { created: false });
    let guest = Duration::from_nanos(
        value(&stdout(&r), "realtime_ns=")
            .trim()
            .parse::<u64>()
            .unwrap(),
    );
    let t = &r.vm.as_ref().unwrap().timings;
    let to_body = t.to_body.expect("the body start was seen");
    // Host time as the body started: the run's end less what followed it.
    let host_at_body = end - (t.total - t.setup - to_body);
    let skew = guest.abs_diff(host_at_body);
    assert!(
        skew < Duration::from_secs(2),
        "guest CLOCK_REALTIME is {skew:?} off the host's"
    );
}

#[test]
fn corrupt_or_unloadable_save_falls_back_to_a_cold_boot() {
    let Some((_dir, opts)) = setup() else { return };
    let d = def("snap_file_is_absent");
    run(d, &opts);
    let save = saves(&opts).pop().expect("a save");
    // One byte of saved guest RAM changed: the checksum catches it.
    let ram = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(save.join("ram0"))
        .unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&ram, &mut b, 1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&ram, &[b[0] ^ 0xff], 1 << 20).unwrap();
    let r = run(d, &opts);
    assert_fallback(&r, "corrupt");
    assert!(
        r.vm.as_ref().unwrap().timings.snapshot.is_none(),
        "cold boot"
    );
    // The next test writes the save again.
    assert_eq!(run(d, &opts).start, StartKind::Restored { created: true });
    // A state the backend cannot load, with a matching checksum: the restore fails.
    let save = saves(&opts).pop().unwrap();
    std::fs::write(save.join("state"), b"QEVM not really a migration stream").unwrap();
    ktstr_runtime::snapshot::reseal(&save).unwrap();
    let r = run(d, &opts);
    assert_fallback(&r, "restoring");
    assert!(
        saves(&opts).is_empty(),
        "a save that failed to restore is removed"
    );
}

#[test]
fn a_failed_payload_keeps_the_save() {
    let Some((_dir, opts)) = setup() else { return };
    let d = def("snap_file_is_absent");
    assert_eq!(run(d, &opts).start, StartKind::Restored { created: true });
    let before = saves(&opts);
    // This test's payload cannot be sent (its archive is gone): its own
    // failure, not the save's.
    let image = ktstr_runtime::discovery::discover().unwrap().image;
    let missing = Path::new("/nonexistent/ktstr-payload.cpio");
    let err = ktstr_runtime::snapshot::run(d, &image, missing, &opts).unwrap_err();
    assert!(err.contains("ktstr-payload.cpio"), "{err}");
    assert_eq!(saves(&opts), before, "a payload failure removed the save");
    assert_eq!(run(d, &opts).start, StartKind::Restored { created: false });
}

#[test]
fn a_killed_writers_temp_dir_is_removed() {
    let Some((_dir, opts)) = setup() else { return };
    // What a writer killed mid-save leaves: its temp dir, its lock free.
    let dead = opts.root.join(".tmp-deadbeef-1c1n-256m-00000000-XXXXXX");
    std::fs::create_dir_all(dead.join("entry")).unwrap();
    std::fs::write(dead.join(".lock"), b"").unwrap();
    assert_eq!(
        run(def("snap_file_is_absent"), &opts).start,
        StartKind::Restored { created: true }
    );
    assert!(!dead.exists(), "{} outlived its writer", dead.display());
    let temps: Vec<_> = std::fs::read_dir(&opts.root)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
        .map(|e| e.path())
        .collect();
    assert!(temps.is_empty(), "the writer left {temps:?}");
}

#[test]
fn changed_memory_size_makes_a_new_save() {
    let Some((_dir, opts)) = setup() else { return };
    let d = def("snap_file_is_absent");
    assert_eq!(run(d, &opts).start, StartKind::Restored { created: true });
    let bigger: &'static TestDef = Box::leak(Box::new(TestDef {
        memory_mib: 384,
        ..*d
    }));
    assert_eq!(
        run(bigger, &opts).start,
        StartKind::Restored { created: true }
    );
    let keys: Vec<String> = saves(&opts)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys.iter().any(|k| k.contains("-256m-")) && keys.iter().any(|k| k.contains("-384m-")),
        "{keys:?}"
    );
    assert_eq!(
        run(d, &opts).start,
        StartKind::Restored { created: false },
        "the first save still serves"
    );
}

#[test]
fn restored_test_is_resized_like_a_cold_one() {
    let Some((_dir, opts)) = setup() else { return };
    // What `KTSTR_CPUS=2` makes of the 1-vCPU test.
    let two = ktstr_runtime::cpu_override::apply(def("snap_prints_cpus"), Some(2)).unwrap();
    for created in [true, false] {
        let r = run(two, &opts);
        assert_eq!(r.start, StartKind::Restored { created });
        let out = stdout(&r);
        assert_eq!(value(&out, "topology_cpus=").trim(), "2", "{out}");
        assert_eq!(value(&out, "online_cpus=").trim(), "2", "{out}");
        assert_eq!(value(&out, "cpus_override=").trim(), "Some(2)", "{out}");
    }
}

#[test]
fn cold_boot_tests_never_restore() {
    let Some((_dir, opts)) = setup() else { return };
    let r = run(def("snap_opts_out"), &opts);
    assert_eq!(r.start, StartKind::Cold);
    assert!(saves(&opts).is_empty(), "no save made for a cold_boot test");
}
