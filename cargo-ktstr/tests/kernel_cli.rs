//! `cargo ktstr kernel …` through the real binary: bad specs, list, clean.
//! Fast; always run.

mod fixture;

use std::path::Path;
use std::process::{Command, Output};

use fixture::{built, entries, fake_tree, git, need_make, tagged_fake_repo};

fn ktstr(cache: &Path, args: &[&str]) -> Output {
    fixture::cargo_ktstr(cache).args(args).output().expect("run cargo-ktstr")
}


#[track_caller]
fn assert_fails_one_line(cache: &Path, args: &[&str], wants: &[&str]) {
    let out = ktstr(cache, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("ktstr: ")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: not one error line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for w in wants {
        assert!(lines[0].contains(w), "{args:?}: missing {w:?} in {err}");
    }
    assert!(entries(cache).is_empty(), "{args:?} left an entry: {:?}", entries(cache));
}

#[test]
fn bad_specs_give_one_line_and_no_entry() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path();
    let forms = "accepted forms";
    assert_fails_one_line(c, &["kernel", "build", ""], &["\"\"", "empty spec", forms]);
    assert_fails_one_line(c, &["kernel", "build", "6.."], &["\"6..\"", "FROM..TO", forms]);
    assert_fails_one_line(c, &["kernel", "build", "6.12..6.10"], &["\"6.12..6.10\"", "swap the endpoints", "6.10..6.12"]);
    assert_fails_one_line(c, &["kernel", "build", "git+https://example.com/linux.git"], &["git+https://example.com/linux.git", "#REF", forms]);
    assert_fails_one_line(c, &["kernel", "build", "ftp://example.com/linux-6.12.tar.xz"], &["ftp://", "unknown scheme", forms]);
    assert_fails_one_line(c, &["kernel", "build", "no-such-thing"], &["no-such-thing", forms]);
    // One bad spec among good ones fails before anything is fetched.
    assert_fails_one_line(c, &["kernel", "build", "6.12.9", "6.12..6.10"], &["swap the endpoints"]);
}

