//! `cargo ktstr archive`: one file holding nextest's test archive, the
//! resolved kernels (or references into the remote cache) and the
//! scheduler binaries; and its other half, `cargo ktstr test --archive`,
//! which runs (a partition of) it on a machine with no sources, no cargo
//! and no kernel build.
//!
//! The file is a zstd-compressed tar:
//! - `ktstr-archive.json`: [`Manifest`];
//! - `nextest-archive.tar.zst`: `cargo nextest archive`'s own archive;
//! - `kernels/{n}/`: the files of the n-th kernel (cache entry files, or
//!   the image of a path kernel), absent for a remote reference;
//! - `schedulers/`: every executable of the scheduler directories;
//! - `workspace/`: the workspace's `Cargo.toml` files and
//!   `.config/nextest.toml`, which nextest reads (no sources).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::test_cmd::{self, Handoff};

const MANIFEST: &str = "ktstr-archive.json";
const NEXTEST_ARCHIVE: &str = "nextest-archive.tar.zst";
const SCHEDULERS: &str = "schedulers";
const SCHEMA: u32 = 1;
/// The stand-in workspace root: its manifests only.
const WORKSPACE: &str = "workspace";

const EXAMPLES: &str = "\
Examples:
  cargo ktstr archive --kernel 6.12 --kernel 6.13 -o suite.tar.zst
  KTSTR_REMOTE_CACHE=s3://ci/ktstr cargo ktstr archive --kernel 6.12 --remote-kernels -o suite.tar.zst
  # on each runner (no sources, no cargo, no kernel build):
  cargo-ktstr ktstr test --archive suite.tar.zst --partition count:2/4

Everything after `--` goes to `cargo nextest archive`.
Scheduler binaries: every executable in --scheduler-dir, else in KTSTR_SCHEDULER_DIR.";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct ArchiveArgs {
    /// Kernel the suite runs against (repeatable): any `cargo ktstr test --kernel` spec.
    #[arg(long = "kernel", value_name = "SPEC")]
    pub kernels: Vec<String>,
    /// Output file.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Build the test binaries in release mode.
    #[arg(long)]
    pub release: bool,
    /// Package(s) whose tests to archive (repeatable).
    #[arg(short = 'p', long = "package", value_name = "PKG")]
    pub packages: Vec<String>,
    /// Directory of scheduler binaries to carry (`:`-separated list; default KTSTR_SCHEDULER_DIR).
    #[arg(long, value_name = "DIR")]
    pub scheduler_dir: Option<String>,
    /// Carry cached kernels as references into the remote cache (KTSTR_REMOTE_CACHE),
    /// uploading any it lacks; runners download them. Path kernels are still carried.
    #[arg(long)]
    pub remote_kernels: bool,
    #[command(flatten)]
    pub common: crate::kernel_cmd::CommonArgs,
    /// Arguments for `cargo nextest archive`.
    #[arg(last = true, value_name = "NEXTEST ARCHIVE ARGS", allow_hyphen_values = true)]
    pub nextest_args: Vec<String>,
}

/// One kernel of the archive, in hand-off order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ArchivedKernel {
    /// The hand-off label (already unique within the archive).
    pub label: String,
    /// The cache key, for cached kernels.
    pub key: Option<String>,
    /// Directory inside the archive holding its files; `None` for a remote reference.
    pub dir: Option<String>,
    /// File name of the boot image inside `dir`.
    pub image: String,
    /// `s3://…` the key lives in, for a remote reference.
    pub remote: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub schema: u32,
    pub kernels: Vec<ArchivedKernel>,
    pub nextest_archive: String,
    /// Directory of scheduler binaries inside the archive, if any were carried.
    pub schedulers: Option<String>,
    /// The `cargo ktstr` version that wrote it.
    pub ktstr_version: String,
}

