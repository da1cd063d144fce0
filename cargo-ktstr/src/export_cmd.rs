//! `cargo ktstr export NAME`: build the test binaries, then ask each one
//! to write `NAME.run` (router protocol of design.md: 0 wrote, 1 not mine,
//! 2 mine but refused).

use std::ffi::OsString;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

const EXAMPLES: &str = "\
Examples:
  cargo ktstr export two_cgroups_share_cpu            # writes ./two_cgroups_share_cpu.run
  sudo ./two_cgroups_share_cpu.run                    # runs the test on this host; exit code = verdict
  cargo ktstr export two_cgroups_share_cpu --vm --kernel 6.12 -o /tmp/repro.run
  /tmp/repro.run                                      # boots the embedded kernel in a VM
  cargo ktstr export --vm gauntlet/two_cgroups_share_cpu/llc2   # a gauntlet variant: writes two_cgroups_share_cpu-llc2.run
  ./repro.run --extract DIR                           # unpack the archive only

Exit codes: 0 written, 1 no test of that name, 2 a test binary refused it (reason shown).";

#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLES)]
pub struct ExportArgs {
    /// Test name (`NAME`, `ktstr/NAME`, or `gauntlet/NAME/PRESET` with `--vm`).
    pub name: String,
    /// Output file (default: ./NAME.run, or ./NAME-PRESET.run for a gauntlet variant).
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    pub output: Option<PathBuf>,
    /// Package(s) whose test binaries to search (repeatable).
    #[arg(short = 'p', long = "package", value_name = "PKG")]
    pub packages: Vec<String>,
    /// Embed a kernel so the .run boots the test in a VM instead of running it on the host.
    #[arg(long)]
    pub vm: bool,
    /// Kernel to embed with --vm (any `--kernel` spec); default: the test binaries' discovery.
    #[arg(long = "kernel", value_name = "SPEC", requires = "vm")]
    pub kernel: Option<String>,
    /// Build the test binaries in release mode.
    #[arg(long)]
    pub release: bool,
}

