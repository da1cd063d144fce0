//! The remote kernel cache against a real S3 server (moto on 127.0.0.1),
//! with "runners" that are separate cargo-ktstr processes with separate
//! local caches, building a stand-in kernel tree (its `make` logs every
//! step, so a build that did not happen is visible). Fast; always run;
//! without moto they fail under KTSTR_NO_SKIP_MODE=1.

mod fixture;
mod moto;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use fixture::{built, need_make, tagged_fake_repo, text};
use moto::Moto;

/// Where a runner test starts: a moto server with a fresh bucket, the
/// remote URL in it, and a stand-in kernel repo whose builds `record`
/// logs; `None` (after the premise report) without make or moto.
struct Setup {
    m: Moto,
    url: String,
    d: tempfile::TempDir,
    spec: String,
    record: PathBuf,
}

fn setup(bucket: &str) -> Option<Setup> {
    if !need_make() {
        return None;
    }
    let m = Moto::start()?;
    m.bucket(bucket);
    let d = tempfile::tempdir().unwrap();
    let (repo, record, _) = tagged_fake_repo(d.path());
    let spec = repo.to_str().unwrap().to_string();
    Some(Setup { m, url: format!("s3://{bucket}/ci/kernels"), d, spec, record })
}

/// `cargo ktstr ARGS` as one runner: its own local cache, the remote env.
fn runner(m: &Moto, url: &str, cache: &Path, args: &[&str]) -> Command {
    let mut c = fixture::cargo_ktstr(cache);
    m.apply(&mut c, url);
    c.args(args);
    c
}

fn run(m: &Moto, url: &str, cache: &Path, args: &[&str]) -> Output {
    runner(m, url, cache, args).output().expect("run cargo-ktstr")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", text(o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn builds(record: &Path) -> usize {
    std::fs::read_to_string(record).unwrap_or_default().lines().filter(|l| *l == "build start").count()
}

/// Acceptance: runner A builds and uploads; runner B (another cache, another
/// process) builds nothing, says it came from the remote, and gets the same
/// files; the remote lists the entry; a second B run is a plain local hit.
#[test]
fn second_runner_downloads_instead_of_building() {
    let Some(Setup { m, url, d, spec, record }) = setup("two-runners") else { return };
    let spec = spec.as_str();
    let (ca, cb) = (d.path().join("runner-a"), d.path().join("runner-b"));

    let a = run(&m, &url, &ca, &["kernel", "build", spec]);
    let (label, img_a, key) = built(&a);
    assert!(key.starts_with("local-"), "{key}");
    assert_eq!(builds(&record), 1);
    assert!(text(&a).contains(&format!("uploaded {key} to remote cache {url}")), "{}", text(&a));

    let list = ok(&run(&m, &url, &cb, &["kernel", "list", "--remote"]));
    assert!(list.lines().any(|l| l.starts_with(&key)), "{list}");

    let b = run(&m, &url, &cb, &["kernel", "build", spec]);
    let (label_b, img_b, _) = built(&b);
    assert_eq!(builds(&record), 1, "runner B must not build: {}", text(&b));
    assert!(text(&b).contains(&format!("kernel {key}: from remote cache {url}, no build")), "{}", text(&b));
    assert_eq!(label_b, label);
    assert!(img_b.starts_with(&cb), "B's image lives in B's cache: {}", img_b.display());
    for f in ["bzImage", ".config", "metadata.json"] {
        let (x, y) = (std::fs::read(img_a.with_file_name(f)).unwrap(), std::fs::read(img_b.with_file_name(f)).unwrap());
        assert!(x == y, "{f} differs between the runners");
    }
    // Only whole entries land locally: no temp dirs left in B's cache.
    assert_eq!(fixture::entries(&cb), std::slice::from_ref(&key));

    let again = run(&m, &url, &cb, &["kernel", "build", spec]);
    ok(&again);
    assert!(!text(&again).contains("remote cache"), "a local hit does not touch the remote: {}", text(&again));
    assert_eq!(builds(&record), 1);

    // `kernel pull` into a third cache, and `kernel push` of an entry that is already there.
    let cc = d.path().join("runner-c");
    let p = ok(&run(&m, &url, &cc, &["kernel", "pull", &key]));
    assert!(p.starts_with(&format!("pulled {key} from {url}")), "{p}");
    assert!(cc.join(&key).join("bzImage").is_file());
    let p = ok(&run(&m, &url, &ca, &["kernel", "push", &key]));
    assert!(p.contains("already has"), "{p}");
}

