//! Typed parse of the `--kernel` spec forms in design.md.

use std::cmp::Ordering;
use std::fmt;
use std::path::PathBuf;

/// Printed with every spec error so the user sees every accepted form.
pub const ACCEPTED_FORMS: &str = "accepted forms: VERSION (6.12, 6.12.9, 6.13-rc3), \
RANGE (6.10..6.12), TARBALL (path or http(s)/file URL to .tar.xz/.tar.gz), \
git+URL#REF, PATH (source tree, image file or directory holding one), \
CACHE-KEY (6.12.9-tarball-x86_64-kc1a2b3c4d)";

/// A spec that does not parse; one line naming the spec, the reason and the forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid kernel spec {spec:?}: {reason}; {ACCEPTED_FORMS}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

impl SpecError {
    fn new(spec: &str, reason: impl Into<String>) -> Self {
        SpecError { spec: spec.to_string(), reason: reason.into() }
    }
}

/// A kernel release version: `X.Y`, `X.Y.Z` or `X.Y-rcN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: Option<u32>,
    pub rc: Option<u32>,
}

impl Version {
    /// Parses `6.12`, `6.12.9`, `6.13-rc3`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Version> {
        let (base, rc) = match s.split_once("-rc") {
            Some((b, r)) => (b, Some(parse_num(r)?)),
            None => (s, None),
        };
        let mut parts = base.split('.');
        let major = parse_num(parts.next()?)?;
        let minor = parse_num(parts.next()?)?;
        let patch = match parts.next() {
            Some(p) => Some(parse_num(p)?),
            None => None,
        };
        if parts.next().is_some() || (rc.is_some() && patch.is_some()) {
            return None;
        }
        Some(Version { major, minor, patch, rc })
    }

    /// True for `X.Y` without patch level or rc: "newest release of the series".
    pub fn is_series(&self) -> bool {
        self.patch.is_none() && self.rc.is_none()
    }

    /// Same `X.Y` series.
    pub fn same_series(&self, other: &Version) -> bool {
        self.major == other.major && self.minor == other.minor
    }
}

fn parse_num(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if let Some(p) = self.patch {
            write!(f, ".{p}")?;
        }
        if let Some(rc) = self.rc {
            write!(f, "-rc{rc}")?;
        }
        Ok(())
    }
}

