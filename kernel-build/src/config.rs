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
        f.write_str("ktstr.kconfig options dropped by olddefconfig: ")?;
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
    for (opt, want) in parse_config(fragment) {
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

/// Produces `src/.config`: base, then the fragment merged with
/// `merge_config.sh -m`, then `make olddefconfig`, then [`verify`].
pub fn configure(src: &Path, base: &Base, fragment: &str, make: &Make, log: &Path) -> Result<()> {
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
    // The fragment lives outside the tree so a clean git tree stays clean.
    let mut frag = tempfile::Builder::new().prefix("ktstr-kconfig-").tempfile()?;
    frag.write_all(fragment.as_bytes())?;
    frag.flush()?;
    let merge = src.join("scripts/kconfig/merge_config.sh");
    let mut cmd = std::process::Command::new("sh");
    cmd.arg(&merge).arg("-m").arg(".config").arg(frag.path()).current_dir(src);
    crate::build::run_logged(cmd, log, "merge ktstr.kconfig")?;
    make.run(src, &["olddefconfig"], log, "olddefconfig")?;
    verify(src, fragment)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
