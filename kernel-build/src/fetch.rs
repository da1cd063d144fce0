//! Streamed tarball fetch: download → decompress → extract, never holding
//! the whole archive in memory, refusing members that escape the target.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use sha2::{Digest, Sha256};

use crate::hex;

use crate::progress::ProgressReader;
use crate::spec::TarballSource;
use crate::tree;

/// The server could not be reached at all (no HTTP answer): callers with a
/// cache to fall back on branch on this.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach {url}: {reason}")]
pub struct Unreachable {
    pub url: String,
    pub reason: String,
}

/// The server answered with an HTTP error status.
#[derive(Debug, thiserror::Error)]
#[error("GET {url}: HTTP {status}")]
pub struct HttpStatus {
    pub url: String,
    pub status: u16,
}

/// True when `e` (or anything in its chain) is [`Unreachable`].
pub fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Unreachable>())
}

/// GET with no overall timeout (kernel tarballs are large), failing on HTTP errors.
pub fn http_get(url: &str) -> Result<reqwest::blocking::Response> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(None)
        .user_agent(concat!("ktstr-kernel-build/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let resp = client.get(url).send().map_err(|e| {
        // Innermost cause, e.g. "Connection refused (os error 111)".
        let reason = std::error::Error::source(&e)
            .map(|mut s| {
                while let Some(n) = s.source() {
                    s = n;
                }
                s.to_string()
            })
            .unwrap_or_else(|| e.to_string());
        Unreachable { url: url.to_string(), reason }
    })?;
    let status = resp.status();
    if !status.is_success() {
        return Err(HttpStatus { url: url.to_string(), status: status.as_u16() }.into());
    }
    Ok(resp)
}

/// A downloaded tarball's SHA-256 does not match what the mirror publishes.
#[derive(Debug, thiserror::Error)]
#[error("{file}: SHA-256 mismatch: the mirror's sha256sums.asc says {expected}, the download is {actual}; nothing was cached")]
pub struct ChecksumMismatch {
    pub file: String,
    pub expected: String,
    pub actual: String,
}

/// Hashes every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new() }
    }

    /// Lowercase hex SHA-256 of what was read so far.
    pub fn hex(self) -> String {
        hex(&self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}


/// Lowercase hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = File::open(path).with_context(|| format!("cannot open tarball {}", path.display()))?;
    let mut h = HashingReader::new(BufReader::with_capacity(1 << 20, f));
    std::io::copy(&mut h, &mut std::io::sink()).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.hex())
}

/// Downloads `url` (http(s) or file://) to the new file `dest`, showing
/// progress, and returns the SHA-256 of the bytes.
pub fn download(url: &str, dest: &Path) -> Result<String> {
    let (raw, len) = open_raw(&TarballSource::Url(url.to_string()))?;
    let mut hashed = HashingReader::new(ProgressReader::new(raw, len, &format!("fetching {url}")));
    let mut out = File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    std::io::copy(&mut hashed, &mut out).with_context(|| format!("downloading {url}"))?;
    out.sync_all().ok();
    hashed.inner.finish();
    Ok(hashed.hex())
}

/// Human name of a source, for messages.
pub fn source_name(src: &TarballSource) -> String {
    match src {
        TarballSource::Local(p) => p.display().to_string(),
        TarballSource::Url(u) => u.clone(),
    }
}

/// Opens the raw (compressed) byte stream and its size when known.
fn open_raw(src: &TarballSource) -> Result<(Box<dyn Read + Send>, Option<u64>)> {
    match src {
        TarballSource::Local(p) => {
            let f = File::open(p).with_context(|| format!("cannot open tarball {}", p.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            Ok((Box::new(f), len))
        }
        TarballSource::Url(u) => {
            if let Some(p) = u.strip_prefix("file://") {
                return open_raw(&TarballSource::Local(PathBuf::from(p)));
            }
            let resp = http_get(u)?;
            let len = resp.content_length();
            Ok((Box::new(resp), len))
        }
    }
}

/// Picks the decompressor from the stream's magic bytes, not the file name.
fn decompress<'a>(raw: impl Read + 'a, name: &str) -> Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(1 << 16, raw);
    let head = br.fill_buf().with_context(|| format!("reading {name}"))?;
    if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Ok(Box::new(xz2::bufread::XzDecoder::new_multi_decoder(br)))
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(br)))
    } else if head.is_empty() {
        bail!("{name} is empty")
    } else {
        bail!("{name} is neither xz nor gzip compressed (expected .tar.xz or .tar.gz)")
    }
}

