//! The inbox: how the host hands a restored guest its test.
//!
//! A guest waiting at the ready point has the data channel's region
//! mapped and idle, so the host writes into it (the region is guest RAM,
//! a file the host maps). Stop-and-wait chunks: the host puts a chunk at
//! [`DATA_OFF`], its length at [`OFF_LEN`], then the chunk's number at
//! [`OFF_SEQ`]; the guest copies it out and stores that number at
//! [`OFF_ACK`]; then the next. The stream is `[total u64][header_len u32]
//! [header JSON][newc archive]`, the archive being the one a cold boot
//! packs as its initramfs (test binary as `/init`, libraries, include
//! files, host tools, scheduler), so a restored guest ends up with the
//! same files a cold one has.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

use crate::channel::HEADER_SIZE;

/// Header words the inbox uses, past the channel's own (magic, capacity, committed).
pub const OFF_SEQ: usize = 2048;
pub const OFF_LEN: usize = 2056;
pub const OFF_ACK: usize = 2064;
// The channel's committed length: the guest zeroes it before it execs
// the test, so the host does not take the ready init's INIT for the test's.
use crate::channel::OFF_COMMITTED;
/// Uplink room for the ready init's messages, before the inbox's chunks.
pub const READY_UPLINK: usize = 64 * 1024;
/// Chunks start here.
pub const DATA_OFF: usize = HEADER_SIZE as usize + READY_UPLINK;
const PREFIX: usize = 12;

/// What a restored guest runs: the test (and gauntlet preset) by name,
/// the vCPU count `KTSTR_CPUS` resized it to, and the archive of files it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    pub test: String,
    pub preset: Option<String>,
    pub cpus: Option<u32>,
    /// A newc archive (what `host::test_initramfs` builds).
    pub archive: PathBuf,
}

/// The stream's JSON header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub test: String,
    pub preset: Option<String>,
    /// `KTSTR_CPUS` (what a cold boot passes as `ktstr.cpus=N`).
    pub cpus: Option<u32>,
    /// Host `CLOCK_REALTIME` when the stream started, in ns since the epoch.
    pub host_time_ns: u64,
    /// Bytes the guest mixes into its random pool before the test.
    pub seed: Vec<u8>,
}

impl Header {
    /// A header for `p` with the host's time now and fresh random bytes.
    pub fn now(p: &Payload) -> io::Result<Self> {
        let mut seed = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
        let host_time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(io::Error::other)?
            .as_nanos() as u64;
        Ok(Self {
            test: p.test.clone(),
            preset: p.preset.clone(),
            cpus: p.cpus,
            host_time_ns,
            seed,
        })
    }
}

/// The host's view of the region: write bytes, read a word.
pub trait Window {
    fn write_at(&mut self, off: usize, data: &[u8]) -> io::Result<()>;
    fn read_u64(&mut self, off: usize) -> io::Result<u64>;
}

/// The region inside a guest RAM file (the QEMU backend's view).
pub struct FileWindow {
    pub file: std::fs::File,
    pub base: u64,
}

impl Window for FileWindow {
    fn write_at(&mut self, off: usize, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, self.base + off as u64)
    }
    fn read_u64(&mut self, off: usize) -> io::Result<u64> {
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut b, self.base + off as u64)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Where a [`Sender`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The guest has not taken the last chunk yet.
    Waiting,
    /// A new chunk went out.
    Sent,
    /// The guest took every byte.
    Done,
}

/// Host side: feeds the stream to the guest one chunk at a time.
pub struct Sender<W: Window> {
    w: W,
    stream: Box<dyn Read + Send>,
    chunk: usize,
    total: u64,
    sent: u64,
    seq: u64,
}

impl<W: Window> Sender<W> {
    /// A sender for `header` and the archive at `p.archive` into a region
    /// of `region_len` bytes.
    pub fn new(w: W, region_len: usize, p: &Payload, header: &Header) -> io::Result<Self> {
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        let archive = std::fs::File::open(&p.archive).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("payload archive {}: {e}", p.archive.display()),
            )
        })?;
        let alen = archive.metadata()?.len();
        let total = (PREFIX + json.len()) as u64 + alen;
        let mut head = Vec::with_capacity(PREFIX + json.len());
        head.extend_from_slice(&total.to_le_bytes());
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&json);
        let chunk = region_len
            .checked_sub(DATA_OFF)
            .filter(|&c| c >= 4096)
            .ok_or_else(|| {
                io::Error::other(format!(
                    "data channel of {region_len} bytes is too small for the inbox"
                ))
            })?;
        Ok(Self {
            w,
            stream: Box::new(io::Cursor::new(head).chain(io::BufReader::new(archive))),
            chunk,
            total,
            sent: 0,
            seq: 0,
        })
    }

    /// Sends the next chunk when the guest took the last one.
    pub fn pump(&mut self) -> io::Result<Progress> {
        if self.seq > 0 && self.w.read_u64(OFF_ACK)? != self.seq {
            return Ok(Progress::Waiting);
        }
        if self.seq > 0 && self.sent == self.total {
            return Ok(Progress::Done);
        }
        let mut buf = vec![0u8; self.chunk.min((self.total - self.sent) as usize)];
        self.stream.read_exact(&mut buf)?;
        self.w.write_at(DATA_OFF, &buf)?;
        self.w
            .write_at(OFF_LEN, &(buf.len() as u64).to_le_bytes())?;
        // The number last: the guest reads the chunk only once it changes.
        fence(Ordering::Release);
        self.seq += 1;
        self.w.write_at(OFF_SEQ, &self.seq.to_le_bytes())?;
        self.sent += buf.len() as u64;
        Ok(Progress::Sent)
    }

    pub fn sent(&self) -> u64 {
        self.sent
    }
    pub fn total(&self) -> u64 {
        self.total
    }
}

