//! Release mirror in kernel.org's layout: `{base}v6.x/linux-6.12.9.tar.xz`.

use std::collections::BTreeSet;
use std::io::Read;

use anyhow::{bail, Context, Result};

use crate::spec::Version;

/// kernel.org's release tree; `--mirror` / `KTSTR_KERNEL_MIRROR` override it.
pub const DEFAULT_MIRROR: &str = "https://cdn.kernel.org/pub/linux/kernel/";

/// Environment variable naming the mirror base URL.
pub const MIRROR_ENV: &str = "KTSTR_KERNEL_MIRROR";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    base: String,
}

impl Mirror {
    /// `explicit` (from `--mirror`) wins over the environment, then the default.
    pub fn new(explicit: Option<&str>) -> Mirror {
        let base = explicit
            .map(str::to_string)
            .or_else(|| std::env::var(MIRROR_ENV).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| DEFAULT_MIRROR.to_string());
        Mirror::with_base(&base)
    }

    pub fn with_base(base: &str) -> Mirror {
        let mut base = base.to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        Mirror { base }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn series_url(&self, major: u32) -> String {
        format!("{}v{major}.x/", self.base)
    }

    /// Where the tarball of `v` lives. kernel.org serves release candidates
    /// only as git.kernel.org snapshots; other mirrors keep them in `testing/`.
    pub fn tarball_url(&self, v: &Version) -> String {
        if v.rc.is_some() && self.base == DEFAULT_MIRROR {
            return format!("https://git.kernel.org/torvalds/t/linux-{v}.tar.gz");
        }
        let testing = if v.rc.is_some() { "testing/" } else { "" };
        format!("{}{testing}linux-{v}.tar.xz", self.series_url(v.major))
    }

    /// Every release the mirror lists for major version `major`.
    pub fn releases(&self, major: u32) -> Result<Vec<Version>> {
        let url = self.series_url(major);
        let listing = fetch_text(&url).with_context(|| format!("cannot read release list {url}"))?;
        let mut out: Vec<Version> = parse_listing(&listing).into_iter().collect();
        out.sort();
        Ok(out)
    }

    /// Pins `v`: `X.Y` becomes the newest `X.Y.Z` (or `X.Y`) the mirror lists.
    pub fn resolve(&self, v: &Version) -> Result<Version> {
        if !v.is_series() {
            return Ok(*v);
        }
        let rels = self.releases(v.major)?;
        match rels.iter().filter(|r| r.same_series(v) && r.rc.is_none()).max() {
            Some(r) => Ok(*r),
            None => bail!("mirror {} lists no {v} release (looked in {})", self.base, self.series_url(v.major)),
        }
    }

    /// Expands `from..to`. With `X.Y` endpoints: the newest release of every
    /// series in between. With patch levels: every listed release in between.
    pub fn expand_range(&self, from: &Version, to: &Version) -> Result<Vec<Version>> {
        let mut all = Vec::new();
        for major in from.major..=to.major {
            match self.releases(major) {
                Ok(r) => all.extend(r),
                // A major with no directory (yet) just adds nothing.
                Err(e) if major != from.major && major != to.major => drop(e),
                Err(e) => return Err(e),
            }
        }
        let in_range = |r: &Version| {
            r.rc.is_none()
                && (if from.is_series() { (r.major, r.minor) >= (from.major, from.minor) } else { r >= from })
                && (if to.is_series() { (r.major, r.minor) <= (to.major, to.minor) } else { r <= to })
        };
        let mut picked: Vec<Version> = all.into_iter().filter(in_range).collect();
        picked.sort();
        picked.dedup();
        if from.is_series() && to.is_series() {
            // Newest patch release of each series.
            let mut newest: Vec<Version> = Vec::new();
            for r in picked {
                match newest.last_mut() {
                    Some(last) if last.same_series(&r) => *last = r,
                    _ => newest.push(r),
                }
            }
            picked = newest;
        }
        if picked.is_empty() {
            bail!("mirror {} lists no release in {from}..{to}", self.base);
        }
        Ok(picked)
    }
}

/// Where the mirror publishes the SHA-256 sums of the tarball at `tarball_url`:
/// `sha256sums.asc` in the same directory (kernel.org layout).
pub fn sums_url(tarball_url: &str) -> String {
    let dir = tarball_url.rsplit_once('/').map(|(d, _)| d).unwrap_or(tarball_url);
    format!("{dir}/sha256sums.asc")
}

impl Mirror {
    /// True when `v` comes from this mirror's release tree (and so can be
    /// checked against its sums); kernel.org's rc snapshots do not.
    pub fn publishes_sums(&self, v: &Version) -> bool {
        !(v.rc.is_some() && self.base == DEFAULT_MIRROR)
    }

