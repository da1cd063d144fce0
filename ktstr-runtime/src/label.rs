//! Kernel labels: the `KTSTR_KERNEL_LIST` parser, the sanitizer that turns
//! a label into a test-name suffix, and suffix peeling for `--exact`.

use std::path::PathBuf;

/// `kernel_` + lowercase label with every run of non-alphanumerics as
/// one `_` and no `_` at either end (the one implementation, shared with
/// cargo-ktstr).
pub use kernel_build::label::sanitize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    /// The producer's label, as given.
    pub label: String,
    /// `kernel_…`, what test names carry.
    pub sanitized: String,
    pub path: PathBuf,
}

/// Parses `label1=path1;label2=path2;…`. Empty entries (a trailing `;`)
/// are ignored; an entry without `=`, an empty label or path, or two
/// labels that sanitize alike are errors.
pub fn parse_kernel_list(s: &str) -> Result<Vec<KernelEntry>, String> {
    let mut out: Vec<KernelEntry> = Vec::new();
    for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (label, path) = entry
            .split_once('=')
            .ok_or_else(|| format!("KTSTR_KERNEL_LIST entry {entry:?} has no `=`; expected label=path"))?;
        if label.is_empty() || path.is_empty() {
            return Err(format!("KTSTR_KERNEL_LIST entry {entry:?} needs both a label and a path"));
        }
        let sanitized = sanitize(label);
        if sanitized == "kernel_" {
            return Err(format!("KTSTR_KERNEL_LIST label {label:?} has no letters or digits"));
        }
        if let Some(prev) = out.iter().find(|e| e.sanitized == sanitized) {
            return Err(format!(
                "KTSTR_KERNEL_LIST labels {:?} and {label:?} both become {sanitized}; test names would collide",
                prev.label
            ));
        }
        out.push(KernelEntry { label: label.to_string(), sanitized, path: PathBuf::from(path) });
    }
    Ok(out)
}

/// Splits `base/kernel_x` into `(base, Some(kernel_x))` when the last
/// `/`-segment is exactly one of `labels`; otherwise `(name, None)`.
/// Matching whole segments keeps `kernel_6_12` from matching a name that
/// ends in `…/kernel_git_6_12`.
pub fn peel_suffix<'a>(name: &'a str, labels: &[String]) -> (&'a str, Option<&'a str>) {
    match name.rsplit_once('/') {
        Some((base, last)) if labels.iter().any(|l| l == last) => (base, Some(last)),
        _ => (name, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_parser() {
        let l = parse_kernel_list("6.12=/k/a;6.12-rc1=/k/b=with=eq;").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0], KernelEntry { label: "6.12".into(), sanitized: "kernel_6_12".into(), path: "/k/a".into() });
        assert_eq!(l[1].path, PathBuf::from("/k/b=with=eq"), "first = splits");
        assert_eq!(l[1].sanitized, "kernel_6_12_rc1");
        assert_eq!(parse_kernel_list("").unwrap(), vec![]);
        assert_eq!(parse_kernel_list("6.12=/k").unwrap().len(), 1);
        assert!(parse_kernel_list("6.12").unwrap_err().contains("no `=`"));
        assert!(parse_kernel_list("=/k").unwrap_err().contains("label and a path"));
        assert!(parse_kernel_list("6.12=/a;6-12=/b").unwrap_err().contains("collide"));
    }

    #[test]
    fn label_that_is_a_strict_suffix_of_another() {
        // Raw "6.12" is a strict suffix of "git_x_6.12"; sanitized
        // "kernel_6_12" is a strict suffix of "kernel_kernel_6_12".
        let l = parse_kernel_list("git_x_6.12=/a;6.12=/b;kernel-6.12=/c").unwrap();
        let labels: Vec<String> = l.iter().map(|e| e.sanitized.clone()).collect();
        assert_eq!(labels, ["kernel_git_x_6_12", "kernel_6_12", "kernel_kernel_6_12"]);
        assert!(l[0].label.ends_with(&l[1].label) && labels[2].ends_with(&labels[1]));
        assert_eq!(l[1].path, PathBuf::from("/b"));
        assert_eq!(l[2].path, PathBuf::from("/c"));
        for want in &labels {
            let name = format!("ktstr/t/{want}");
            assert_eq!(peel_suffix(&name, &labels), ("ktstr/t", Some(want.as_str())));
        }
        assert_eq!(peel_suffix("ktstr/t/kernel_x_6_12", &labels), ("ktstr/t/kernel_x_6_12", None));
    }

    #[test]
    fn suffix_peeling() {
        let labels = vec!["kernel_6_12".to_string()];
        assert_eq!(peel_suffix("ktstr/t", &labels), ("ktstr/t", None));
        assert_eq!(peel_suffix("ktstr/kernel_6_12", &labels), ("ktstr", Some("kernel_6_12")));
        assert_eq!(peel_suffix("gauntlet/t/p/kernel_6_12", &labels), ("gauntlet/t/p", Some("kernel_6_12")));
        assert_eq!(peel_suffix("ktstr/t/kernel_6_1", &labels), ("ktstr/t/kernel_6_1", None));
        assert_eq!(peel_suffix("ktstr/t/kernel_6_12", &[]), ("ktstr/t/kernel_6_12", None));
    }
}