#[test]
fn unresolvable_inputs_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("cache");
    let key = format!("6.1.1-tarball-{}-kc{}", std::env::consts::ARCH, kernel_build::kconfig_hash());
    assert_fails_one_line(&c, &["kernel", "build", &key], &[&key, "has no entry"]);
    let junk = d.path().join("junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    assert_fails_one_line(&c, &["kernel", "build", junk.to_str().unwrap()], &["not a bootable kernel image"]);
    let missing = d.path().join("missing.tar.xz");
    assert_fails_one_line(&c, &["kernel", "build", missing.to_str().unwrap()], &["missing.tar.xz"]);
    // A file:// mirror that lists no 6.12 release.
    let mirror = d.path().join("mirror");
    std::fs::create_dir_all(mirror.join("v6.x")).unwrap();
    std::fs::write(mirror.join("v6.x/linux-6.11.3.tar.xz"), b"").unwrap();
    let m = format!("file://{}", mirror.display());
    assert_fails_one_line(&c, &["kernel", "build", "6.12", "--mirror", &m], &["lists no 6.12 release"]);
    // A corrupt tarball: one line, and no temp dir left behind either.
    let bad = d.path().join("linux-6.12.tar.xz");
    std::fs::write(&bad, b"\xfd7zXZ\0garbage").unwrap();
    assert_fails_one_line(&c, &["kernel", "build", bad.to_str().unwrap()], &["corrupt or truncated archive"]);
    let leftovers: Vec<_> = std::fs::read_dir(&c).unwrap().flatten().map(|e| e.file_name()).filter(|n| n.to_string_lossy().starts_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn list_and_clean() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path();
    let out = ktstr(c, &["kernel", "list", "--json"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    // Two fake entries made by the library's own store format.
    for (key, t) in [("6.12.1-tarball-x86_64-kc00000000", 100), ("6.12.2-tarball-x86_64-kc00000000", 200)] {
        let e = c.join(key);
        std::fs::create_dir_all(&e).unwrap();
        std::fs::write(e.join(kernel_build::tree::image_name()), b"img").unwrap();
        let meta = serde_json::json!({
            "key": key, "spec": "s", "source": "/src.tar.xz", "version": key.split('-').next().unwrap(),
            "arch": "x86_64", "kconfig_hash": "00000000", "base": "tinyconfig", "build_time": t,
            "build_duration_secs": 1.0, "image_size": 3
        });
        std::fs::write(e.join("metadata.json"), meta.to_string()).unwrap();
    }
    let out = ktstr(c, &["kernel", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("KEY"), "{text}");
    assert!(lines[1].starts_with("6.12.2-tarball"), "newest first: {text}");
    let out = ktstr(c, &["kernel", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["version"], "6.12.2");

    // A held lock keeps an entry; --keep 0 removes the rest.
    let held = kernel_build::cache::lock_entry_shared(&c.join("6.12.1-tarball-x86_64-kc00000000")).unwrap();
    let out = ktstr(c, &["kernel", "clean", "--keep", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lock is held"));
    assert_eq!(entries(c), ["6.12.1-tarball-x86_64-kc00000000"]);
    drop(held);
    let out = ktstr(c, &["kernel", "clean", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "error: no such cache entry: nope");
    let out = ktstr(c, &["kernel", "clean", "6.12.1-tarball-x86_64-kc00000000"]);
    assert!(out.status.success());
    assert!(entries(c).is_empty());
}

/// `kill -9` in the middle of extraction leaves no entry, and the next run
/// removes the leftover temp dir. Needs the Debian tarball; a few seconds.
#[test]
fn kill_9_leaves_no_entry_and_next_run_cleans() {
    let tarball = "/usr/src/linux-source-6.12.tar.xz";
    if !ktstr_runtime::testing::premise(Path::new(tarball).is_file(), tarball, "apt-get install linux-source-6.12") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let c = d.path();
    let mut child = fixture::cargo_ktstr(c)
        .args(["kernel", "build", tarball])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tmp_dirs = || -> Vec<String> {
        std::fs::read_dir(c)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".tmp-")).collect())
            .unwrap_or_default()
    };
    let t = std::time::Instant::now();
    // Wait until extraction has written some files.
    while t.elapsed().as_secs() < 60 {
        if tmp_dirs().iter().any(|n| c.join(n).join("src").is_dir()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!tmp_dirs().is_empty(), "the killed run left its temp dir (as expected)");
    assert!(entries(c).is_empty(), "no entry after kill -9");
    let out = ktstr(c, &["kernel", "list"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("removing leftover build dir"));
    assert!(tmp_dirs().is_empty(), "leftover temp dir was cleaned: {:?}", tmp_dirs());
}

/// A file that starts like an x86 bzImage (boot protocol "HdrS" at 0x202).
fn fake_bzimage(path: &Path) {
    let mut img = vec![0u8; 4096];
    img[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(path, img).unwrap();
}

/// Path specs naming an image, or a directory holding one, are used as is
/// (no build, no cache entry) and get `path_{basename}_{hash6}` labels.
#[test]
fn image_paths_are_used_as_is() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let kdir = d.path().join("mykernel");
    std::fs::create_dir(&kdir).unwrap();
    let img = kdir.join("bzImage");
    fake_bzimage(&img);
    let hash6 = |p: &Path| format!("{:08x}", crc32fast_hash(p.canonicalize().unwrap().as_os_str().as_encoded_bytes()))[..6].to_string();

    let out = ktstr(&cache, &["kernel", "build", img.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let canon = img.canonicalize().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("path_bzImage_{}={}", hash6(&img), canon.display()));

    let out = ktstr(&cache, &["kernel", "build", kdir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("path_mykernel_{}={}", hash6(&kdir), canon.display()));
    assert!(entries(&cache).is_empty());

    let empty = d.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_fails_one_line(&cache, &["kernel", "build", empty.to_str().unwrap()], &["neither a kernel source tree"]);
}

fn crc32fast_hash(b: &[u8]) -> u32 {
    // Same CRC32 (IEEE) the label uses; computed here bit by bit to stay independent.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// `start`/`end` lines of the fake tree's record, checked for overlap.
fn steps(record: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    let lines: Vec<String> = text.lines().map(str::to_string).collect();
    for pair in lines.chunks(2) {
        let [a, b] = pair else { panic!("unfinished step in {lines:?}") };
        assert!(a.ends_with(" start") && b.ends_with(" end") && a.split(' ').next() == b.split(' ').next(), "steps overlap: {lines:?}");
    }
    lines
}

/// A temp dir holding a stand-in dirty tree `linux/` whose make steps log
/// to `record`; `None` (after the premise report) without `make`.
fn dirty_tree() -> Option<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
    if !need_make() {
        return None;
    }
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("linux");
    let record = d.path().join("record");
    fake_tree(&tree, &record);
    Some((d, tree, record))
}

/// Two runs building one dirty tree take turns on the tree's lock: no
/// configure or make step of one overlaps the other's, the second says
/// it waits, and both end with the tree's image (never cached).
#[test]
fn in_place_builds_of_one_tree_take_turns() {
    let Some((d, tree, record)) = dirty_tree() else { return };
    let cache = d.path().join("cache");
    let spawn = || {
        fixture::cargo_ktstr(&cache)
            .args(["kernel", "build"])
            .arg(&tree)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn();
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(&record).unwrap_or_default().contains("start") {
        assert!(t.elapsed().as_secs() < 30, "the first build never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let b = spawn();
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let lines = steps(&record);
    assert_eq!(lines.iter().filter(|l| *l == "build start").count(), 2, "each run builds: {lines:?}");
    let waits: Vec<usize> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).lines().filter(|l| l.contains("waiting for another in-place build")).count())
        .collect();
    assert_eq!(waits, [0, 1], "the second run says once that it waits");
    let image = tree.join("arch/x86/boot/bzImage").canonicalize().unwrap();
    for o in &outs {
        assert!(String::from_utf8_lossy(&o.stdout).trim_end().ends_with(&format!("_dirty={}", image.display())));
    }
    assert!(entries(&cache).is_empty(), "a dirty tree is never cached");
}

/// `--kernel ../linux --kernel $PWD/../linux` is one tree: resolved (and
/// built) once, and the run is single-kernel.
#[test]
fn one_tree_named_twice_builds_once() {
    let Some((d, tree, record)) = dirty_tree() else { return };
    let work = d.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let abs = work.join("../linux");
    let out = fixture::cargo_ktstr(&d.path().join("cache"))
        .args(["test", "--print-env", "--kernel", "../linux", "--kernel"])
        .arg(&abs)
        .current_dir(&work)
        .env("KTSTR_KERNEL_PARALLELISM", "2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = steps(&record);
    assert_eq!(lines.iter().filter(|l| *l == "build start").count(), 1, "one build: {lines:?}");
    let image = tree.join("arch/x86/boot/bzImage").canonicalize().unwrap();
    assert!(stdout.lines().any(|l| l == format!("KTSTR_KERNEL={}", image.display())), "{stdout}");
    assert!(!stdout.contains("KTSTR_KERNEL_LIST"), "single-kernel mode: {stdout}");
}

/// Tests leave the user's kernel cache alone: every spawn of cargo-ktstr
/// in this crate's tests and benches goes through `fixture::cargo_ktstr`,
/// which sets `KTSTR_CACHE_DIR` (and refuses the user's cache).
#[test]
fn every_cargo_ktstr_spawn_goes_through_the_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let needle = concat!("CARGO_BIN_EXE_", "cargo-ktstr");
    let mut offenders = Vec::new();
    let mut seen = 0;
    let mut stack = vec![root.join("tests"), root.join("benches")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                seen += 1;
                let text = std::fs::read_to_string(&p).unwrap();
                if text.contains(needle) && !p.ends_with("tests/fixture/mod.rs") {
                    offenders.push(p.display().to_string());
                }
            }
        }
    }
    assert!(seen >= 5, "scanned only {seen} files under {}", root.display());
    assert!(offenders.is_empty(), "spawn cargo-ktstr with fixture::cargo_ktstr(cache) instead: {offenders:?}");
    let fixture = std::fs::read_to_string(root.join("tests/fixture/mod.rs")).unwrap();
    assert_eq!(fixture.matches(needle).count(), 1, "one spawn site, the one that sets KTSTR_CACHE_DIR");
}

/// Git tags and branches, clean and dirty trees, on a stand-in kernel tree
/// in a real git repo (the real-kernel check of this path is the slow
/// `git_tag_builds_a_real_kernel`): a tag builds under `{tag}-git-{commit7}`
/// and hits after; a moved branch misses; a clean tree is cached under
/// `local-{commit7}` and hits without building; a dirty tree is built in
/// place and never cached.
#[test]
fn git_refs_and_clean_or_dirty_trees() {
    if !need_make() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (repo, record, cache) = tagged_fake_repo(d.path());
    let c1 = git(&repo, &["rev-parse", "HEAD"]);
    let url = format!("git+file://{}", repo.display());
    let builds = || steps(&record).iter().filter(|l| *l == "build start").count();

    let (label, image, key) = built(&ktstr(&cache, &["kernel", "build", &format!("{url}#v6.12")]));
    let owner = d.path().file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(label, format!("git_{owner}_linux_v6.12"));
    assert!(key.starts_with(&format!("v6.12-git-{}-", &c1[..7])), "{key}");
    assert_eq!(image.parent().unwrap().parent().unwrap(), cache.canonicalize().unwrap());
    assert_eq!(builds(), 1);
    let out = ktstr(&cache, &["kernel", "build", &format!("{url}#v6.12")]);
    assert_eq!(built(&out).2, key);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "a hit is quiet");
    assert_eq!(builds(), 1, "a hit builds nothing");

    let (_, _, main1) = built(&ktstr(&cache, &["kernel", "build", &format!("{url}#main")]));
    assert!(main1.starts_with(&format!("main-git-{}-", &c1[..7])), "{main1}");
    std::fs::write(repo.join("marker"), "moved\n").unwrap();
    git(&repo, &["add", "marker"]);
    git(&repo, &["commit", "-q", "-m", "move main"]);
    let c2 = git(&repo, &["rev-parse", "HEAD"]);
    let (_, _, main2) = built(&ktstr(&cache, &["kernel", "build", &format!("{url}#main")]));
    assert!(main2.starts_with(&format!("main-git-{}-", &c2[..7])), "a moved branch misses the cache: {main1} {main2}");
    assert_eq!(builds(), 3);

    // The repo as a path: clean → built in place once, cached under local-{commit7}.
    let (label, _, local) = built(&ktstr(&cache, &["kernel", "build", repo.to_str().unwrap()]));
    assert!(label.starts_with("path_linux_") && !label.ends_with("_dirty"), "{label}");
    assert!(local.starts_with(&format!("local-{}-", &c2[..7])), "{local}");
    assert_eq!(builds(), 4);
    let out = ktstr(&cache, &["kernel", "build", repo.to_str().unwrap()]);
    assert_eq!(built(&out).2, local);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "a hit is quiet");
    assert_eq!(builds(), 4, "a clean tree already cached is not rebuilt");

    // Dirty: built in place every time, never cached.
    let before = entries(&cache).len();
    std::fs::write(repo.join("README"), "dirty\n").unwrap();
    let out = ktstr(&cache, &["kernel", "build", repo.to_str().unwrap()]);
    let (label, image, _) = built(&out);
    assert!(label.ends_with("_dirty"), "{label}");
    assert_eq!(image, repo.canonicalize().unwrap().join("arch/x86/boot/bzImage"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not caching"));
    assert_eq!(builds(), 5);
    assert_eq!(entries(&cache).len(), before, "a dirty tree adds no entry");
}

/// The slow real-kernel git test imports the Debian tarball into a bare
/// repo once and reuses it: made on first use, reused as is (not re-made)
/// while the tarball is unchanged, replaced when it changes; and
/// cargo-ktstr builds its tag.
#[test]
fn tarball_git_repo_is_made_once_and_reused() {
    if !need_make() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let record = d.path().join("record");
    fake_tree(&d.path().join("linux-x"), &record);
    let tarball = d.path().join("linux-x.tar.xz");
    let st = Command::new("tar").arg("-cJf").arg(&tarball).arg("-C").arg(d.path()).arg("linux-x").status().unwrap();
    assert!(st.success());
    let root = d.path().join("test-git");
    let repo = fixture::tarball_git_repo(&tarball, "v6.12", &root);
    let commit = git(&repo, &["rev-parse", "v6.12^{commit}"]);
    assert!(git(&repo, &["ls-tree", "--name-only", "v6.12"]).lines().any(|l| l == "Makefile"), "the tree's files are at the top");
    std::fs::write(repo.join("ktstr-reuse-marker"), "").unwrap();
    assert_eq!(fixture::tarball_git_repo(&tarball, "v6.12", &root), repo);
    assert!(repo.join("ktstr-reuse-marker").is_file(), "reused, not made again");
    let leftovers: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temp dirs left: {leftovers:?}");

    let cache = d.path().join("cache");
    let (label, _, key) = built(&ktstr(&cache, &["kernel", "build", &format!("git+file://{}#v6.12", repo.display())]));
    let stem = repo.file_stem().unwrap().to_string_lossy().into_owned();
    assert_eq!(label, format!("git_test-git_{stem}_v6.12"));
    assert!(key.starts_with(&format!("v6.12-git-{}-", &commit[..7])), "{key}");

    // A new tarball (here: a new mtime) makes a new repo and drops the old one.
    let f = std::fs::File::options().write(true).open(&tarball).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5)).unwrap();
    let repo2 = fixture::tarball_git_repo(&tarball, "v6.12", &root);
    assert_ne!(repo2, repo);
    assert!(!repo.exists());
    assert_eq!(git(&repo2, &["rev-parse", "v6.12^{commit}"]), commit, "same tree, same commit");
}

/// The `ktstr: [label] phase: …` lines of a run's stderr, as phase names.
fn phases(stderr: &str, label: &str) -> Vec<String> {
    let prefix = format!("ktstr: [{label}] ");
    stderr.lines().filter_map(|l| l.strip_prefix(&prefix)).map(|r| r.split([':', ' ']).next().unwrap().to_string()).collect()
}

/// Progress to a pipe: on a miss one plain line per phase (fetch,
/// configure, build) and the closing `cached` line, no carriage returns
/// or escape codes; nothing on a hit (`kernel build` and `test`); nothing
/// with `-q`; an ETA once a previous build of the key is known, also after
/// `kernel clean` removed the entry (the timing record outlives it).
#[test]
fn progress_lines_on_a_miss_none_on_a_hit_or_with_quiet() {
    if !need_make() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (repo, record, cache) = tagged_fake_repo(d.path());
    let spec = format!("git+file://{}#v6.12", repo.display());
    let builds = || steps(&record).iter().filter(|l| *l == "build start").count();
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Miss: fetch, configure, build, one line each, then `cached`; no ETA yet.
    let out = ktstr(&cache, &["kernel", "build", &spec]);
    let (label, _, key) = built(&out);
    let e = err(&out);
    assert_eq!(phases(&e, &label), ["fetch", "configure", "build"], "{e}");
    assert!(!e.contains('\r') && !e.contains('\x1b'), "plain output has no CR or escape codes: {e:?}");
    for l in e.lines().filter(|l| l.starts_with(&format!("ktstr: [{label}] "))) {
        assert!(l.ends_with(" elapsed)"), "no previous build, no ETA: {l}");
    }
    assert!(e.contains(&format!("ktstr: [{label}] fetch: file://")) && e.contains(&key), "fetch names source and key: {e}");
    assert!(e.contains(&format!("ktstr: [{label}] configure: tinyconfig + ktstr.kconfig; log: ")), "{e}");
    assert!(e.contains(&format!("ktstr: [{label}] build: make -j")) && e.contains(" bzImage"), "{e}");
    assert!(e.lines().any(|l| l.starts_with(&format!("ktstr: cached {key} in "))), "{e}");
    assert_eq!(builds(), 1);

    // Hit: nothing at all, from `kernel build` and from `test`.
    let out = ktstr(&cache, &["kernel", "build", &spec]);
    assert_eq!(built(&out).2, key);
    assert_eq!(err(&out), "", "a hit is quiet");
    let out = ktstr(&cache, &["test", "--kernel", &spec, "--print-env"]);
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(err(&out), "", "a hit is quiet under `test` too");
    assert_eq!(builds(), 1);

    // A miss with -q (the entry cleaned): it builds, and prints nothing.
    let clean = ktstr(&cache, &["kernel", "clean", &key]);
    assert!(clean.status.success(), "{}", err(&clean));
    let out = ktstr(&cache, &["test", "-q", "--kernel", &spec, "--print-env"]);
    assert!(out.status.success(), "{}", err(&out));
    assert_eq!(builds(), 2, "-q still builds");
    assert_eq!(err(&out), "", "-q hides the progress");

    // Cleaned again: the timing record survives, so every phase line has an ETA.
    let clean = ktstr(&cache, &["kernel", "clean", &key]);
    assert!(clean.status.success(), "{}", err(&clean));
    let out = ktstr(&cache, &["kernel", "build", &spec]);
    built(&out);
    let e = err(&out);
    assert_eq!(phases(&e, &label), ["fetch", "configure", "build"], "{e}");
    for l in e.lines().filter(|l| l.starts_with(&format!("ktstr: [{label}] "))) {
        assert!(l.contains(" elapsed, ETA ") || l.contains(" elapsed, over the previous build's "), "ETA from the previous build: {l}");
    }
    assert_eq!(builds(), 3);

    // A moved branch is a new key and a new source: its ETA comes from the
    // last build under the same label.
    let main = format!("git+file://{}#main", repo.display());
    let has_eta = |e: &str, label: &str| {
        let lines: Vec<&str> = e.lines().filter(|l| l.starts_with(&format!("ktstr: [{label}] "))).collect();
        assert_eq!(lines.len(), 3, "{e}");
        lines.iter().all(|l| l.contains(" elapsed, ETA ") || l.contains(" elapsed, over the previous build's "))
    };
    let move_main = |text: &str| {
        std::fs::write(repo.join("marker"), text).unwrap();
        git(&repo, &["add", "marker"]);
        git(&repo, &["commit", "-q", "-m", "move main"]);
    };
    // Moved first: at the tag's commit it would share the tag's source (and its ETA).
    move_main("one\n");
    let out = ktstr(&cache, &["kernel", "build", &main]);
    let (main_label, _, _) = built(&out);
    assert!(!has_eta(&err(&out), &main_label), "first build of this label and source: no ETA: {}", err(&out));
    move_main("two\n");
    let out = ktstr(&cache, &["kernel", "build", &main]);
    built(&out);
    assert!(has_eta(&err(&out), &main_label), "ETA from the label's last build: {}", err(&out));
    assert_eq!(builds(), 5);
}