    /// The SHA-256 the mirror publishes for `v`'s tarball. The PGP signature
    /// of `sha256sums.asc` is not checked: this guards against corrupt or
    /// swapped downloads, not against a compromised mirror.
    pub fn expected_sha256(&self, v: &Version) -> Result<String> {
        let url = self.tarball_url(v);
        let file = url.rsplit('/').next().unwrap_or(&url).to_string();
        let sums = sums_url(&url);
        let hint = "use a mirror in kernel.org layout that publishes sha256sums.asc (--mirror / KTSTR_KERNEL_MIRROR), \
                    or pass the tarball itself as a TARBALL spec (keyed by its own SHA-256)";
        let text = match fetch_file(&sums) {
            Ok(t) => t,
            Err(e) if crate::fetch::is_unreachable(&e) => return Err(e),
            Err(e) => bail!("cannot verify {file}: no checksum list at {sums} ({e:#}); {hint}"),
        };
        match parse_sums(&text).into_iter().find(|(_, f)| *f == file) {
            Some((sum, _)) => Ok(sum),
            None => bail!("cannot verify {file}: {sums} has no line for it; {hint}"),
        }
    }
}

/// `(sha256, file name)` pairs of a sums file (`<hex>  <name>` lines; the
/// clear-signed armour and blank lines are skipped).
pub fn parse_sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (sum, name) = (it.next()?, it.next()?);
            (sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()) && it.next().is_none())
                .then(|| (sum.to_ascii_lowercase(), name.trim_start_matches('*').to_string()))
        })
        .collect()
}

/// The body of a small file: http(s) GET or a `file://` read.
fn fetch_file(url: &str) -> Result<String> {
    if let Some(path) = url.strip_prefix("file://") {
        return std::fs::read_to_string(path).with_context(|| format!("reading {path}"));
    }
    let mut body = String::new();
    crate::fetch::http_get(url)?.read_to_string(&mut body).with_context(|| format!("reading {url}"))?;
    Ok(body)
}

/// Reads a directory listing: HTTP(S) index page, or a `file://` directory.
fn fetch_text(url: &str) -> Result<String> {
    if let Some(path) = url.strip_prefix("file://") {
        let mut names = String::new();
        for e in std::fs::read_dir(path)? {
            names.push_str(&e?.file_name().to_string_lossy());
            names.push('\n');
        }
        return Ok(names);
    }
    let mut body = String::new();
    crate::fetch::http_get(url)?
        .read_to_string(&mut body)
        .with_context(|| format!("reading {url}"))?;
    Ok(body)
}

