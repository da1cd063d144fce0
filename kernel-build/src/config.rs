//! Kernel configuration: base config, ktstr fragment merge, olddefconfig,
//! and a check that every fragment option survived.

use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::build::Make;

/// What the fragment is merged on top of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Base {
    /// `make tinyconfig`: smallest base, builds in a fraction of defconfig's time.
    #[default]
    Tinyconfig,
    /// `make defconfig`.
    Defconfig,
    /// The user's own `.config`.
    File(PathBuf),
    /// The tree's existing `.config` (in-place builds of a configured tree).
    Existing,
}

impl Base {
    /// `tinyconfig`, `defconfig`, or a path to a config file.
    pub fn parse(s: &str) -> Result<Base> {
        match s {
            "tinyconfig" => Ok(Base::Tinyconfig),
            "defconfig" => Ok(Base::Defconfig),
            other if Path::new(other).is_file() => Ok(Base::File(PathBuf::from(other))),
            other => bail!("unknown base config {other:?}: use tinyconfig, defconfig, or --config FILE"),
        }
    }
}

impl fmt::Display for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Base::Tinyconfig => f.write_str("tinyconfig"),
            Base::Defconfig => f.write_str("defconfig"),
            Base::File(p) => write!(f, "{}", p.display()),
            Base::Existing => f.write_str("existing .config"),
        }
    }
}

/// `(CONFIG_X, value)` pairs a fragment sets; `# CONFIG_X is not set` is `n`.
pub fn parse_config(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(rest) = l.strip_prefix("# ") {
                let sym = rest.strip_suffix(" is not set")?;
                return sym.starts_with("CONFIG_").then(|| (sym.to_string(), "n".to_string()));
            }
            let (k, v) = l.split_once('=')?;
            k.starts_with("CONFIG_").then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// One fragment option that `olddefconfig` changed, and why (best effort).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub option: String,
    pub wanted: String,
    pub got: String,
    pub depends: Option<String>,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={} became {}", self.option, self.wanted, if self.got == "n" { "unset" } else { &self.got })?;
        match &self.depends {
            Some(d) => write!(f, " (depends on {d})"),
            None => write!(f, " (no direct `depends on`; check choice/if blocks and selects)"),
        }
    }
}

/// The fragment did not survive `olddefconfig`.
#[derive(Debug, thiserror::Error)]
pub struct DroppedOptions(pub Vec<Dropped>);

impl fmt::Display for DroppedOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ktstr.kconfig/--extra-kconfig options dropped by olddefconfig: ")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Compares the fragment with the final `.config`, explaining drops from Kconfig.
pub fn verify(src: &Path, fragment: &str) -> Result<(), DroppedOptions> {
    let final_cfg: HashMap<String, String> =
        parse_config(&std::fs::read_to_string(src.join(".config")).unwrap_or_default()).into_iter().collect();
    let mut dropped = Vec::new();
    // Later lines win (an extra fragment may override ktstr.kconfig), as in merge_config.sh.
    let mut wanted: Vec<(String, String)> = Vec::new();
    for (opt, want) in parse_config(fragment) {
        match wanted.iter_mut().find(|(o, _)| *o == opt) {
            Some(slot) => slot.1 = want,
            None => wanted.push((opt, want)),
        }
    }
    for (opt, want) in wanted {
        let got = final_cfg.get(&opt).cloned().unwrap_or_else(|| "n".to_string());
        if got != want {
            dropped.push(Dropped { option: opt, wanted: want, got, depends: None });
        }
    }
    if dropped.is_empty() {
        return Ok(());
    }
    let kconfig = KconfigIndex::load(src);
    for d in &mut dropped {
        d.depends = kconfig.depends(d.option.trim_start_matches("CONFIG_"), &final_cfg);
    }
    Err(DroppedOptions(dropped))
}

/// Kconfig text of the tree, read only when something was dropped.
struct KconfigIndex {
    files: Vec<String>,
}

