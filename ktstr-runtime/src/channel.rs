//! Guest → host data channel: an append-only log in a reserved
//! guest-physical region, shared by both VMM backends.
//!
//! Layout (little-endian): a 4 KiB header (`MAGIC`, capacity, committed
//! length) followed by records `[kind u32][len u32][crc32 u32][0 u32]
//! payload`, each padded to 8 bytes. The guest writes a record, then
//! publishes it by storing the new committed length, then rings the
//! doorbell port (one exit per message, never per byte). The host reads
//! the region from guest memory, live or after the VM stopped.

use std::path::Path;

pub const MAGIC: &[u8; 8] = b"KTSTRCH1";
pub const HEADER_SIZE: u64 = 4096;
const OFF_CAPACITY: usize = 8;
/// The header word with the bytes of records published so far.
pub const OFF_COMMITTED: usize = 16;
const RECORD_HEADER: usize = 16;
/// I/O port the guest writes after each message; the KVM backend
/// counts it, QEMU ignores writes to unassigned ports.
pub const DOORBELL_PORT: u16 = 0x5f4;

/// Message kinds.
pub mod kind {
    /// The guest's `/init` is running.
    pub const INIT: u32 = 1;
    /// Free-form text from the guest (logs, diagnostics).
    pub const TEXT: u32 = 2;
    /// The test verdict, JSON.
    pub const RESULT: u32 = 3;
    /// Opaque bytes (bulk data).
    pub const BLOB: u32 = 4;
    /// The test body's stdout/stderr: one stream byte, then the bytes
    /// (see `crate::output`).
    pub const OUTPUT: u32 = 5;
    /// `cargo ktstr shell`: the shell's or command's exit status, decimal.
    pub const SHELL_EXIT: u32 = 6;
    /// The guest reached the snapshot ready point and waits on the inbox
    /// (`crate::snapshot::payload`).
    pub const READY: u32 = 7;
    /// The test body starts now (its name): the end of "boot to body".
    pub const BODY: u32 = 8;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u32,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("data channel: record at offset {offset} fails its checksum")]
    Checksum { offset: u64 },
    #[error("data channel: record at offset {offset} runs past the committed length")]
    Truncated { offset: u64 },
    #[error("data channel: committed length {0} exceeds the region")]
    BadLength(u64),
}

fn padded(n: usize) -> usize {
    (n + 7) & !7
}

/// The committed data length from a region's first `OFF_COMMITTED + 8`
/// bytes; `None` before the guest opened it (no magic).
pub fn committed(head: &[u8]) -> Option<u64> {
    let w = head.get(OFF_COMMITTED..OFF_COMMITTED + 8)?;
    (&head[..8] == MAGIC).then(|| u64::from_le_bytes(w.try_into().unwrap()))
}

/// Decodes the messages in a channel region (header included). A region
/// without the magic holds no messages: the guest never opened it.
pub fn decode(region: &[u8]) -> Result<Vec<Message>, ChannelError> {
    if region.len() < HEADER_SIZE as usize || &region[..8] != MAGIC {
        return Ok(Vec::new());
    }
    let committed = u64::from_le_bytes(region[OFF_COMMITTED..OFF_COMMITTED + 8].try_into().unwrap());
    let data = &region[HEADER_SIZE as usize..];
    if committed > data.len() as u64 {
        return Err(ChannelError::BadLength(committed));
    }
    let data = &data[..committed as usize];
    let mut out = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        if data.len() - off < RECORD_HEADER {
            return Err(ChannelError::Truncated { offset: off as u64 });
        }
        let word = |i: usize| u32::from_le_bytes(data[off + i * 4..off + i * 4 + 4].try_into().unwrap());
        let (kind, len, crc) = (word(0), word(1) as usize, word(2));
        let start = off + RECORD_HEADER;
        if data.len() - start < len {
            return Err(ChannelError::Truncated { offset: off as u64 });
        }
        let payload = &data[start..start + len];
        if crc32fast::hash(payload) != crc {
            return Err(ChannelError::Checksum { offset: off as u64 });
        }
        out.push(Message { kind, payload: payload.to_vec() });
        off = start + padded(len);
    }
    Ok(out)
}

