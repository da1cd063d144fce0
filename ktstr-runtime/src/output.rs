//! The test body's stdout and stderr: captured through two pipes by the
//! supervisor, carried to the host (in the guest as `kind::OUTPUT`
//! records on the data channel, never the slow serial console), printed
//! there on the matching stream and saved as `output.log`.
//!
//! Order is exact within a stream; between the two streams it is the
//! order in which the supervisor's reader saw the bytes (a chunk at a
//! time), which is the order of the body's writes unless it writes to
//! both within the same few microseconds.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Which stream a chunk came from. `Note` is ktstr's own remark (bytes
/// dropped), printed to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Note = 0,
    Stdout = 1,
    Stderr = 2,
}

impl Stream {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Stream::Note),
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Stream::Note => "[ktstr] ",
            Stream::Stdout => "[stdout] ",
            Stream::Stderr => "[stderr] ",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub bytes: Vec<u8>,
}

/// The payload of one `kind::OUTPUT` record.
pub fn encode(stream: Stream, bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.push(stream as u8);
    v.extend_from_slice(bytes);
    v
}

/// Every `kind::OUTPUT` record among `messages`, in order.
pub fn from_messages(messages: &[crate::channel::Message]) -> Vec<Chunk> {
    messages
        .iter()
        .filter(|m| m.kind == crate::channel::kind::OUTPUT)
        .filter_map(|m| {
            let (&s, rest) = m.payload.split_first()?;
            Some(Chunk { stream: Stream::from_byte(s)?, bytes: rest.to_vec() })
        })
        .collect()
}

/// Prints the chunks on this process's stdout/stderr (notes to stderr),
/// where nextest captures them like any test's output.
pub fn print(chunks: &[Chunk]) {
    use std::io::Write;
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    for c in chunks {
        // Flush the other stream first so a terminal shows them in order.
        let _ = match c.stream {
            Stream::Stdout => err.flush().and_then(|_| out.write_all(&c.bytes)),
            Stream::Stderr | Stream::Note => out.flush().and_then(|_| err.write_all(&c.bytes)),
        };
    }
    let _ = out.flush();
    let _ = err.flush();
}

/// `output.log`: every line tagged `[stdout] `/`[stderr] `/`[ktstr] `, in
/// order. A line split over chunks is joined; a stream's unterminated
/// last line is emitted when the other stream speaks, or at the end.
pub fn render_log(chunks: &[Chunk]) -> String {
    let mut out = String::new();
    let mut partial: Option<(Stream, Vec<u8>)> = None;
    let emit = |s: Stream, line: &[u8], out: &mut String| {
        out.push_str(s.tag());
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    };
    for c in chunks {
        let mut bytes: &[u8] = &c.bytes;
        match partial.take() {
            Some((s, mut p)) if s == c.stream => {
                match bytes.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        p.extend_from_slice(&bytes[..i]);
                        emit(s, &p, &mut out);
                        bytes = &bytes[i + 1..];
                    }
                    None => {
                        p.extend_from_slice(bytes);
                        partial = Some((s, p));
                        continue;
                    }
                }
            }
            Some((s, p)) => emit(s, &p, &mut out),
            None => {}
        }
        let mut lines = bytes.split(|&b| b == b'\n').peekable();
        while let Some(l) = lines.next() {
            if lines.peek().is_some() {
                emit(c.stream, l, &mut out);
            } else if !l.is_empty() {
                partial = Some((c.stream, l.to_vec()));
            }
        }
    }
    if let Some((s, p)) = partial {
        emit(s, &p, &mut out);
    }
    out
}

/// Largest record the reader forms; bigger reads are split.
pub const CHUNK_MAX: usize = 64 * 1024;
/// A pending chunk goes out after this long without new bytes.
const IDLE_FLUSH: Duration = Duration::from_millis(20);
/// How long the reader keeps draining after the body's process group is
/// gone (a daemon it started may still hold the pipes).
const AFTER_STOP: Duration = Duration::from_millis(500);