impl Ord for Version {
    // Release order: 6.13-rc3 < 6.13 < 6.13.1.
    fn cmp(&self, o: &Self) -> Ordering {
        (self.major, self.minor)
            .cmp(&(o.major, o.minor))
            .then(self.patch.unwrap_or(0).cmp(&o.patch.unwrap_or(0)))
            .then(match (self.rc, o.rc) {
                (None, None) => Ordering::Equal,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(a), Some(b)) => a.cmp(&b),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Where a tarball comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarballSource {
    Local(PathBuf),
    Url(String),
}

/// One parsed `--kernel` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSpec {
    Version(Version),
    Range { from: Version, to: Version },
    Tarball(TarballSource),
    Git { url: String, git_ref: String },
    Path(PathBuf),
    CacheKey(String),
}

const TARBALL_EXTS: &[&str] = &[".tar.xz", ".tar.gz", ".tgz"];

fn is_tarball_name(s: &str) -> bool {
    TARBALL_EXTS.iter().any(|e| s.ends_with(e))
}

/// True when `s` has the shape of a cache key (`…-{arch}-kc{8 hex}`).
pub fn looks_like_cache_key(s: &str) -> bool {
    let Some((head, kc)) = s.rsplit_once("-kc") else { return false };
    kc.len() == 8
        && kc.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && !s.contains('/')
        && (head.contains("-tarball-") || head.contains("-git-") || head.starts_with("local-"))
}

impl KernelSpec {
    /// Parses one spec. Pure syntax, except that a bare word without `/` is
    /// only taken as a path when it exists (so typos get the forms list).
    pub fn parse(raw: &str) -> Result<KernelSpec, SpecError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(SpecError::new(raw, "empty spec"));
        }
        if let Some(rest) = s.strip_prefix("git+") {
            let Some((url, git_ref)) = rest.split_once('#') else {
                return Err(SpecError::new(raw, "git spec needs a ref: git+URL#REF (tag, branch or commit)"));
            };
            if url.is_empty() || !url.contains("://") {
                return Err(SpecError::new(raw, "git spec needs a URL after git+ (https://, http://, ssh://, git:// or file://)"));
            }
            if git_ref.is_empty() {
                return Err(SpecError::new(raw, "empty ref after '#': give a tag, branch or commit"));
            }
            return Ok(KernelSpec::Git { url: url.to_string(), git_ref: git_ref.to_string() });
        }
        if let Some((scheme, rest)) = s.split_once("://") {
            return match scheme {
                "http" | "https" if is_tarball_name(s) => {
                    Ok(KernelSpec::Tarball(TarballSource::Url(s.to_string())))
                }
                "file" if is_tarball_name(s) => {
                    Ok(KernelSpec::Tarball(TarballSource::Local(PathBuf::from(rest))))
                }
                "http" | "https" | "file" => Err(SpecError::new(
                    raw,
                    "a URL must name a .tar.xz or .tar.gz tarball (use git+URL#REF for a repository)",
                )),
                _ => Err(SpecError::new(raw, format!("unknown scheme {scheme:?}"))),
            };
        }
        // Something that starts with a digit and holds ".." is a range attempt,
        // not a path like `../linux`.
        if s.starts_with(|c: char| c.is_ascii_digit()) && s.contains("..") && !s.contains('/') {
            let (a, b) = s.split_once("..").unwrap();
            let from = Version::parse(a);
            let to = Version::parse(b);
            return match (from, to) {
                (Some(from), Some(to)) if from > to => Err(SpecError::new(
                    raw,
                    format!("inverted range, swap the endpoints: {to}..{from}"),
                )),
                (Some(from), Some(to)) => Ok(KernelSpec::Range { from, to }),
                _ => Err(SpecError::new(raw, "a range needs two versions: FROM..TO, e.g. 6.10..6.12")),
            };
        }
        if let Some(v) = Version::parse(s) {
            return Ok(KernelSpec::Version(v));
        }
        if looks_like_cache_key(s) {
            return Ok(KernelSpec::CacheKey(s.to_string()));
        }
        if is_tarball_name(s) {
            return Ok(KernelSpec::Tarball(TarballSource::Local(PathBuf::from(s))));
        }
        if s.contains('/') || s.starts_with('.') || s.starts_with('~') || std::path::Path::new(s).exists() {
            return Ok(KernelSpec::Path(expand_tilde(s)));
        }
        if s.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(SpecError::new(raw, "not a version: use X.Y, X.Y.Z or X.Y-rcN"));
        }
        Err(SpecError::new(raw, "not a version, range, tarball, git URL, existing path or cache key"))
    }
}

fn expand_tilde(s: &str) -> PathBuf {
    match (s.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(s),
    }
}