impl KconfigIndex {
    fn load(src: &Path) -> Self {
        let mut files = Vec::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || name == "Documentation" {
                    continue;
                }
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    Ok(t) if t.is_file() && name.starts_with("Kconfig") => {
                        if let Ok(s) = std::fs::read_to_string(&p) {
                            files.push(s);
                        }
                    }
                    _ => {}
                }
            }
        }
        KconfigIndex { files }
    }

    /// `depends on` lines of every `config SYM` definition, with the current
    /// value of each symbol they mention, e.g. `X86_64 && !XEN [X86_64=y XEN=n]`.
    fn depends(&self, sym: &str, cfg: &HashMap<String, String>) -> Option<String> {
        let mut deps: Vec<String> = Vec::new();
        for text in &self.files {
            let mut inside = false;
            for line in text.lines() {
                let t = line.trim();
                let head = t.split_whitespace().next().unwrap_or("");
                if matches!(head, "config" | "menuconfig") {
                    inside = t.split_whitespace().nth(1) == Some(sym);
                    continue;
                }
                if matches!(head, "choice" | "endchoice" | "menu" | "endmenu" | "if" | "endif" | "source" | "comment") {
                    inside = false;
                }
                if inside {
                    if let Some(d) = t.strip_prefix("depends on") {
                        let d = d.trim().to_string();
                        if !deps.contains(&d) {
                            deps.push(d);
                        }
                    }
                }
            }
        }
        if deps.is_empty() {
            return None;
        }
        let expr = deps.join(" && ");
        let mut vals: Vec<String> = Vec::new();
        for tok in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if tok.len() > 1 && tok.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') && tok.bytes().next().is_some_and(|b| b.is_ascii_uppercase()) {
                let v = cfg.get(&format!("CONFIG_{tok}")).map(String::as_str).unwrap_or("n");
                let s = format!("{tok}={v}");
                if !vals.contains(&s) {
                    vals.push(s);
                }
            }
        }
        Some(if vals.is_empty() { expr } else { format!("{expr} [{}]", vals.join(" ")) })
    }
}

/// Produces `src/.config`: base, then the fragments merged in order with
/// `merge_config.sh -m`, then `make olddefconfig`, then [`verify`] of them all.
pub fn configure(src: &Path, base: &Base, fragments: &[&str], make: &Make, log: &Path) -> Result<()> {
    crate::progress::phase(crate::progress::Phase::Configure, &format!("{base} + ktstr.kconfig{}; log: {}", if fragments.len() > 1 { " + extra fragment" } else { "" }, log.display()));
    let from = base_digest(base, Some(src))?;
    match base {
        Base::Tinyconfig => make.run(src, &["tinyconfig"], log, "tinyconfig")?,
        Base::Defconfig => make.run(src, &["defconfig"], log, "defconfig")?,
        Base::File(p) => {
            std::fs::copy(p, src.join(".config")).with_context(|| format!("copying config {}", p.display()))?;
        }
        Base::Existing => {
            if !src.join(".config").is_file() {
                bail!("{} has no .config to start from", src.display());
            }
        }
    }
    // The fragments live outside the tree so a clean git tree stays clean.
    let mut files = Vec::new();
    for text in fragments {
        let mut frag = tempfile::Builder::new().prefix("ktstr-kconfig-").tempfile()?;
        frag.write_all(text.as_bytes())?;
        frag.flush()?;
        files.push(frag);
    }
    let merge = src.join("scripts/kconfig/merge_config.sh");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg(&merge).arg("-m").arg(".config").current_dir(src);
    for f in &files {
        cmd.arg(f.path());
    }
    crate::build::run_logged(cmd, log, "merge ktstr.kconfig")?;
    make.run(src, &["olddefconfig"], log, "olddefconfig")?;
    verify(src, &fragments.join("\n"))?;
    record_base(src, &from)
}

/// An extra Kconfig fragment (`--extra-kconfig FILE`), merged after ktstr.kconfig.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub path: PathBuf,
    pub text: String,
}

impl Fragment {
    pub fn read(path: &Path) -> Result<Fragment> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--extra-kconfig {}: cannot read it (give a Kconfig fragment file)", path.display()))?;
        if parse_config(&text).is_empty() {
            bail!("--extra-kconfig {}: no CONFIG_ lines (expected CONFIG_X=y or `# CONFIG_X is not set`)", path.display());
        }
        Ok(Fragment { path: path.to_path_buf(), text })
    }
}