/// Kinds of the records from byte `*pos` of the data area up to the
/// committed length, reading only their headers through `read(offset,
/// len)` (offsets into the region); `*pos` moves past them. A region
/// opened afresh (committed below `*pos`) is walked from the start.
pub fn scan_kinds(committed: u64, pos: &mut u64, mut read: impl FnMut(u64, usize) -> Option<Vec<u8>>) -> Vec<u32> {
    if committed < *pos {
        *pos = 0;
    }
    let mut kinds = Vec::new();
    while *pos + RECORD_HEADER as u64 <= committed {
        let Some(h) = read(HEADER_SIZE + *pos, 8).filter(|h| h.len() == 8) else { break };
        kinds.push(u32::from_le_bytes(h[..4].try_into().unwrap()));
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        *pos += (RECORD_HEADER + padded(len)) as u64;
    }
    kinds
}

/// Writes records into a channel region held in memory. The guest wraps
/// its `/dev/mem` mapping in this; tests use a plain buffer.
pub struct Writer<'a> {
    region: &'a mut [u8],
    committed: usize,
}

impl<'a> Writer<'a> {
    /// Initialises the header of a fresh region.
    pub fn init(region: &'a mut [u8]) -> Self {
        assert!(region.len() > HEADER_SIZE as usize, "channel region too small");
        region[..8].copy_from_slice(MAGIC);
        let cap = region.len() as u64 - HEADER_SIZE;
        region[OFF_CAPACITY..OFF_CAPACITY + 8].copy_from_slice(&cap.to_le_bytes());
        region[OFF_COMMITTED..OFF_COMMITTED + 8].copy_from_slice(&0u64.to_le_bytes());
        Self { region, committed: 0 }
    }

    pub fn capacity_left(&self) -> usize {
        self.region.len() - HEADER_SIZE as usize - self.committed
    }

    /// Appends one record; errors if it does not fit.
    pub fn send(&mut self, kind: u32, payload: &[u8]) -> std::io::Result<()> {
        let need = RECORD_HEADER + padded(payload.len());
        if need > self.capacity_left() {
            return Err(std::io::Error::other(format!(
                "data channel full: {} bytes left, message needs {need}",
                self.capacity_left()
            )));
        }
        let base = HEADER_SIZE as usize + self.committed;
        let hdr = [kind, payload.len() as u32, crc32fast::hash(payload), 0];
        for (i, w) in hdr.iter().enumerate() {
            self.region[base + i * 4..base + i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        self.region[base + RECORD_HEADER..base + RECORD_HEADER + payload.len()].copy_from_slice(payload);
        self.committed += need;
        // Publish only after the record bytes are in place.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        let c = (self.committed as u64).to_le_bytes();
        self.region[OFF_COMMITTED..OFF_COMMITTED + 8].copy_from_slice(&c);
        Ok(())
    }
}

/// Parses `ktstr.chan=ADDR:SIZE` (hex address, decimal or hex size) out
/// of a kernel command line.
pub fn region_from_cmdline(cmdline: &str) -> Option<(u64, u64)> {
    let arg = cmdline.split_whitespace().find_map(|a| a.strip_prefix("ktstr.chan="))?;
    let (addr, size) = arg.split_once(':')?;
    Some((parse_num(addr)?, parse_num(size)?))
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Formats the command-line arguments that announce a region: ours, plus
/// `memmap=` so a kernel booted by a VMM whose e820 we do not control
/// keeps its hands off the region.
pub fn cmdline_args(gpa: u64, size: u64) -> String {
    format!("ktstr.chan={gpa:#x}:{size:#x} memmap={size:#x}${gpa:#x}")
}

/// Guest side: the channel mapped from `/dev/mem`.
pub struct GuestChannel {
    map: *mut u8,
    len: usize,
    committed: usize,
}

// SAFETY: the mapping is process-private state owned by this struct.
unsafe impl Send for GuestChannel {}

impl GuestChannel {
    /// Maps the region named on `/proc/cmdline` and initialises it.
    pub fn open() -> std::io::Result<Self> {
        let cmdline = std::fs::read_to_string("/proc/cmdline")?;
        let (gpa, size) = region_from_cmdline(&cmdline)
            .ok_or_else(|| std::io::Error::other("no ktstr.chan= on the kernel command line"))?;
        Self::open_at(Path::new("/dev/mem"), gpa, size as usize)
    }

    fn open_at(dev: &Path, gpa: u64, len: usize) -> std::io::Result<Self> {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(dev)?;
        // SAFETY: mapping a file we just opened; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                gpa as libc::off_t,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // ioperm lets us ring the doorbell; without it messages still land.
        // SAFETY: plain syscall.
        unsafe { libc::ioperm(DOORBELL_PORT as libc::c_ulong, 1, 1) };
        let mut ch = Self { map: map as *mut u8, len, committed: 0 };
        Writer::init(ch.region());
        Ok(ch)
    }

    /// The mapped region (header included) for the snapshot inbox, which
    /// shares it while the uplink is idle.
    pub fn raw(&self) -> (*mut u8, usize) {
        (self.map, self.len)
    }

    fn region(&mut self) -> &mut [u8] {
        // SAFETY: `map` is a live mapping of `len` bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.map, self.len) }
    }

    /// Bytes the region can still take (record headers included).
    pub fn capacity_left(&self) -> usize {
        self.len - HEADER_SIZE as usize - self.committed
    }

    pub fn send(&mut self, kind: u32, payload: &[u8]) -> std::io::Result<()> {
        let committed = self.committed;
        let region = self.region();
        let mut w = Writer { region, committed };
        w.send(kind, payload)?;
        self.committed = w.committed;
        ring_doorbell();
        Ok(())
    }
}

impl Drop for GuestChannel {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.len) };
    }
}