/// Test executables from `cargo test --no-run --message-format=json`.
pub fn build_test_binaries(packages: &[String], release: bool) -> Result<Vec<PathBuf>> {
    let cargo = crate::test_cmd::cargo();
    let mut cmd = Command::new(&cargo);
    cmd.args(["test", "--no-run", "--message-format=json-render-diagnostics"]);
    if release {
        cmd.arg("--release");
    }
    for p in packages {
        cmd.args(["-p", p]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("running {} test --no-run", cargo.to_string_lossy()))?;
    let mut bins = Vec::new();
    let stdout = child.stdout.take().expect("piped");
    for msg in cargo_metadata::Message::parse_stream(BufReader::new(stdout)) {
        if let cargo_metadata::Message::CompilerArtifact(a) = msg? {
            if let (true, Some(exe)) = (a.profile.test, a.executable) {
                let exe = PathBuf::from(exe);
                if !bins.contains(&exe) {
                    bins.push(exe);
                }
            }
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("building the test binaries failed ({st}); see cargo's output above");
    }
    Ok(bins)
}

/// What one binary answered.
#[derive(Debug)]
pub struct Answer {
    pub binary: PathBuf,
    pub code: Option<i32>,
    pub stderr: String,
}

/// The router over already-built binaries: stops at the first `0`.
pub fn route(bins: &[PathBuf], extra: &[OsString]) -> Result<Result<Answer, Vec<Answer>>> {
    let mut answers = Vec::new();
    for b in bins {
        let out = Command::new(b)
            .args(extra)
            .env_remove("NEXTEST")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", b.display()))?;
        let a = Answer { binary: b.clone(), code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() };
        if a.code == Some(0) {
            return Ok(Ok(a));
        }
        answers.push(a);
    }
    Ok(Err(answers))
}

/// Exit code per the router contract, after printing the outcome.
pub fn run(args: ExportArgs) -> Result<i32> {
    let (name, stem) = export_name(&args.name)?;
    let output = args.output.clone().unwrap_or_else(|| PathBuf::from(format!("{stem}.run")));
    let output = absolute(&output)?;
    let mut extra: Vec<OsString> =
        vec![format!("--ktstr-export-test={name}").into(), prefixed("--ktstr-export-output=", &output)];
    // Kept alive until the binaries have read the image (shared cache lock).
    let mut _kernel = None;
    if args.vm {
        extra.push("--ktstr-export-vm".into());
        if let Some(spec) = &args.kernel {
            let k = kernel_build::resolve_one(spec, &kernel_build::Options::default())
                .map_err(|e| anyhow::anyhow!("kernel {spec:?}: {e:#}"))?;
            extra.push(prefixed("--ktstr-export-kernel=", &k.image));
            _kernel = Some(k);
        }
    }
    let bins = build_test_binaries(&args.packages, args.release)?;
    if bins.is_empty() {
        bail!("cargo built no test binaries{}", if args.packages.is_empty() { "" } else { " for the given packages" });
    }
    match route(&bins, &extra)? {
        Ok(a) => {
            eprint!("{}", a.stderr);
            eprintln!("ktstr: {} written by {}", output.display(), a.binary.display());
            Ok(0)
        }
        Err(answers) => {
            if let Some(refused) = answers.iter().find(|a| a.code == Some(2)) {
                eprint!("{}", refused.stderr);
                eprintln!("ktstr: export of {name} refused by {}", refused.binary.display());
                return Ok(2);
            }
            eprintln!(
                "ktstr: export: test {name:?} not found in {} test binaries (list them with `cargo nextest list`)",
                bins.len()
            );
            Ok(1)
        }
    }
}

/// The name the binaries are asked for and the default file stem:
/// `NAME` for `NAME` or `ktstr/NAME`; `gauntlet/NAME/PRESET` and
/// `NAME-PRESET` for a gauntlet variant.
fn export_name(given: &str) -> Result<(String, String)> {
    let parts: Vec<&str> = given.split('/').collect();
    match parts[..] {
        [n] | ["ktstr", n] if !n.is_empty() => Ok((n.to_string(), n.to_string())),
        ["gauntlet", n, p] if !n.is_empty() && !p.is_empty() => Ok((given.to_string(), format!("{n}-{p}"))),
        ["ktstr", n, k] | ["gauntlet", n, _, k] if !n.is_empty() && k.starts_with("kernel_") => bail!(
            "export names a test without its kernel suffix: drop /{k} from {given:?} and embed that kernel with --vm --kernel SPEC"
        ),
        _ => bail!("export takes one test name (NAME, ktstr/NAME or gauntlet/NAME/PRESET), got {given:?}"),
    }
}

fn prefixed(flag: &str, p: &Path) -> OsString {
    let mut s = OsString::from(flag);
    s.push(p.as_os_str());
    s
}

pub(crate) fn absolute(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

#[cfg(test)]
mod tests {
    use super::export_name;

    #[test]
    fn names() {
        let ok = |g: &str| export_name(g).unwrap();
        assert_eq!(ok("t"), ("t".into(), "t".into()));
        assert_eq!(ok("ktstr/t"), ("t".into(), "t".into()));
        assert_eq!(ok("gauntlet/t/llc2"), ("gauntlet/t/llc2".into(), "t-llc2".into()));
        for bad in ["", "ktstr/", "a/b", "gauntlet/t", "gauntlet//llc2", "gauntlet/t/llc2/x", "ktstr/t/x"] {
            let e = export_name(bad).unwrap_err().to_string();
            assert!(e.contains("gauntlet/NAME/PRESET") && e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        // A row copied from a multi-kernel run: told to drop the suffix.
        for (given, suffix) in [("gauntlet/t/llc2/kernel_6_12", "/kernel_6_12"), ("ktstr/t/kernel_path_x", "/kernel_path_x")] {
            let e = export_name(given).unwrap_err().to_string();
            assert!(e.contains(&format!("drop {suffix}")) && e.contains("--vm --kernel SPEC"), "{given}: {e}");
        }
    }
}