fn scheduler_dirs(arg: Option<&str>) -> Vec<PathBuf> {
    let v = arg.map(str::to_string).or_else(|| std::env::var("KTSTR_SCHEDULER_DIR").ok()).unwrap_or_default();
    v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect()
}

/// Appends a file to the tar under `name`, keeping its mode.
fn append_file<W: std::io::Write>(tar: &mut tar::Builder<W>, from: &Path, name: &str) -> Result<()> {
    let mut f = std::fs::File::open(from).with_context(|| format!("opening {} for the archive", from.display()))?;
    tar.append_file(name, &mut f).with_context(|| format!("adding {} to the archive", from.display()))
}

pub fn run(args: ArchiveArgs) -> Result<i32> {
    let mut opts = kernel_build::Options::default();
    args.common.apply(&mut opts)?;
    let remote = if args.remote_kernels {
        Some(crate::remote_cmd::remote().map_err(|e| anyhow!("--remote-kernels: {e}"))?)
    } else {
        None
    };
    let kernels = if args.kernels.is_empty() {
        Vec::new()
    } else {
        test_cmd::resolve_all(&args.kernels, &opts, test_cmd::parallelism()?)?
    };
    let handoff: Vec<Handoff> = kernels.iter().map(|(s, k)| Handoff::of(s, k)).collect();
    // Unique labels, as `cargo ktstr test` would export them.
    let labelled = test_cmd::unique_kernels(&handoff)?;

    let out = crate::export_cmd::absolute(&args.output)?;
    let parent = out.parent().unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let work = tempfile::Builder::new().prefix(".ktstr-archive-").tempdir_in(&parent)?;
    let nextest_file = work.path().join(NEXTEST_ARCHIVE);

    let mut cmd = Command::new(test_cmd::cargo());
    cmd.args(["nextest", "archive", "--archive-file"]).arg(&nextest_file);
    if args.release {
        cmd.arg("--release");
    }
    for p in &args.packages {
        cmd.args(["-p", p]);
    }
    cmd.args(&args.nextest_args);
    test_cmd::require_nextest()?;
    let st = cmd.status().map_err(|e| anyhow!("running {} nextest archive: {e}", test_cmd::cargo().to_string_lossy()))?;
    if !st.success() {
        bail!("cargo nextest archive failed ({st}); see its output above");
    }

    let tmp_out = work.path().join("out.tar.zst");
    let enc = zstd::stream::write::Encoder::new(std::fs::File::create(&tmp_out)?, 3)?;
    let mut tar = tar::Builder::new(enc);
    tar.follow_symlinks(true);
    append_file(&mut tar, &nextest_file, NEXTEST_ARCHIVE)?;
    // nextest on the runner wants the workspace's manifests (and reads its
    // .config/nextest.toml profiles): they travel, the sources do not.
    let (root, dirs) = workspace_layout(&nextest_file)?;
    for rel in std::iter::once(PathBuf::from(".config/nextest.toml")).chain(dirs.iter().map(|d| d.join("Cargo.toml"))) {
        let from = root.join(&rel);
        if from.is_file() {
            append_file(&mut tar, &from, &format!("{WORKSPACE}/{}", rel.display()))?;
        }
    }

    // Cache entries go to the remote cache: their local cache, opened once.
    let cache = match &remote {
        Some(_) if kernels.iter().any(|(_, k)| k.cache_key.is_some()) => Some(kernel_build::Cache::open(opts.cache_root.as_deref())?),
        _ => None,
    };
    let mut archived = Vec::new();
    for (n, h) in labelled.iter().enumerate() {
        let (_, k) = kernels.iter().find(|(_, k)| k.image == h.image).expect("every hand-off kernel was resolved");
        let image_name = k.image.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "bzImage".into());
        if let (Some(r), Some(key), Some(cache)) = (&remote, &k.cache_key, &cache) {
            let entry = cache
                .lookup(key)
                .ok_or_else(|| anyhow!("cache entry {key} vanished while archiving"))?;
            match r.push(&entry, false)? {
                kernel_build::remote::Pushed::Uploaded { .. } => eprintln!("ktstr: uploaded {key} to {}", r.url()),
                kernel_build::remote::Pushed::AlreadyThere => {}
            }
            archived.push(ArchivedKernel { label: h.label.clone(), key: Some(key.clone()), dir: None, image: image_name, remote: Some(r.url().to_string()) });
            continue;
        }
        let dir = format!("kernels/{n}");
        append_file(&mut tar, &k.image, &format!("{dir}/{image_name}"))?;
        if k.cache_key.is_some() {
            for extra in kernel_build::cache::ENTRY_FILES {
                let p = k.dir.join(extra);
                if p.is_file() {
                    append_file(&mut tar, &p, &format!("{dir}/{extra}"))?;
                }
            }
        }
        archived.push(ArchivedKernel { label: h.label.clone(), key: k.cache_key.clone(), dir: Some(dir), image: image_name, remote: None });
    }

    let mut schedulers = None;
    for d in scheduler_dirs(args.scheduler_dir.as_deref()) {
        let rd = std::fs::read_dir(&d).with_context(|| format!("scheduler dir {}", d.display()))?;
        for e in rd.flatten() {
            let p = e.path();
            if test_cmd::is_executable(&p) {
                let name = format!("{SCHEDULERS}/{}", e.file_name().to_string_lossy());
                append_file(&mut tar, &p, &name)?;
                schedulers = Some(SCHEDULERS.to_string());
            }
        }
    }

    let m = Manifest {
        schema: SCHEMA,
        kernels: archived,
        nextest_archive: NEXTEST_ARCHIVE.into(),
        schedulers,
        ktstr_version: env!("CARGO_PKG_VERSION").into(),
    };
    let json = serde_json::to_vec_pretty(&m)?;
    let mut h = tar::Header::new_gnu();
    h.set_size(json.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, MANIFEST, &json[..])?;
    tar.into_inner()?.finish()?.sync_all()?;
    std::fs::rename(&tmp_out, &out).with_context(|| format!("writing {}", out.display()))?;
    let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "ktstr: wrote {} ({:.1} MiB: nextest archive, {} kernel(s){})",
        out.display(),
        kernel_build::progress::mib(size),
        m.kernels.len(),
        if m.schedulers.is_some() { ", schedulers" } else { "" }
    );
    Ok(0)
}