/// What a cache key's `kc` stands for: the base, the embedded
/// ktstr.kconfig and the extra fragment, each by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputDigest {
    /// `tinyconfig`, `defconfig`, or `config-sha256:{hex}` (a config file's bytes).
    pub base: String,
    pub kconfig_sha256: String,
    pub extra_sha256: Option<String>,
}

/// In-tree record of the base a ktstr-written `.config` came from (the
/// kernel's `.gitignore` covers dotfiles, so a clean tree stays clean).
const BASE_MARKER: &str = ".ktstr-config";

/// The base digest of `base`: its name, or the SHA-256 of the config bytes.
/// A tree's `.config` that ktstr itself wrote stands for the base it was
/// configured from, so building a clean tree twice keys it the same.
pub fn base_digest(base: &Base, tree: Option<&Path>) -> Result<String> {
    Ok(match base {
        Base::Tinyconfig => "tinyconfig".to_string(),
        Base::Defconfig => "defconfig".to_string(),
        Base::File(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("--config {}: cannot read it", p.display()))?;
            format!("config-sha256:{}", crate::sha256_hex(&bytes))
        }
        Base::Existing => {
            if let Some(recorded) = tree.and_then(recorded_base) {
                return Ok(recorded);
            }
            let p = tree.map(|t| t.join(".config")).unwrap_or_default();
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            format!("config-sha256:{}", crate::sha256_hex(&bytes))
        }
    })
}

/// The base digest recorded when ktstr configured `tree`, if its `.config`
/// is still exactly what ktstr wrote (any edit since makes it the user's).
pub fn recorded_base(tree: &Path) -> Option<String> {
    let marker = std::fs::read_to_string(tree.join(BASE_MARKER)).ok()?;
    let config = std::fs::read(tree.join(".config")).ok()?;
    let mut base = None;
    let mut sha = None;
    for l in marker.lines() {
        match l.split_once(' ') {
            Some(("base", v)) => base = Some(v.to_string()),
            Some(("config-sha256", v)) => sha = Some(v.to_string()),
            _ => {}
        }
    }
    (sha? == crate::sha256_hex(&config)).then_some(base?)
}

fn record_base(tree: &Path, base: &str) -> Result<()> {
    let config = std::fs::read(tree.join(".config")).with_context(|| format!("reading {}/.config", tree.display()))?;
    let text = format!("base {base}\nconfig-sha256 {}\n", crate::sha256_hex(&config));
    std::fs::write(tree.join(BASE_MARKER), text).with_context(|| format!("writing {}/{BASE_MARKER}", tree.display()))
}

impl InputDigest {
    /// Digest of `base` (a `.config` read from `tree` for [`Base::Existing`]),
    /// [`crate::KCONFIG`] and `extra`.
    pub fn new(base: &Base, extra: Option<&Fragment>, tree: Option<&Path>) -> Result<InputDigest> {
        let base = base_digest(base, tree)?;
        Ok(InputDigest {
            base,
            kconfig_sha256: crate::sha256_hex(crate::KCONFIG.as_bytes()),
            extra_sha256: extra.map(|f| crate::sha256_hex(f.text.as_bytes())),
        })
    }