/// Reads the body's stdout and stderr pipes until both close (or
/// [`AFTER_STOP`] after `stop` is set), coalescing small writes into
/// chunks of at most [`CHUNK_MAX`] and handing each to `sink`. Closes
/// both descriptors.
pub fn drain(fds: [RawFd; 2], stop: &AtomicBool, mut sink: impl FnMut(Stream, &[u8])) {
    let streams = [Stream::Stdout, Stream::Stderr];
    let mut open = [true, true];
    let mut pending: Option<(Stream, Vec<u8>)> = None;
    let flush = |pending: &mut Option<(Stream, Vec<u8>)>, sink: &mut dyn FnMut(Stream, &[u8])| {
        if let Some((s, b)) = pending.take() {
            sink(s, &b);
        }
    };
    let mut buf = vec![0u8; CHUNK_MAX];
    let mut stopped_at: Option<Instant> = None;
    while open[0] || open[1] {
        if stop.load(Ordering::Acquire) {
            let t = *stopped_at.get_or_insert_with(Instant::now);
            if t.elapsed() >= AFTER_STOP {
                break;
            }
        }
        let mut pfds: Vec<libc::pollfd> = (0..2)
            .map(|i| libc::pollfd { fd: if open[i] { fds[i] } else { -1 }, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: poll over two pollfd structs we own; negative fds are ignored.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, IDLE_FLUSH.as_millis() as i32) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            break;
        }
        if n == 0 {
            flush(&mut pending, &mut sink);
            continue;
        }
        for i in 0..2 {
            if !open[i] || pfds[i].revents == 0 {
                continue;
            }
            // SAFETY: reading into a buffer we own, at most its length.
            let r = unsafe { libc::read(fds[i], buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if r <= 0 {
                open[i] = false;
                continue;
            }
            let got = &buf[..r as usize];
            match &mut pending {
                Some((s, b)) if *s == streams[i] && b.len() + got.len() <= CHUNK_MAX => b.extend_from_slice(got),
                _ => {
                    flush(&mut pending, &mut sink);
                    pending = Some((streams[i], got.to_vec()));
                }
            }
        }
    }
    flush(&mut pending, &mut sink);
    for fd in fds {
        // SAFETY: closing the read ends this function owns.
        unsafe { libc::close(fd) };
    }
}

/// The guest's policy for a bounded channel: the first `head` bytes go out
/// as they come (so a guest that crashes later still delivers them); after
/// that only the last `tail` bytes are kept, and sent at [`finish`] behind a
/// note saying how much was dropped. The body never waits on the host.
///
/// [`finish`]: Budget::finish
pub struct Budget<F: FnMut(&[u8])> {
    send: F,
    head_left: usize,
    tail_cap: usize,
    tail: VecDeque<Chunk>,
    tail_len: usize,
    dropped: u64,
}

impl<F: FnMut(&[u8])> Budget<F> {
    /// `total` bytes of channel to spend; a quarter is kept for the tail.
    pub fn new(total: usize, send: F) -> Self {
        let tail_cap = total / 4;
        Self { send, head_left: total - tail_cap, tail_cap, tail: VecDeque::new(), tail_len: 0, dropped: 0 }
    }

    pub fn push(&mut self, stream: Stream, bytes: &[u8]) {
        // Record header (16) + stream byte + padding (≤ 7).
        let cost = bytes.len() + 24;
        if self.tail.is_empty() && cost <= self.head_left {
            self.head_left -= cost;
            (self.send)(&encode(stream, bytes));
            return;
        }
        self.tail.push_back(Chunk { stream, bytes: bytes.to_vec() });
        self.tail_len += cost;
        while self.tail_len > self.tail_cap {
            let Some(front) = self.tail.front_mut() else { break };
            let excess = self.tail_len - self.tail_cap;
            if front.bytes.len() <= excess {
                self.tail_len -= front.bytes.len() + 24;
                self.dropped += front.bytes.len() as u64;
                self.tail.pop_front();
            } else {
                front.bytes.drain(..excess);
                self.tail_len -= excess;
                self.dropped += excess as u64;
            }
        }
    }

    /// Sends the kept tail (behind a note when bytes were dropped).
    pub fn finish(mut self) {
        if self.dropped > 0 {
            let note = format!(
                "\n[ktstr: {} bytes of the test body's output dropped here; the data channel keeps the first and the last part]\n",
                self.dropped
            );
            (self.send)(&encode(Stream::Note, note.as_bytes()));
        }
        for c in std::mem::take(&mut self.tail) {
            (self.send)(&encode(c.stream, &c.bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(s: Stream, b: &str) -> Chunk {
        Chunk { stream: s, bytes: b.as_bytes().to_vec() }
    }

    #[test]
    fn log_tags_lines_and_joins_split_ones() {
        let chunks = [
            chunk(Stream::Stdout, "table\nrow 1"),
            chunk(Stream::Stdout, " cont\n"),
            chunk(Stream::Stderr, "warn: x\n"),
            chunk(Stream::Stdout, "tail without newline"),
            chunk(Stream::Stderr, "last"),
        ];
        assert_eq!(
            render_log(&chunks),
            "[stdout] table\n[stdout] row 1 cont\n[stderr] warn: x\n[stdout] tail without newline\n[stderr] last\n"
        );
        assert_eq!(render_log(&[]), "");
    }

    #[test]
    fn records_roundtrip_through_messages() {
        let msgs = vec![
            crate::channel::Message { kind: crate::channel::kind::OUTPUT, payload: encode(Stream::Stderr, b"e") },
            crate::channel::Message { kind: crate::channel::kind::TEXT, payload: b"not output".to_vec() },
            crate::channel::Message { kind: crate::channel::kind::OUTPUT, payload: encode(Stream::Stdout, b"o") },
        ];
        assert_eq!(from_messages(&msgs), [chunk(Stream::Stderr, "e"), chunk(Stream::Stdout, "o")]);
    }

    #[test]
    fn budget_keeps_head_and_tail_and_says_what_it_dropped() {
        let mut sent = Vec::new();
        let mut b = Budget::new(4 * 100, |p: &[u8]| sent.push(p.to_vec()));
        for i in 0..20u8 {
            b.push(Stream::Stdout, &[b'a' + i; 40]);
        }
        b.finish();
        let chunks = from_messages(
            &sent.into_iter().map(|payload| crate::channel::Message { kind: crate::channel::kind::OUTPUT, payload }).collect::<Vec<_>>(),
        );
        // Head: 300 bytes of budget at 64 per record → 4 records, as sent.
        assert_eq!(chunks[..4].iter().map(|c| c.bytes[0]).collect::<Vec<_>>(), b"abcd");
        let note = chunks.iter().find(|c| c.stream == Stream::Note).expect("a note about the gap");
        let dropped: u64 = String::from_utf8_lossy(&note.bytes).split_whitespace().nth(1).unwrap().parse().unwrap();
        let kept: usize = chunks.iter().filter(|c| c.stream == Stream::Stdout).map(|c| c.bytes.len()).sum();
        assert_eq!(kept as u64 + dropped, 20 * 40, "every byte is either delivered or counted");
        assert_eq!(*chunks.last().unwrap().bytes.last().unwrap(), b'a' + 19, "the very last bytes survive");
    }

    #[test]
    fn drain_reads_both_pipes_in_order_and_stops() {
        let mut p = [[0; 2]; 2];
        for q in &mut p {
            // SAFETY: pipe2 fills the array.
            assert_eq!(unsafe { libc::pipe2(q.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        }
        let w = |fd: RawFd, s: &[u8]| {
            // SAFETY: writing a live buffer to a pipe we own.
            assert_eq!(unsafe { libc::write(fd, s.as_ptr().cast(), s.len()) }, s.len() as isize);
        };
        w(p[0][1], b"out 1\n");
        let stop = AtomicBool::new(false);
        let got = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let mut got = Vec::new();
                drain([p[0][0], p[1][0]], &stop, |s, b| got.push(Chunk { stream: s, bytes: b.to_vec() }));
                got
            });
            std::thread::sleep(Duration::from_millis(100));
            w(p[1][1], b"err 1\n");
            std::thread::sleep(Duration::from_millis(100));
            w(p[0][1], b"out 2\n");
            // SAFETY: closing the write ends we own.
            unsafe {
                libc::close(p[0][1]);
                libc::close(p[1][1]);
            }
            h.join().unwrap()
        });
        assert_eq!(render_log(&got), "[stdout] out 1\n[stderr] err 1\n[stdout] out 2\n");
    }
}
