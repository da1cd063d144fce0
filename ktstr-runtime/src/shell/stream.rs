//! The console as the user sees it: everything before init's [`READY`]
//! marker (kernel boot messages, init's notes) is held back (a failed
//! boot prints the tail instead), everything after it is passed through
//! as it arrives, and the exit marker is cut out and parsed.

use super::{EXIT_PREFIX, MARKER_END, READY};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Booting,
    Live,
    Done,
}

#[derive(Debug)]
pub struct Filter {
    state: State,
    pending: Vec<u8>,
    status: Option<i32>,
}

impl Default for Filter {
    fn default() -> Self {
        Self { state: State::Booting, pending: Vec::new(), status: None }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `hay` that is a proper prefix of `needle`.
fn partial_suffix(hay: &[u8], needle: &[u8]) -> usize {
    (1..needle.len().min(hay.len() + 1)).rev().find(|&n| hay.ends_with(&needle[..n])).unwrap_or(0)
}

impl Filter {
    /// Feeds guest console bytes; returns what to show the user now.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.state == State::Done {
            return Vec::new();
        }
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        if self.state == State::Booting {
            match find(&self.pending, READY) {
                Some(i) => {
                    self.pending.drain(..i + READY.len());
                    self.state = State::Live;
                }
                None => {
                    // Boot output is kept by the backend; only a split marker matters here.
                    let keep = partial_suffix(&self.pending, READY);
                    self.pending.drain(..self.pending.len() - keep);
                    return out;
                }
            }
        }
        match find(&self.pending, EXIT_PREFIX) {
            Some(i) => {
                let rest = &self.pending[i + EXIT_PREFIX.len()..];
                out.extend_from_slice(&self.pending[..i]);
                if let Some(end) = rest.iter().position(|&b| b == MARKER_END) {
                    self.status = std::str::from_utf8(&rest[..end]).ok().and_then(|s| s.parse().ok());
                    self.state = State::Done;
                    self.pending.clear();
                } else {
                    self.pending.drain(..i);
                }
            }
            None => {
                let keep = partial_suffix(&self.pending, EXIT_PREFIX);
                out.extend(self.pending.drain(..self.pending.len() - keep));
            }
        }
        out
    }

    /// True once init announced the shell.
    pub fn ready(&self) -> bool {
        self.state != State::Booting
    }

    /// The exit status from the console marker, once it came.
    pub fn status(&self) -> Option<i32> {
        self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Filter) {
        let mut f = Filter::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(f.feed(c));
        }
        (out, f)
    }

    #[test]
    fn boot_noise_hidden_marker_cut_status_parsed() {
        let (out, f) = run(&[b"[ 0.1] Linux version\r\nktstr: guest: brought 2 CPUs online\r\n", READY, b"3\n", b"\x02ktstr-shell-exit=0\x03", b"reboot: Power down\r\n"]);
        assert_eq!(out, b"3\n");
        assert!(f.ready());
        assert_eq!(f.status(), Some(0));
    }

    #[test]
    fn markers_split_at_every_byte() {
        let mut all = b"boot\r\n".to_vec();
        all.extend_from_slice(READY);
        all.extend_from_slice(b"hello\x02world\n");
        all.extend_from_slice(b"\x02ktstr-shell-exit=7\x03junk");
        let mut f = Filter::default();
        let mut out = Vec::new();
        for b in &all {
            out.extend(f.feed(std::slice::from_ref(b)));
        }
        assert_eq!(out, b"hello\x02world\n", "a lone STX is output, not a marker");
        assert_eq!(f.status(), Some(7));
    }

    #[test]
    fn no_ready_means_nothing_shown() {
        let (out, f) = run(&[b"Kernel panic - not syncing: VFS: Unable to mount root fs\r\n"]);
        assert!(out.is_empty());
        assert!(!f.ready());
        assert_eq!(f.status(), None);
        let (out, f) = run(&[READY, b"$ ", b"\x02ktstr-shell-ex"]);
        assert_eq!(out, b"$ ", "a partial marker is held back");
        assert_eq!(f.status(), None);
    }
}
