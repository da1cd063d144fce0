//! A save's files read once: the data extents of sparse files (found with
//! SEEK_DATA/SEEK_HOLE; guest RAM is mostly holes) fed to a CRC32, and,
//! for a restore, copied into the VM's own RAM files at the same time.
//!
//! The sum covers each non-zero 4 KiB page with its offset and skips zero
//! pages, so it is the same whether a zero page is a hole or allocated: a
//! KVM restore maps the RAM file privately, and on tmpfs a guest reading
//! a hole fills it with a zero page (SEEK_DATA then reports data there).

use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const PAGE: u64 = 4096;

/// True if every byte of `b` is zero (8 bytes at a time).
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to keeps every byte in one of the three parts.
    let (head, mid, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// CRC32 over files' lengths and their non-zero pages (offset and data),
/// and how many bytes those pages hold.
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
            let mut off = data as u64;
            while off < hole as u64 {
                let n = buf.len().min((hole as u64 - off) as usize);
                from.read_exact_at(&mut buf[..n], off)?;
                self.pages(off, &buf[..n]);
                if let Some(t) = &to {
                    t.write_all_at(&buf[..n], off)?;
                }
                off += n as u64;
            }
            pos = hole;
        }
        Ok(())
    }

    /// Feeds the non-zero pages of `data`, read at file offset `off`.
    fn pages(&mut self, off: u64, data: &[u8]) {
        // Pages are counted from the file's start: extents may begin mid-page.
        let mut at = 0;
        while at < data.len() {
            let page_end = ((off + at as u64) / PAGE + 1) * PAGE;
            let n = ((page_end - off) as usize - at).min(data.len() - at);
            let p = &data[at..at + n];
            if !is_zero(p) {
                self.h.update(&(off + at as u64).to_le_bytes());
                self.h.update(p);
                self.read += n as u64;
            }
            at += n;
        }
    }

    /// The CRC32 and the bytes of non-zero pages.
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

    #[test]
    fn sum_is_the_same_for_a_hole_and_an_allocated_zero_page() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ram0");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"data", 8192 + 100).unwrap();
        let sparse = files_crc(std::slice::from_ref(&p)).unwrap();
        assert_eq!(sparse.1, 4096, "one non-zero page");
        // Zeros written over holes (what tmpfs does when a private mapping reads them).
        f.write_all_at(&[0u8; 8192], 0).unwrap();
        f.write_all_at(&[0u8; 4096], 12288).unwrap();
        assert_eq!(files_crc(std::slice::from_ref(&p)).unwrap(), sparse);
        let sparse = sparse.0;
        // A page that became zero, and a moved byte, are changes.
        f.write_all_at(&[0u8; 4], 8192 + 100).unwrap();
        assert_ne!(files_crc(std::slice::from_ref(&p)).unwrap().0, sparse);
        f.write_all_at(b"data", 8192 + 101).unwrap();
        assert_ne!(files_crc(std::slice::from_ref(&p)).unwrap().0, sparse);
    }
}
