//! Streamed tarball fetch: download → decompress → extract, never holding
//! the whole archive in memory, refusing members that escape the target.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::progress::ProgressReader;
use crate::spec::TarballSource;
use crate::tree;

/// GET with no overall timeout (kernel tarballs are large), failing on HTTP errors.
pub fn http_get(url: &str) -> Result<reqwest::blocking::Response> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(None)
        .user_agent(concat!("ktstr-kernel-build/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let resp = client.get(url).send().with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        bail!("GET {url}: HTTP {status}");
    }
    Ok(resp)
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

    #[test]
    fn member_checks() {
        assert!(check_member(Path::new("linux/Makefile")).is_ok());
        assert!(check_member(Path::new("./linux/Makefile")).is_ok());
        assert!(check_member(Path::new("../evil")).is_err());
        assert!(check_member(Path::new("linux/../../evil")).is_err());
        assert!(check_member(Path::new("/etc/passwd")).is_err());
    }
}