/// An upload killed after its objects and before its manifest leaves no
/// visible entry: not listed, not pullable, and the next runner builds.
#[test]
fn killed_upload_leaves_nothing_visible() {
    let Some(Setup { m, url, d, spec, record }) = setup("killed-upload") else { return };
    let spec = spec.as_str();
    let ca = d.path().join("runner-a");
    // A builds with no remote configured, then pushes by hand and is killed mid-push.
    let o = fixture::cargo_ktstr(&ca).args(["kernel", "build", spec]).output().unwrap();
    let key = built(&o).2;
    let mut push = runner(&m, &url, &ca, &["kernel", "push", &key])
        .env(kernel_build::remote::STALL_ENV, "60")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(push.stderr.take().unwrap()).lines();
    let stalled = lines.by_ref().map_while(Result::ok).any(|l| l.contains("objects uploaded, stalling"));
    assert!(stalled, "the push never reached its commit point");
    push.kill().unwrap(); // SIGKILL: no cleanup runs
    push.wait().unwrap();

    let remote = m.remote(&url);
    let objects = remote.objects(&key).unwrap();
    assert!(objects.iter().any(|o| o.ends_with("/bzImage")), "the objects were uploaded: {objects:?}");
    assert!(!objects.iter().any(|o| o.ends_with("manifest.json")), "{objects:?}");
    let list = ok(&run(&m, &url, &ca, &["kernel", "list", "--remote"]));
    assert!(!list.contains(&key), "{list}");
    let cb = d.path().join("runner-b");
    let p = run(&m, &url, &cb, &["kernel", "pull", &key]);
    assert!(!p.status.success() && text(&p).contains("has no entry"), "{}", text(&p));
    let b = run(&m, &url, &cb, &["kernel", "build", spec]);
    assert_eq!(built(&b).2, key);
    assert_eq!(builds(&record), 2, "B found nothing usable and built: {}", text(&b));
    assert!(text(&b).contains(&format!("uploaded {key}")), "{}", text(&b));
}

/// A tampered object is caught by its SHA-256: `pull` refuses it with one
/// line; a resolve warns on one line, builds, and replaces the entry, after
/// which the next runner downloads a good one.
#[test]
fn tampered_object_is_detected_and_rebuilt() {
    let Some(Setup { m, url, d, spec, record }) = setup("tampered") else { return };
    let spec = spec.as_str();
    let a = run(&m, &url, &d.path().join("runner-a"), &["kernel", "build", spec]);
    let key = built(&a).2;

    let remote = m.remote(&url);
    let manifest = remote.manifest(&key).unwrap().expect("committed");
    let img = manifest.files.iter().find(|f| f.name == "bzImage").unwrap();
    remote.put_raw(&key, &img.object, b"not the kernel that was built".to_vec()).unwrap();

    let cb = d.path().join("runner-b");
    let p = run(&m, &url, &cb, &["kernel", "pull", &key]);
    let t = text(&p);
    assert!(!p.status.success() && t.contains("corrupt") && t.contains("bzImage has SHA-256"), "{t}");
    assert_eq!(t.trim().lines().count(), 1, "one line: {t}");
    assert!(fixture::entries(&cb).is_empty(), "nothing stored from a bad download");

    let b = run(&m, &url, &cb, &["kernel", "build", spec]);
    let t = text(&b);
    let warnings: Vec<&str> = t.lines().filter(|l| l.contains("warning: ignoring remote cache entry")).collect();
    assert_eq!(warnings.len(), 1, "{t}");
    assert!(warnings[0].contains(&key) && warnings[0].contains("bzImage"), "{t}");
    assert_eq!(builds(&record), 2, "B rebuilt: {t}");
    assert!(t.contains(&format!("uploaded {key}")), "the corrupt entry is replaced: {t}");

    let c = run(&m, &url, &d.path().join("runner-c"), &["kernel", "build", spec]);
    assert!(text(&c).contains("from remote cache"), "{}", text(&c));
    assert_eq!(builds(&record), 2);
    // Only the replacing upload's objects remain.
    let uploads: std::collections::BTreeSet<String> =
        remote.objects(&key).unwrap().iter().filter_map(|o| o.split("/objects/").nth(1)?.split('/').next().map(String::from)).collect();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
}