/// Pulls every `linux-VERSION.tar.{xz,gz}` name out of a listing (HTML or plain).
pub fn parse_listing(text: &str) -> BTreeSet<Version> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("linux-") {
        rest = &rest[i + "linux-".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        for ext in [".tar.xz", ".tar.gz"] {
            if let Some(ver) = name.strip_suffix(ext) {
                if let Some(v) = Version::parse(ver) {
                    out.insert(v);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = r#"<html><body><pre>
<a href="../">../</a>
<a href="ChangeLog-6.12.1">ChangeLog-6.12.1</a>
<a href="linux-6.10.tar.xz">linux-6.10.tar.xz</a>  01-Jan-2024 00:00  140M
<a href="linux-6.10.14.tar.xz">linux-6.10.14.tar.xz</a>
<a href="linux-6.10.14.tar.sign">linux-6.10.14.tar.sign</a>
<a href="linux-6.11.11.tar.gz">linux-6.11.11.tar.gz</a>
<a href="linux-6.12.tar.xz">linux-6.12.tar.xz</a>
<a href="linux-6.12.9.tar.xz">linux-6.12.9.tar.xz</a>
<a href="linux-6.12.10.tar.xz">linux-6.12.10.tar.xz</a>
<a href="patch-6.12.10.xz">patch-6.12.10.xz</a>
</pre></body></html>"#;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn listing() {
        let got: Vec<String> = parse_listing(LISTING).iter().map(|v| v.to_string()).collect();
        assert_eq!(got, ["6.10", "6.10.14", "6.11.11", "6.12", "6.12.9", "6.12.10"]);
    }

    #[test]
    fn urls() {
        let m = Mirror::with_base("http://127.0.0.1:8000");
        assert_eq!(m.tarball_url(&v("6.12.9")), "http://127.0.0.1:8000/v6.x/linux-6.12.9.tar.xz");
        assert_eq!(m.tarball_url(&v("6.13-rc3")), "http://127.0.0.1:8000/v6.x/testing/linux-6.13-rc3.tar.xz");
        let k = Mirror::with_base(DEFAULT_MIRROR);
        assert_eq!(k.tarball_url(&v("6.12.9")), "https://cdn.kernel.org/pub/linux/kernel/v6.x/linux-6.12.9.tar.xz");
        assert_eq!(k.tarball_url(&v("6.13-rc3")), "https://git.kernel.org/torvalds/t/linux-6.13-rc3.tar.gz");
    }

    #[test]
    fn sums() {
        let text = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n\
            0123456789abcdef0123456789abcdef0123456789abcdef0123456789ABCDEF  linux-6.12.9.tar.xz\n\
            1111111111111111111111111111111111111111111111111111111111111111  linux-6.12.9.tar.gz\n\
            -----BEGIN PGP SIGNATURE-----\n\niQIzBAEBCAAdFiEE\n-----END PGP SIGNATURE-----\n";
        let s = parse_sums(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], ("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(), "linux-6.12.9.tar.xz".into()));
        assert_eq!(sums_url("http://m/v6.x/linux-6.12.9.tar.xz"), "http://m/v6.x/sha256sums.asc");

        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("v6.x")).unwrap();
        let m = Mirror::with_base(&format!("file://{}", d.path().display()));
        let e = m.expected_sha256(&v("6.12.9")).unwrap_err().to_string();
        assert!(e.contains("cannot verify linux-6.12.9.tar.xz") && e.contains("--mirror"), "{e}");
        std::fs::write(d.path().join("v6.x/sha256sums.asc"), text).unwrap();
        assert_eq!(m.expected_sha256(&v("6.12.9")).unwrap(), s[0].0);
        let e = m.expected_sha256(&v("6.12.8")).unwrap_err().to_string();
        assert!(e.contains("has no line for it"), "{e}");
        assert!(!Mirror::with_base(DEFAULT_MIRROR).publishes_sums(&v("6.13-rc3")));
        assert!(Mirror::with_base(DEFAULT_MIRROR).publishes_sums(&v("6.12.9")));
    }

    #[test]
    fn file_mirror_resolve_and_range() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("v6.x");
        std::fs::create_dir(&s).unwrap();
        for n in ["linux-6.10.tar.xz", "linux-6.10.3.tar.xz", "linux-6.11.tar.xz", "linux-6.12.2.tar.xz", "linux-6.12.10.tar.xz"] {
            std::fs::write(s.join(n), b"").unwrap();
        }
        let m = Mirror::with_base(&format!("file://{}", d.path().display()));
        assert_eq!(m.resolve(&v("6.12")).unwrap(), v("6.12.10"));
        assert_eq!(m.resolve(&v("6.12.2")).unwrap(), v("6.12.2"));
        assert!(m.resolve(&v("6.9")).is_err());
        let r: Vec<String> = m.expand_range(&v("6.10"), &v("6.12")).unwrap().iter().map(|v| v.to_string()).collect();
        assert_eq!(r, ["6.10.3", "6.11", "6.12.10"]);
        let r: Vec<String> = m.expand_range(&v("6.10.3"), &v("6.12.2")).unwrap().iter().map(|v| v.to_string()).collect();
        assert_eq!(r, ["6.10.3", "6.11", "6.12.2"]);
        assert!(m.expand_range(&v("6.13"), &v("6.14")).is_err());
    }
}