/// Guest side: the stream as a [`Read`] over the mapped region.
pub struct Inbox {
    base: *mut u8,
    len: usize,
    seq: u64,
    pos: usize,
    chunk_len: usize,
}

// SAFETY: the pointer is a mapping owned by the guest's channel for the
// life of the process; one Inbox reads it at a time.
unsafe impl Send for Inbox {}

impl Inbox {
    /// # Safety
    /// `base` must point to `len` mapped, writable bytes that stay mapped
    /// while the inbox is used, with the host as the only other writer.
    pub unsafe fn new(base: *mut u8, len: usize) -> Self {
        assert!(len > DATA_OFF, "region too small for the inbox");
        Self {
            base,
            len,
            seq: 0,
            pos: 0,
            chunk_len: 0,
        }
    }

    fn word(&self, off: usize) -> u64 {
        // SAFETY: off + 8 <= HEADER_SIZE < len, 8-aligned, inside the mapping (see `new`).
        u64::from_le(unsafe { std::ptr::read_volatile(self.base.add(off) as *const u64) })
    }

    fn set_word(&self, off: usize, v: u64) {
        fence(Ordering::Release);
        // SAFETY: as in `word`.
        unsafe { std::ptr::write_volatile(self.base.add(off) as *mut u64, v.to_le()) }
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        if self.seq > 0 {
            self.set_word(OFF_ACK, self.seq);
        }
        while self.word(OFF_SEQ) != self.seq + 1 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        fence(Ordering::Acquire);
        self.seq += 1;
        let n = self.word(OFF_LEN) as usize;
        if n > self.len - DATA_OFF {
            return Err(io::Error::other(format!(
                "inbox chunk of {n} bytes overruns the region"
            )));
        }
        self.chunk_len = n;
        self.pos = 0;
        Ok(())
    }

    /// Reads the stream's header; the archive follows, `.1` bytes long.
    pub fn header(&mut self) -> io::Result<(Header, u64)> {
        let mut pre = [0u8; PREFIX];
        self.read_exact(&mut pre)?;
        let total = u64::from_le_bytes(pre[..8].try_into().unwrap());
        let hlen = u32::from_le_bytes(pre[8..].try_into().unwrap()) as u64;
        let mut json = vec![0u8; hlen as usize];
        self.read_exact(&mut json)?;
        let h = serde_json::from_slice(&json)
            .map_err(|e| io::Error::other(format!("inbox header: {e}")))?;
        let rest = total
            .checked_sub(PREFIX as u64 + hlen)
            .ok_or_else(|| io::Error::other("inbox: bad total length"))?;
        Ok((h, rest))
    }

    /// Tells the host the stream is taken, after closing the uplink (the
    /// next `/init` opens the channel afresh).
    pub fn finish(&self) {
        self.set_word(OFF_COMMITTED, 0);
        self.set_word(OFF_ACK, self.seq);
    }
}

impl Read for Inbox {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos == self.chunk_len {
            self.next_chunk()?;
        }
        let n = buf.len().min(self.chunk_len - self.pos);
        // SAFETY: DATA_OFF + chunk_len <= len (checked in next_chunk).
        let src = unsafe { std::slice::from_raw_parts(self.base.add(DATA_OFF + self.pos), n) };
        buf[..n].copy_from_slice(src);
        self.pos += n;
        Ok(n)
    }
}