/// Two runners building one key at once both succeed with the same
/// kernel; exactly one upload is committed and the other's objects are gone.
#[test]
fn two_builders_at_once_both_succeed_one_upload_wins() {
    let Some(Setup { m, url, d, spec, record }) = setup("race") else { return };
    let spec = spec.as_str();
    let kids: Vec<_> = ["runner-a", "runner-b"]
        .iter()
        .map(|r| runner(&m, &url, &d.path().join(r), &["kernel", "build", spec]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    let outs: Vec<Output> = kids.into_iter().map(|k| k.wait_with_output().unwrap()).collect();
    let keys: Vec<String> = outs.iter().map(|o| built(o).2).collect();
    assert_eq!(keys[0], keys[1]);
    let all = format!("{}{}", text(&outs[0]), text(&outs[1]));
    assert_eq!(all.lines().filter(|l| l.starts_with("ktstr: uploaded ")).count(), 1, "one upload wins: {all}");
    let built = builds(&record);
    match built {
        // Both built at once: the loser says the remote already had it.
        2 => assert!(all.contains("already has"), "{all}"),
        // One finished first: the other downloaded.
        1 => assert!(all.contains("from remote cache"), "{all}"),
        n => panic!("{n} builds: {all}"),
    }
    let remote = m.remote(&url);
    let objects = remote.objects(&keys[0]).unwrap();
    let uploads: std::collections::BTreeSet<&str> =
        objects.iter().filter_map(|o| o.split("/objects/").nth(1)?.split('/').next()).collect();
    assert_eq!(uploads.len(), 1, "the loser's objects are removed: {objects:?}");
    assert_eq!(remote.manifest(&keys[0]).unwrap().unwrap().upload, *uploads.iter().next().unwrap());
}

/// Misconfiguration fails on one line naming the fix; an unreachable
/// store is a one-line warning and the build goes on.
#[test]
fn bad_remote_settings_and_unreachable_store() {
    let d = tempfile::tempdir().unwrap();
    let o = fixture::cargo_ktstr(&d.path().join("c")).args(["kernel", "list", "--remote"]).output().unwrap();
    assert!(!o.status.success() && text(&o).contains("KTSTR_REMOTE_CACHE=s3://"), "{}", text(&o));
    let o = fixture::cargo_ktstr(&d.path().join("c"))
        .args(["kernel", "list", "--remote"])
        .env("KTSTR_REMOTE_CACHE", "gs://x/y")
        .output()
        .unwrap();
    assert!(!o.status.success() && text(&o).contains("not an s3:// URL"), "{}", text(&o));
    if !need_make() {
        return;
    }
    let (repo, record, _) = tagged_fake_repo(d.path());
    // Port 1 (tcpmux) has no listener; a freed ephemeral port could be a parallel test's moto.
    let o = fixture::cargo_ktstr(&d.path().join("c"))
        .args(["kernel", "build", repo.to_str().unwrap()])
        .env("KTSTR_REMOTE_CACHE", "s3://b/p")
        .env("KTSTR_REMOTE_ENDPOINT", "http://127.0.0.1:1")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(builds(&record), 1);
    assert_eq!(t.lines().filter(|l| l.contains("warning: remote cache s3://b/p unusable")).count(), 1, "{t}");
    assert_eq!(t.lines().filter(|l| l.contains("warning: uploading")).count(), 1, "{t}");
}
