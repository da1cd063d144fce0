//! A live COM1 link for interactive VMs (`cargo ktstr shell`): bytes the
//! host types reach the guest's serial input, the guest's serial output
//! reaches a sink as it arrives, and the host can end the VM at any time.
//!
//! Without a link (every test run) the backends keep their batch
//! behaviour: no input, output captured and returned in `VmResult`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

type Sink = Box<dyn Fn(&[u8]) + Send + Sync>;

struct Inner {
    input: Mutex<Vec<u8>>,
    stop: AtomicBool,
    sink: Sink,
}

/// Cheap to clone: every clone is the same link.
#[derive(Clone)]
pub struct ConsoleLink {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConsoleLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleLink").field("stopped", &self.stopped()).finish_non_exhaustive()
    }
}

impl ConsoleLink {
    /// A link whose guest output goes to `sink` (called from a backend
    /// thread, in order, with each chunk the guest wrote).
    pub fn new(sink: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        Self { inner: Arc::new(Inner { input: Mutex::new(Vec::new()), stop: AtomicBool::new(false), sink: Box::new(sink) }) }
    }

    /// Queues `bytes` for the guest's serial input.
    pub fn send(&self, bytes: &[u8]) {
        self.inner.input.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
    }

    /// Takes every queued input byte (backend side).
    pub fn take_input(&self) -> Vec<u8> {
        std::mem::take(&mut *self.inner.input.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts bytes the guest could not take yet back in front of the queue.
    pub fn unread(&self, rest: &[u8]) {
        if rest.is_empty() {
            return;
        }
        let mut q = self.inner.input.lock().unwrap_or_else(|e| e.into_inner());
        let later = std::mem::take(&mut *q);
        q.extend_from_slice(rest);
        q.extend_from_slice(&later);
    }

    /// Hands guest output to the sink (backend side).
    pub fn output(&self, bytes: &[u8]) {
        (self.inner.sink)(bytes)
    }

    /// Asks the backend to end the VM; it then returns `ExitKind::Stopped`.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
    }

    pub fn stopped(&self) -> bool {
        self.inner.stop.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_queue_keeps_order_across_unread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let link = ConsoleLink::new(move |b| s.lock().unwrap().extend_from_slice(b));
        link.send(b"abc");
        let got = link.take_input();
        assert_eq!(got, b"abc");
        link.send(b"de");
        link.unread(&got[1..]);
        assert_eq!(link.take_input(), b"bcde");
        assert!(link.take_input().is_empty());
        link.clone().output(b"out");
        assert_eq!(*seen.lock().unwrap(), b"out");
        assert!(!link.stopped());
        link.clone().stop();
        assert!(link.stopped(), "clones share the stop flag");
    }
}