/// Writes a newc archive's files under `root`; returns how many. A file
/// replaces an existing one by rename, so a binary that is running (the
/// ready init, its libraries) keeps its old contents until it execs.
pub fn extract(mut r: impl Read, root: &Path) -> io::Result<usize> {
    let mut files = 0;
    loop {
        let mut rd = cpio::newc::Reader::new(r)?;
        let e = rd.entry();
        if e.is_trailer() {
            return Ok(files);
        }
        let name = e
            .name()
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        if name.split('/').any(|c| c == "..") {
            return Err(io::Error::other(format!(
                "archive path {name:?} leaves the root"
            )));
        }
        let (mode, path) = (e.mode(), root.join(&name));
        match mode & 0o170000 {
            0o040000 => std::fs::create_dir_all(&path)?,
            0o100000 => {
                use std::os::unix::fs::PermissionsExt;
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d)?;
                }
                let tmp = root.join(format!("{name}.ktstr-new"));
                let mut f = std::fs::File::create(&tmp)?;
                io::copy(&mut rd, &mut f)?;
                f.flush()?;
                f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
                drop(f);
                std::fs::rename(&tmp, &path)?;
                files += 1;
            }
            // Device nodes (`dev/console`) exist already in a running guest.
            _ => {}
        }
        r = rd.finish()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::initramfs::Initramfs;

    /// Both ends over one buffer, as the host file and the guest mapping share RAM.
    struct Shared(*mut u8);
    // SAFETY: the test keeps the buffer alive until both threads end.
    unsafe impl Send for Shared {}
    impl Window for Shared {
        fn write_at(&mut self, off: usize, data: &[u8]) -> io::Result<()> {
            // SAFETY: in bounds of the test buffer; volatile so the reader thread sees it.
            for (i, b) in data.iter().enumerate() {
                unsafe { std::ptr::write_volatile(self.0.add(off + i), *b) };
            }
            Ok(())
        }
        fn read_u64(&mut self, off: usize) -> io::Result<u64> {
            // SAFETY: in bounds, aligned.
            Ok(u64::from_le(unsafe {
                std::ptr::read_volatile(self.0.add(off) as *const u64)
            }))
        }
    }

    #[test]
    fn payload_crosses_in_many_chunks_and_extracts() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let ir = Initramfs::default()
            .data("include/big.bin", big.clone(), 0o644)
            .data("bin/tool", b"#!/bin/sh\n".to_vec(), 0o755);
        let archive = dir.path().join("p.cpio");
        std::fs::write(&archive, ir.build().unwrap()).unwrap();
        let p = Payload {
            test: "t".into(),
            preset: Some("smt".into()),
            cpus: Some(3),
            archive,
        };
        let header = Header::now(&p).unwrap();
        // A region with 8 KiB of chunk room: the archive needs ~25 chunks.
        let len = DATA_OFF + 8192;
        let mut buf = vec![0u64; len / 8];
        let base = buf.as_mut_ptr() as *mut u8;
        let mut tx = Sender::new(Shared(base), len, &p, &header).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // An old file in the way is replaced, as the ready init's own /init is.
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/tool"), b"old").unwrap();
        let rx_root = root.clone();
        let rx_base = Shared(base);
        let rx = std::thread::spawn(move || {
            let rx_base = rx_base;
            // SAFETY: the buffer outlives the thread (joined below).
            let mut inbox = unsafe { Inbox::new(rx_base.0, len) };
            let (h, rest) = inbox.header().unwrap();
            let n = extract((&mut inbox).take(rest), &rx_root).unwrap();
            inbox.finish();
            (h, n)
        });
        let mut chunks = 0;
        let t0 = std::time::Instant::now();
        loop {
            match tx.pump().unwrap() {
                Progress::Done => break,
                Progress::Sent => chunks += 1,
                Progress::Waiting => std::thread::yield_now(),
            }
            assert!(
                t0.elapsed().as_secs() < 30,
                "guest side stalled after {chunks} chunks"
            );
        }
        let (h, n) = rx.join().unwrap();
        assert_eq!(h, header);
        assert_eq!(h.cpus, Some(3), "the KTSTR_CPUS count crosses with the test's name");
        assert_eq!(n, 2);
        assert!(chunks > 20, "{chunks} chunks");
        assert_eq!(tx.sent(), tx.total());
        assert_eq!(std::fs::read(root.join("include/big.bin")).unwrap(), big);
        assert_eq!(
            std::fs::read(root.join("bin/tool")).unwrap(),
            b"#!/bin/sh\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(root.join("bin/tool"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        assert!(!root.join("bin/tool.ktstr-new").exists());
        drop(buf);
    }

    #[test]
    fn headers_differ_per_test_in_seed_and_time() {
        let p = Payload {
            test: "t".into(),
            preset: None,
            cpus: None,
            archive: "/x".into(),
        };
        let (a, b) = (Header::now(&p).unwrap(), Header::now(&p).unwrap());
        assert_ne!(a.seed, b.seed);
        assert!(b.host_time_ns >= a.host_time_ns && a.host_time_ns > 1_600_000_000_000_000_000);
    }

    #[test]
    fn archive_paths_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = Initramfs::default()
            .data("../evil", b"x".to_vec(), 0o644)
            .build()
            .unwrap();
        assert!(extract(&bytes[..], dir.path()).is_err());
    }
}
