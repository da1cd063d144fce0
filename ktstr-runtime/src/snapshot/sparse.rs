//! A save's files read once: the data extents of sparse files (found with
//! SEEK_DATA/SEEK_HOLE; guest RAM is mostly holes) fed to a CRC32, and,
//! for a restore, copied into the VM's own RAM files at the same time.

use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// CRC32 over files' lengths, data offsets and data, and the bytes read.
#[derive(Default)]
pub struct Crc {
    h: crc32fast::Hasher,
    read: u64,
}

impl Crc {
    /// Feeds `src`'s data extents; with `dst`, also writes them into a new
    /// `dst` of the same length (the holes stay holes).
    pub fn file(&mut self, src: &Path, dst: Option<&Path>) -> io::Result<()> {
        let from = std::fs::File::open(src)?;
        let len = from.metadata()?.len();
        let to = match dst {
            Some(d) => {
                let f = std::fs::File::create(d)?;
                f.set_len(len)?;
                Some(f)
            }
            None => None,
        };
        self.h.update(&len.to_le_bytes());
        let fd = from.as_raw_fd();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0i64;
        while (pos as u64) < len {
            // SAFETY: lseek on our own descriptor.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                // ENXIO: no data past `pos`.
                return if e.raw_os_error() == Some(libc::ENXIO) { Ok(()) } else { Err(e) };
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            self.h.update(&data.to_le_bytes());
            let mut off = data as u64;
            while off < hole as u64 {
                let n = buf.len().min((hole as u64 - off) as usize);
                from.read_exact_at(&mut buf[..n], off)?;
                self.h.update(&buf[..n]);
                if let Some(t) = &to {
                    t.write_all_at(&buf[..n], off)?;
                }
                off += n as u64;
            }
            self.read += hole as u64 - data as u64;
            pos = hole;
        }
        Ok(())
    }

    /// The CRC32 and the data bytes read.
    pub fn finish(self) -> (u32, u64) {
        (self.h.finalize(), self.read)
    }
}

/// [`Crc`] of `paths`, in order.
pub fn files_crc(paths: &[PathBuf]) -> io::Result<(u32, u64)> {
    let mut c = Crc::default();
    for p in paths {
        c.file(p, None)?;
    }
    Ok(c.finish())
}

/// Copies a save's RAM files (`rams`) into `to` under the same names and
/// checks them, with `state` first, against the save's checksum `want`,
/// in the one read of each.
pub fn copy_checked(state: &Path, rams: &[PathBuf], to: &Path, want: (u32, u64)) -> Result<(), String> {
    let mut c = Crc::default();
    c.file(state, None).map_err(|e| format!("reading {}: {e}", state.display()))?;
    for r in rams {
        let dst = to.join(r.file_name().unwrap_or_default());
        c.file(r, Some(&dst)).map_err(|e| format!("copying {} to {}: {e}", r.display(), dst.display()))?;
    }
    if c.finish() != want {
        let dir = state.parent().unwrap_or(Path::new("."));
        return Err(format!("{} fails its checksum (corrupt)", dir.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_keeps_data_and_holes_and_sums_what_it_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("ram0"), dir.path().join("copy"));
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[0xab; 3 << 20], 17 << 20).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let mut c = Crc::default();
        c.file(&src, Some(&dst)).unwrap();
        let (crc, read) = c.finish();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(blocks < 16 << 20, "the holes were filled: {blocks} bytes allocated");
        assert!(read < 16 << 20, "holes are not read: {read}");
        // The same sum as reading the files alone, and another for a changed byte.
        assert_eq!(files_crc(std::slice::from_ref(&src)).unwrap(), (crc, read));
        f.write_all_at(&[0xac], 18 << 20).unwrap();
        assert_ne!(files_crc(&[src]).unwrap().0, crc);
        assert!(Crc::default().file(&dir.path().join("missing"), Some(&dst)).is_err());
    }
}