impl fmt::Display for KernelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelSpec::Version(v) => write!(f, "{v}"),
            KernelSpec::Range { from, to } => write!(f, "{from}..{to}"),
            KernelSpec::Tarball(TarballSource::Local(p)) => write!(f, "{}", p.display()),
            KernelSpec::Tarball(TarballSource::Url(u)) => write!(f, "{u}"),
            KernelSpec::Git { url, git_ref } => write!(f, "git+{url}#{git_ref}"),
            KernelSpec::Path(p) => write!(f, "{}", p.display()),
            KernelSpec::CacheKey(k) => write!(f, "{k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions() {
        assert_eq!(KernelSpec::parse("6.12").unwrap(), KernelSpec::Version(v("6.12")));
        assert_eq!(v("6.12").patch, None);
        assert_eq!(v("6.12.9").patch, Some(9));
        assert_eq!(v("6.13-rc3").rc, Some(3));
        assert_eq!(v("6.13-rc3").to_string(), "6.13-rc3");
        assert!(v("6.13-rc3") < v("6.13"));
        assert!(v("6.13") < v("6.13.1"));
        assert!(v("6.9.12") < v("6.10"));
        for bad in ["6", "6.", "6.x", "6.12.9.1", "6.12.9-rc1", "6.12-rc", "-6.12"] {
            assert_eq!(Version::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn range() {
        assert_eq!(
            KernelSpec::parse("6.10..6.12").unwrap(),
            KernelSpec::Range { from: v("6.10"), to: v("6.12") }
        );
        let e = KernelSpec::parse("6.12..6.10").unwrap_err();
        assert!(e.to_string().contains("swap the endpoints"), "{e}");
        assert!(e.to_string().contains("6.10..6.12"), "{e}");
        let e = KernelSpec::parse("6..").unwrap_err();
        assert!(e.reason.contains("two versions"), "{e}");
        assert!(KernelSpec::parse("6.10..").is_err());
        assert!(KernelSpec::parse("6.10..x").is_err());
    }

    #[test]
    fn tarballs() {
        assert_eq!(
            KernelSpec::parse("/srv/linux-6.12.tar.xz").unwrap(),
            KernelSpec::Tarball(TarballSource::Local("/srv/linux-6.12.tar.xz".into()))
        );
        assert_eq!(
            KernelSpec::parse("linux.tar.gz").unwrap(),
            KernelSpec::Tarball(TarballSource::Local("linux.tar.gz".into()))
        );
        assert_eq!(
            KernelSpec::parse("https://x.org/linux-6.12.tar.xz").unwrap(),
            KernelSpec::Tarball(TarballSource::Url("https://x.org/linux-6.12.tar.xz".into()))
        );
        assert_eq!(
            KernelSpec::parse("file:///srv/l.tar.gz").unwrap(),
            KernelSpec::Tarball(TarballSource::Local("/srv/l.tar.gz".into()))
        );
        assert!(KernelSpec::parse("https://x.org/linux").is_err());
    }

    #[test]
    fn git() {
        assert_eq!(
            KernelSpec::parse("git+https://h/r.git#v6.12").unwrap(),
            KernelSpec::Git { url: "https://h/r.git".into(), git_ref: "v6.12".into() }
        );
        assert_eq!(
            KernelSpec::parse("git+file:///srv/linux#abc1234").unwrap(),
            KernelSpec::Git { url: "file:///srv/linux".into(), git_ref: "abc1234".into() }
        );
        let e = KernelSpec::parse("git+https://h/r.git").unwrap_err();
        assert!(e.reason.contains("#REF"), "{e}");
        assert!(KernelSpec::parse("git+https://h/r.git#").is_err());
        assert!(KernelSpec::parse("git+").is_err());
        assert!(KernelSpec::parse("git+#v1").is_err());
    }

    #[test]
    fn paths_and_keys() {
        assert_eq!(KernelSpec::parse("../linux").unwrap(), KernelSpec::Path("../linux".into()));
        assert_eq!(
            KernelSpec::parse("/boot/vmlinuz-6.12").unwrap(),
            KernelSpec::Path("/boot/vmlinuz-6.12".into())
        );
        for k in [
            "6.12.9-tarball-x86_64-kc1a2b3c4d",
            "v6.12-git-abcdef1-x86_64-kc00000000",
            "local-abcdef1-x86_64-kcdeadbeef",
        ] {
            assert_eq!(KernelSpec::parse(k).unwrap(), KernelSpec::CacheKey(k.into()), "{k}");
        }
        // A key-looking string with a bad kc is not a key.
        assert!(KernelSpec::parse("6.12.9-tarball-x86_64-kcXYZ").is_err());
    }

    #[test]
    fn malformed() {
        for bad in ["", "   ", "ftp://h/linux.tar.xz", "svn+https://h/r#1", "nonsense-word", "6", "6.x"] {
            let e = KernelSpec::parse(bad).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("accepted forms"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        assert!(KernelSpec::parse("ftp://h/linux.tar.xz").unwrap_err().reason.contains("unknown scheme"));
    }

    #[test]
    fn display_roundtrip() {
        for s in ["6.12", "6.10..6.12", "git+https://h/r#main", "/srv/x.tar.xz"] {
            assert_eq!(KernelSpec::parse(s).unwrap().to_string(), s);
        }
    }
}