fn ring_doorbell() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: port write; permitted by the ioperm above, and if ioperm
    // failed we skip it (probing permission by faulting would kill us).
    unsafe {
        static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let ok = *ALLOWED.get_or_init(|| libc::ioperm(DOORBELL_PORT as libc::c_ulong, 1, 1) == 0);
        if ok {
            std::arch::asm!("out dx, al", in("dx") DOORBELL_PORT, in("al") 1u8, options(nomem, nostack));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let mut buf = vec![0u8; 64 * 1024];
        let mut w = Writer::init(&mut buf);
        w.send(kind::INIT, b"").unwrap();
        w.send(kind::TEXT, b"hello").unwrap();
        let blob: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        w.send(kind::BLOB, &blob).unwrap();
        let msgs = decode(&buf).unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1].text(), "hello");
        assert_eq!(msgs[2].payload, blob);
    }

    #[test]
    fn corruption_detected() {
        let mut buf = vec![0u8; 8192];
        Writer::init(&mut buf).send(kind::TEXT, b"payload").unwrap();
        buf[HEADER_SIZE as usize + RECORD_HEADER + 2] ^= 0xff;
        assert_eq!(decode(&buf), Err(ChannelError::Checksum { offset: 0 }));
    }

    #[test]
    fn full_region_refuses() {
        let mut buf = vec![0u8; 4096 + 64];
        let mut w = Writer::init(&mut buf);
        assert!(w.send(kind::BLOB, &[0u8; 100]).is_err());
        w.send(kind::BLOB, &[1u8; 40]).unwrap();
        assert_eq!(decode(&buf).unwrap().len(), 1);
    }

    #[test]
    fn scan_walks_headers_incrementally() {
        let mut buf = vec![0u8; 64 * 1024];
        let mut w = Writer::init(&mut buf);
        w.send(kind::INIT, b"init").unwrap();
        w.send(kind::OUTPUT, &[7u8; 1001]).unwrap();
        let committed = w.committed as u64;
        let mut pos = 0;
        let read = |b: &[u8], off: u64, len: usize| Some(b[off as usize..off as usize + len].to_vec());
        assert_eq!(scan_kinds(committed, &mut pos, |o, l| read(&buf, o, l)), [kind::INIT, kind::OUTPUT]);
        assert_eq!(scan_kinds(committed, &mut pos, |o, l| read(&buf, o, l)).len(), 0, "nothing new");
        let mut w = Writer { region: &mut buf, committed: committed as usize };
        w.send(kind::BODY, b"t").unwrap();
        let c2 = w.committed as u64;
        assert_eq!(scan_kinds(c2, &mut pos, |o, l| read(&buf, o, l)), [kind::BODY], "only the new record");
        // Reopened: the walk starts over.
        let mut w = Writer::init(&mut buf);
        w.send(kind::INIT, b"again").unwrap();
        let c3 = w.committed as u64;
        assert_eq!(scan_kinds(c3, &mut pos, |o, l| read(&buf, o, l)), [kind::INIT]);
    }

    #[test]
    fn unopened_region_is_empty() {
        assert!(decode(&vec![0u8; 8192]).unwrap().is_empty());
    }

    #[test]
    fn cmdline() {
        let args = cmdline_args(0x0f00_0000, 0x100_0000);
        assert_eq!(region_from_cmdline(&format!("console=ttyS0 {args} quiet")), Some((0x0f00_0000, 0x100_0000)));
        assert_eq!(region_from_cmdline("console=ttyS0"), None);
    }
}