/// Refuses absolute paths and `..`: such a member would land outside `dest`.
fn check_member(path: &Path) -> Result<()> {
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => bail!("archive member {:?} would land outside the extraction directory", path),
        }
    }
    Ok(())
}

/// Extracts a tar stream into `dest` (which must exist).
pub fn extract_tar(reader: impl Read, dest: &Path) -> Result<()> {
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        check_member(&path)?;
        if let Some(link) = entry.link_name()? {
            // Hard links name another member: it must stay inside too.
            if entry.header().entry_type().is_hard_link() {
                check_member(&link)?;
            }
        }
        if !entry.unpack_in(dest).with_context(|| format!("extracting {}", path.display()))? {
            bail!("archive member {:?} would land outside the extraction directory", path);
        }
    }
    // Drain the rest so the decompressor verifies the stream's end and checksum.
    std::io::copy(&mut ar.into_inner(), &mut std::io::sink())?;
    Ok(())
}

/// Streams `src` into the new directory `dest` and returns the source tree
/// root inside it. On any error `dest` is removed: nothing is left behind.
pub fn extract(src: &TarballSource, dest: &Path) -> Result<PathBuf> {
    let name = source_name(src);
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let res = (|| {
        let (raw, len) = open_raw(src)?;
        let mut counted = ProgressReader::new(raw, len, &format!("fetching {name}"));
        let dec = decompress(&mut counted, &name)?;
        extract_tar(dec, dest).map_err(|e| anyhow!("corrupt or truncated archive {name}: {e:#}"))?;
        counted.finish();
        tree::find_source_root(dest).ok_or_else(|| anyhow!("archive {name} holds no kernel source tree (no top-level Makefile and Kconfig)"))
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(dest);
    }
    res
}

/// Reads the kernel version from the tarball's top-level Makefile without
/// extracting anything (stops at that member). `None` if the archive has none.
pub fn tarball_version(src: &TarballSource) -> Result<Option<String>> {
    let name = source_name(src);
    let (raw, _) = open_raw(src)?;
    let dec = decompress(raw, &name)?;
    let mut ar = tar::Archive::new(dec);
    let scan = (|| -> std::io::Result<Option<String>> {
        for entry in ar.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let comps: Vec<_> = path.components().filter(|c| !matches!(c, Component::CurDir)).collect();
            let top_makefile = match comps.as_slice() {
                [Component::Normal(f)] | [Component::Normal(_), Component::Normal(f)] => *f == "Makefile",
                _ => false,
            };
            if top_makefile && entry.header().entry_type().is_file() {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                if let Some(v) = tree::parse_makefile_version(&text) {
                    return Ok(Some(v));
                }
            }
        }
        Ok(None)
    })();
    scan.map_err(|e| anyhow!("corrupt or truncated archive {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sha256_hex;

    #[test]
    fn member_checks() {
        assert!(check_member(Path::new("linux/Makefile")).is_ok());
        assert!(check_member(Path::new("./linux/Makefile")).is_ok());
        assert!(check_member(Path::new("../evil")).is_err());
        assert!(check_member(Path::new("linux/../../evil")).is_err());
        assert!(check_member(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn sha256_known_answers() {
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), sha256_hex(b"abc"));
        let out = d.path().join("copy");
        assert_eq!(download(&format!("file://{}", p.display()), &out).unwrap(), sha256_hex(b"abc"));
        assert_eq!(std::fs::read(&out).unwrap(), b"abc");
    }

    #[test]
    fn closed_port_is_unreachable() {
        // Bind then drop: nothing listens on the port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = http_get(&format!("http://127.0.0.1:{port}/v6.x/")).unwrap_err();
        assert!(is_unreachable(&e), "{e:#}");
        assert!(!is_unreachable(&anyhow!("other")));
    }
}