    /// CRC32 (8 lowercase hex digits) of the canonical input text: one
    /// `name=value` line per input, so no two input sets share the text.
    pub fn kc(&self) -> String {
        let text = format!(
            "base={}\nktstr.kconfig={}\nextra={}\n",
            self.base,
            self.kconfig_sha256,
            self.extra_sha256.as_deref().unwrap_or("none")
        );
        format!("{:08x}", crc32fast::hash(text.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ktstr_written_config_keeps_its_base() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path();
        std::fs::write(t.join(".config"), "CONFIG_A=y\n").unwrap();
        let user = base_digest(&Base::Existing, Some(t)).unwrap();
        assert!(user.starts_with("config-sha256:"), "{user}");
        assert_eq!(recorded_base(t), None);
        record_base(t, "tinyconfig").unwrap();
        assert_eq!(base_digest(&Base::Existing, Some(t)).unwrap(), "tinyconfig");
        std::fs::write(t.join(".config"), "CONFIG_A=y\nCONFIG_B=y\n").unwrap();
        assert_eq!(recorded_base(t), None, "an edited .config is the user's again");
        assert!(base_digest(&Base::Existing, Some(t)).unwrap().starts_with("config-sha256:"));
    }

    #[test]
    fn parse() {
        let c = parse_config("# x\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"s\"\nCONFIG_N=-1\nFOO=1\n");
        assert_eq!(
            c,
            [("CONFIG_A", "y"), ("CONFIG_B", "n"), ("CONFIG_C", "\"s\""), ("CONFIG_N", "-1")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn verify_names_dependency() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".config"), "CONFIG_AA=y\n# CONFIG_BB is not set\n").unwrap();
        std::fs::create_dir(d.path().join("kernel")).unwrap();
        std::fs::write(
            d.path().join("kernel/Kconfig.x"),
            "config C\n\tbool \"c\"\n\tdepends on BB && AA\n\nconfig D\n\tbool\n",
        )
        .unwrap();
        assert!(verify(d.path(), "CONFIG_AA=y\n").is_ok());
        let e = verify(d.path(), "CONFIG_AA=y\nCONFIG_C=y\nCONFIG_D=y\n").unwrap_err();
        assert_eq!(e.0.len(), 2);
        let msg = e.to_string();
        assert!(msg.contains("CONFIG_C=y became unset (depends on BB && AA [BB=n AA=y])"), "{msg}");
        assert!(msg.contains("CONFIG_D=y became unset (no direct"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn later_fragment_wins_in_verify() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".config"), "# CONFIG_AA is not set\nCONFIG_BB=y\n").unwrap();
        // ktstr.kconfig says AA=y, the extra fragment turns it off: no drop.
        assert!(verify(d.path(), &["CONFIG_AA=y\n", "# CONFIG_AA is not set\nCONFIG_BB=y\n"].join("\n")).is_ok());
        let e = verify(d.path(), &["CONFIG_BB=y\n", "CONFIG_AA=y\n"].join("\n")).unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!(e.0[0].option, "CONFIG_AA");
    }

    #[test]
    fn kc_covers_every_input() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.config"), d.path().join("b.config"));
        std::fs::write(&a, "CONFIG_A=y\nCONFIG_B=y\n").unwrap();
        std::fs::write(&b, "CONFIG_A=y\nCONFIG_B=m\n").unwrap();
        let frag = d.path().join("extra");
        std::fs::write(&frag, "CONFIG_X=y\n").unwrap();
        let extra = Fragment::read(&frag).unwrap();
        let kc = |base: Base, extra: Option<&Fragment>| InputDigest::new(&base, extra, None).unwrap().kc();
        let all = [
            kc(Base::Tinyconfig, None),
            kc(Base::Defconfig, None),
            kc(Base::File(a.clone()), None),
            kc(Base::File(b.clone()), None),
            kc(Base::Tinyconfig, Some(&extra)),
            kc(Base::Defconfig, Some(&extra)),
        ];
        for (i, x) in all.iter().enumerate() {
            assert_eq!(x.len(), 8);
            assert!(x.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{x}");
            for y in &all[i + 1..] {
                assert_ne!(x, y, "{all:?}");
            }
        }
        // Same inputs, same kc; the config file counts by content, not by name.
        assert_eq!(kc(Base::Tinyconfig, None), kc(Base::Tinyconfig, None));
        let a2 = d.path().join("copy-of-a");
        std::fs::copy(&a, &a2).unwrap();
        assert_eq!(kc(Base::File(a), None), kc(Base::File(a2), None));
        // The kc of the defaults is not the bare CRC32 of ktstr.kconfig that
        // older keys used, so an old entry can never be taken for a new one.
        assert_ne!(kc(Base::Tinyconfig, None), crate::kconfig_hash());
        // A tree's own .config counts by content too.
        std::fs::write(d.path().join(".config"), "CONFIG_A=y\n").unwrap();
        let e = InputDigest::new(&Base::Existing, None, Some(d.path())).unwrap();
        assert!(e.base.starts_with("config-sha256:"));
        assert!(Fragment::read(&d.path().join("nope")).is_err());
        std::fs::write(&frag, "hello\n").unwrap();
        assert!(Fragment::read(&frag).unwrap_err().to_string().contains("no CONFIG_ lines"));
    }
}