/// The archive extracted into a directory of its own.
pub struct Extracted {
    pub dir: tempfile::TempDir,
    pub manifest: Manifest,
}

impl Extracted {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// Extracts `file` into a fresh temp dir (removed when the value drops).
pub fn extract(file: &Path) -> Result<Extracted> {
    let f = std::fs::File::open(file).with_context(|| format!("--archive {}: cannot open", file.display()))?;
    let dir = tempfile::Builder::new().prefix("ktstr-archive-").tempdir()?;
    let dec = zstd::stream::read::Decoder::new(f)?;
    let mut ar = tar::Archive::new(dec);
    ar.set_preserve_permissions(true);
    ar.unpack(dir.path()).with_context(|| format!("--archive {}: not a `cargo ktstr archive` file (extracting it failed)", file.display()))?;
    let raw = std::fs::read(dir.path().join(MANIFEST))
        .with_context(|| format!("--archive {}: no {MANIFEST}; write archives with `cargo ktstr archive`", file.display()))?;
    let manifest: Manifest = serde_json::from_slice(&raw).with_context(|| format!("--archive {}: bad {MANIFEST}", file.display()))?;
    if manifest.schema != SCHEMA {
        bail!("--archive {}: schema {} (this cargo-ktstr reads {SCHEMA}); use the cargo-ktstr that wrote it", file.display(), manifest.schema);
    }
    Ok(Extracted { dir, manifest })
}

/// Kernel env for an extracted archive: `(KTSTR_KERNEL, KTSTR_KERNEL_LIST)`
/// and the resolved remote kernels (their cache locks live as long as it).
pub fn kernel_env(x: &Extracted, opts: &kernel_build::Options) -> Result<(Option<PathBuf>, Option<String>, Vec<kernel_build::ResolvedKernel>)> {
    let mut images = Vec::new();
    let mut held = Vec::new();
    for k in &x.manifest.kernels {
        let image = match (&k.dir, &k.key) {
            (Some(d), _) => x.path(d).join(&k.image),
            (None, Some(key)) => {
                if opts.remote.is_none() {
                    bail!(
                        "the archive names kernel {key} in remote cache {}; set KTSTR_REMOTE_CACHE (and AWS_* credentials) to download it",
                        k.remote.as_deref().unwrap_or("?")
                    );
                }
                let r = kernel_build::resolve_one(key, opts).map_err(|e| anyhow!("kernel {key}: {e:#}"))?;
                let img = r.image.clone();
                held.push(r);
                img
            }
            (None, None) => bail!("archive kernel {} has neither files nor a cache key", k.label),
        };
        if !image.is_file() {
            bail!("archive kernel {}: {} is missing from the archive", k.label, image.display());
        }
        images.push((k.label.clone(), image));
    }
    let first = images.first().map(|(_, p)| p.clone());
    let list = (images.len() >= 2).then(|| images.iter().map(|(l, p)| format!("{l}={}", p.display())).collect::<Vec<_>>().join(";"));
    Ok((first, list, held))
}

/// The workspace root and its package directories (relative to it), from
/// the cargo metadata nextest stores in its archive.
fn workspace_layout(nextest_archive: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let f = std::fs::File::open(nextest_archive)?;
    let mut ar = tar::Archive::new(zstd::stream::read::Decoder::new(f)?);
    for e in ar.entries()? {
        let mut e = e?;
        if e.path()?.as_ref() != Path::new("target/nextest/cargo-metadata.json") {
            continue;
        }
        let meta: serde_json::Value = serde_json::from_reader(&mut e).context("nextest's cargo-metadata.json")?;
        let root = PathBuf::from(meta["workspace_root"].as_str().unwrap_or("/"));
        let dirs = meta["packages"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| Path::new(p["manifest_path"].as_str()?).parent()?.strip_prefix(&root).ok().map(Path::to_path_buf))
                    .collect()
            })
            .unwrap_or_default();
        return Ok((root, dirs));
    }
    bail!("{} holds no target/nextest/cargo-metadata.json; is it a nextest archive?", nextest_archive.display())
}

