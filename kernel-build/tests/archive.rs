//! Tarball extraction against small synthetic archives: good, truncated,
//! corrupt and escaping members. Fast; always run.

use std::io::Write;
use std::path::Path;

use kernel_build::fetch;
use kernel_build::spec::TarballSource;

const MAKEFILE: &str = "# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 3\nEXTRAVERSION =\nNAME = t\n";

/// Pseudo-random bytes: incompressible, so truncating the archive cuts data.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn header(path: &[u8], size: usize) -> tar::Header {
    let mut h = tar::Header::new_old();
    // Raw name bytes: tar::Builder refuses `..` and absolute paths itself.
    h.as_old_mut().name[..path.len()].copy_from_slice(path);
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

fn tar_bytes(extra: &[(&[u8], Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let files: Vec<(&[u8], Vec<u8>)> = vec![
        (b"linux-6.12.3/Makefile", MAKEFILE.as_bytes().to_vec()),
        (b"linux-6.12.3/Kconfig", b"mainmenu \"t\"\n".to_vec()),
        (b"linux-6.12.3/kernel/blob.bin", noise(512 << 10)),
    ];
    for (p, data) in files.iter().chain(extra.iter()) {
        b.append(&header(p, data.len()), data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> TarballSource {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    TarballSource::Local(p)
}

fn assert_one_line_failure(src: &TarballSource, dest: &Path, want: &str) {
    let e = fetch::extract(src, dest).expect_err("extraction must fail");
    let msg = format!("{e:#}");
    assert!(msg.contains(want), "{msg}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    assert!(!dest.exists(), "left {} behind", dest.display());
}

#[test]
fn good_archives_extract_and_report_version() {
    let d = tempfile::tempdir().unwrap();
    let raw = tar_bytes(&[]);
    for (name, bytes) in [("k.tar.xz", xz(&raw)), ("k.tar.gz", gz(&raw))] {
        let src = write(d.path(), name, &bytes);
        assert_eq!(fetch::tarball_version(&src).unwrap().as_deref(), Some("6.12.3"));
        let dest = d.path().join(format!("out-{name}"));
        let root = fetch::extract(&src, &dest).unwrap();
        assert_eq!(root, dest.join("linux-6.12.3"));
        assert_eq!(std::fs::read(root.join("kernel/blob.bin")).unwrap().len(), 512 << 10);
    }
}

#[test]
fn truncated_archives_fail_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let raw = tar_bytes(&[]);
    for (name, bytes) in [("t.tar.xz", xz(&raw)), ("t.tar.gz", gz(&raw))] {
        for cut in [bytes.len() / 2, bytes.len() - 20] {
            let src = write(d.path(), name, &bytes[..cut]);
            assert_one_line_failure(&src, &d.path().join("out"), "corrupt or truncated archive");
        }
    }
}

#[test]
fn corrupt_archives_fail_and_leave_nothing() {
    let d = tempfile::tempdir().unwrap();
    let raw = tar_bytes(&[]);
    for (name, mut bytes) in [("c.tar.xz", xz(&raw)), ("c.tar.gz", gz(&raw))] {
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 64] {
            *b ^= 0x5a;
        }
        let src = write(d.path(), name, &bytes);
        assert_one_line_failure(&src, &d.path().join("out"), "corrupt or truncated archive");
    }
    let src = write(d.path(), "plain.tar.xz", &raw);
    assert_one_line_failure(&src, &d.path().join("out"), "neither xz nor gzip");
    let src = write(d.path(), "empty.tar.xz", b"");
    assert_one_line_failure(&src, &d.path().join("out"), "empty");
}

#[test]
fn escaping_members_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("evil");
    for member in [&b"../evil"[..], b"linux-6.12.3/../../evil"] {
        let raw = tar_bytes(&[(member, b"pwned".to_vec())]);
        let src = write(d.path(), "e.tar.xz", &xz(&raw));
        let dest = d.path().join("sub/out");
        std::fs::create_dir_all(d.path().join("sub")).unwrap();
        assert_one_line_failure(&src, &dest, "outside the extraction directory");
        assert!(!victim.exists() && !d.path().join("sub/evil").exists());
    }
    let abs = d.path().join("abs-evil");
    let raw = tar_bytes(&[(abs.to_str().unwrap().as_bytes(), b"pwned".to_vec())]);
    let src = write(d.path(), "a.tar.gz", &gz(&raw));
    assert_one_line_failure(&src, &d.path().join("out"), "outside the extraction directory");
    assert!(!abs.exists());
}

#[test]
fn archive_without_kernel_tree_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header(b"a/readme", 2), &b"hi"[..]).unwrap();
    let src = write(d.path(), "n.tar.xz", &xz(&b.into_inner().unwrap()));
    assert_one_line_failure(&src, &d.path().join("out"), "no kernel source tree");
}