/// `cargo-nextest`'s arguments for running an extracted archive.
pub fn nextest_argv(archive: &Path, ws: &Path, partition: Option<&str>, nextest_args: Vec<String>) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec!["nextest".into(), "run".into(), "--archive-file".into(), archive.into()];
    argv.extend(["--workspace-remap".into(), ws.into()]);
    if let Some(p) = partition {
        argv.extend(["--partition".into(), p.into()]);
    }
    argv.extend(nextest_args.into_iter().map(OsString::from));
    argv
}

/// `cargo ktstr test --archive FILE`: extract, export the kernels, run
/// `cargo-nextest nextest run --archive-file … --workspace-remap …`
/// (no cargo needed), remove the extraction, exit with nextest's code.
pub fn run_archive(file: &Path, partition: Option<&str>, nextest_args: Vec<String>, opts: &kernel_build::Options, print_env: bool) -> Result<i32> {
    let x = extract(file)?;
    let (kernel, list, _held) = kernel_env(&x, opts)?;
    let nextest = test_cmd::require_nextest()?;
    // nextest wants a workspace root to remap to; tests find no sources
    // there, but each package's directory exists (nextest runs tests in it):
    // the archive carries every package's Cargo.toml, so extracting made them.
    let ws = x.path(WORKSPACE);
    std::fs::create_dir_all(&ws)?;
    let argv = nextest_argv(&x.path(&x.manifest.nextest_archive), &ws, partition, nextest_args);
    let mut cmd = Command::new(&nextest);
    cmd.args(&argv).current_dir(&ws);
    cmd.env_remove("KTSTR_TEST_KERNEL").env_remove("KTSTR_KERNEL_LIST").env_remove("KTSTR_REPEAT");
    if let Some(k) = &kernel {
        cmd.env("KTSTR_KERNEL", k);
    }
    if let Some(l) = &list {
        cmd.env("KTSTR_KERNEL_LIST", l);
    }
    if let Some(s) = &x.manifest.schedulers {
        cmd.env("KTSTR_SCHEDULER_DIR", x.path(s));
    }
    // The default (beside the test binary) is nextest's temp extraction: keep them here instead.
    if std::env::var_os("KTSTR_ARTIFACT_DIR").is_none_or(|v| v.is_empty()) {
        let art = std::env::current_dir()?.join("ktstr-artifacts");
        eprintln!("ktstr: run artifacts go to {} (KTSTR_ARTIFACT_DIR overrides)", art.display());
        cmd.env("KTSTR_ARTIFACT_DIR", art);
    }
    if print_env {
        if let Some(k) = &kernel {
            println!("KTSTR_KERNEL={}", k.display());
        }
        if let Some(l) = &list {
            println!("KTSTR_KERNEL_LIST={l}");
        }
        if let Some(s) = &x.manifest.schedulers {
            println!("KTSTR_SCHEDULER_DIR={}", x.path(s).display());
        }
        println!("exec: {} {}", nextest.display(), argv.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
        return Ok(0);
    }
    let st = cmd.status().map_err(|e| anyhow!("running {}: {e}", nextest.display()))?;
    Ok(st.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn tar_zst(files: &[(&str, &[u8])]) -> Vec<u8> {
        let enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let mut t = tar::Builder::new(enc);
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            t.append_data(&mut h, name, *data).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn package_dirs_come_from_nextest_s_cargo_metadata() {
        let d = tempfile::tempdir().unwrap();
        let meta = br#"{"workspace_root":"/src/ws","packages":[
            {"manifest_path":"/src/ws/Cargo.toml"},{"manifest_path":"/src/ws/tests/Cargo.toml"},
            {"manifest_path":"/home/u/.cargo/registry/x/Cargo.toml"}]}"#;
        let p = d.path().join("n.tar.zst");
        std::fs::write(&p, tar_zst(&[("target/nextest/binaries-metadata.json", b"{}"), ("target/nextest/cargo-metadata.json", meta)])).unwrap();
        let (root, dirs) = workspace_layout(&p).unwrap();
        assert_eq!(root, Path::new("/src/ws"));
        assert_eq!(dirs, [PathBuf::from(""), PathBuf::from("tests")]);
    }

    fn manifest(kernels: Vec<ArchivedKernel>) -> Vec<u8> {
        let m = Manifest { schema: SCHEMA, kernels, nextest_archive: NEXTEST_ARCHIVE.into(), schedulers: None, ktstr_version: "0".into() };
        serde_json::to_vec(&m).unwrap()
    }

    fn kernel(label: &str, dir: Option<&str>, key: Option<&str>) -> ArchivedKernel {
        ArchivedKernel {
            label: label.into(),
            key: key.map(String::from),
            dir: dir.map(String::from),
            image: "bzImage".into(),
            remote: key.map(|_| "s3://b/p".to_string()),
        }
    }

    #[test]
    fn extracted_kernels_become_the_hand_off_env() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("suite.tar.zst");
        let two = manifest(vec![kernel("6.12.9", Some("kernels/0"), Some("k0")), kernel("path_vmlinuz_abc123", Some("kernels/1"), None)]);
        std::fs::write(&file, tar_zst(&[("kernels/0/bzImage", b"a"), ("kernels/1/bzImage", b"b"), (MANIFEST, &two)])).unwrap();
        let x = extract(&file).unwrap();
        let (first, list, held) = kernel_env(&x, &kernel_build::Options::default()).unwrap();
        assert_eq!(first, Some(x.path("kernels/0/bzImage")));
        let want = format!("6.12.9={};path_vmlinuz_abc123={}", x.path("kernels/0/bzImage").display(), x.path("kernels/1/bzImage").display());
        assert_eq!(list.as_deref(), Some(want.as_str()));
        assert!(held.is_empty());

        // One kernel: single-kernel mode, no list.
        let one = manifest(vec![kernel("6.12.9", Some("kernels/0"), None)]);
        std::fs::write(&file, tar_zst(&[("kernels/0/bzImage", b"a"), (MANIFEST, &one)])).unwrap();
        let x = extract(&file).unwrap();
        let (first, list, _) = kernel_env(&x, &kernel_build::Options::default()).unwrap();
        assert_eq!((first.is_some(), list), (true, None));

        // A remote reference without a remote configured names the fix.
        let remote = manifest(vec![kernel("6.12.9", None, Some("6.12.9-tarball-x86_64-kc00000000"))]);
        std::fs::write(&file, tar_zst(&[(MANIFEST, &remote)])).unwrap();
        let x = extract(&file).unwrap();
        let e = kernel_env(&x, &kernel_build::Options::default()).unwrap_err().to_string();
        assert!(e.contains("KTSTR_REMOTE_CACHE") && e.contains("s3://b/p"), "{e}");

        // A listed image missing from the archive, and files that are not an archive.
        std::fs::write(&file, tar_zst(&[(MANIFEST, &one)])).unwrap();
        let e = kernel_env(&extract(&file).unwrap(), &kernel_build::Options::default()).unwrap_err().to_string();
        assert!(e.contains("missing from the archive"), "{e}");
        std::fs::write(&file, tar_zst(&[("x", b"y")])).unwrap();
        assert!(extract(&file).err().unwrap().to_string().contains("cargo ktstr archive"));
        std::fs::write(&file, b"plain text").unwrap();
        assert!(extract(&file).is_err());
    }

    /// Partitions and the gauntlet compose: the partition splits whatever
    /// the gauntlet's filter selects (variants × kernels alike).
    #[test]
    fn archive_runs_partition_the_gauntlet_too() {
        let g = crate::test_cmd::gauntlet_args(&["tiny".into()], &["--no-fail-fast".into()]);
        let argv: Vec<String> = nextest_argv(Path::new("/x/n.tar.zst"), Path::new("/x/ws"), Some("count:2/4"), g)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            argv,
            [
                "nextest", "run", "--archive-file", "/x/n.tar.zst", "--workspace-remap", "/x/ws", "--partition", "count:2/4",
                "--run-ignored", "only", "-E", &crate::test_cmd::gauntlet_filter(&["tiny".into()]), "--no-fail-fast"
            ]
        );
    }

    #[test]
    fn archive_flags_conflict_with_building() {
        let parse = |a: &[&str]| crate::Cli::try_parse_from(std::iter::once("cargo-ktstr").chain(a.iter().copied()));
        assert!(parse(&["test", "--archive", "s.tar.zst", "--partition", "count:1/2", "--", "--no-fail-fast"]).is_ok());
        assert!(parse(&["test", "--partition", "count:1/2"]).is_err(), "--partition needs --archive");
        for bad in [&["--kernel", "6.12"][..], &["-p", "x"], &["--release"], &["--repeat", "2"]] {
            let mut a = vec!["test", "--archive", "s.tar.zst"];
            a.extend_from_slice(bad);
            assert!(parse(&a).is_err(), "{a:?}");
        }
        assert!(parse(&["archive", "--kernel", "6.12"]).is_err(), "-o is required");
        assert!(parse(&["archive", "--kernel", "6.12", "-o", "s.tar.zst", "--remote-kernels"]).is_ok());
    }
}
