//! 8250 UARTs (vm-superio) on COM1/COM2, captured into buffers, with
//! their interrupt delivered through an irqfd on the ISA IRQ line.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::{console_shows_panic, ConsoleLink};

pub const COM1_BASE: u16 = 0x3f8;
pub const COM2_BASE: u16 = 0x2f8;
pub const COM1_IRQ: u32 = 4;
pub const COM2_IRQ: u32 = 3;

/// Raises the UART's IRQ line: the eventfd is registered as an irqfd.
pub struct IrqTrigger {
    pub evt: EventFd,
    pub count: Arc<AtomicU64>,
}

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.evt.write(1)
    }
}

/// Captured output; `on_panic` fires once when a line shows a kernel
/// panic; with a live link set (interactive mode) output also goes to it.
pub struct Capture {
    pub buf: Arc<Mutex<Vec<u8>>>,
    line: Vec<u8>,
    on_panic: Option<Box<dyn FnMut() + Send>>,
    link: Arc<OnceLock<ConsoleLink>>,
}

impl Capture {
    pub fn new(buf: Arc<Mutex<Vec<u8>>>, on_panic: Option<Box<dyn FnMut() + Send>>) -> Self {
        Self { buf, line: Vec::new(), on_panic, link: Arc::default() }
    }

    /// Mirrors output to whatever link `slot` holds once it is set.
    pub fn with_link(mut self, slot: Arc<OnceLock<ConsoleLink>>) -> Self {
        self.link = slot;
        self
    }
}

impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.lock().unwrap().extend_from_slice(data);
        if let Some(l) = self.link.get() {
            l.output(data);
        }
        if self.on_panic.is_some() {
            for &b in data {
                if b == b'\n' {
                    if console_shows_panic(&String::from_utf8_lossy(&self.line)) {
                        if let Some(mut f) = self.on_panic.take() {
                            f();
                        }
                    }
                    self.line.clear();
                } else if self.line.len() < 512 {
                    self.line.push(b);
                }
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub type Uart = Serial<IrqTrigger, NoEvents, Capture>;

pub fn uart(evt: EventFd, irq_count: Arc<AtomicU64>, out: Capture) -> Uart {
    Serial::new(IrqTrigger { evt, count: irq_count }, out)
}

/// A UART's registers and receive FIFO, for snapshots (vm-superio's
/// `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        Self {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(u: &UartState) -> Self {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            u.regs;
        SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: u.in_buffer.clone(),
        }
    }
}

/// [`uart`] in the state `state` (a restored VM's UART).
pub fn uart_from(state: &UartState, evt: EventFd, irq_count: Arc<AtomicU64>, out: Capture) -> Result<Uart, String> {
    Serial::from_state(&state.into(), IrqTrigger { evt, count: irq_count }, NoEvents, out)
        .map_err(|e| format!("UART state: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_and_panic_watch() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let mut u = uart(evt, count.clone(), Capture::new(buf.clone(), Some(Box::new(move || {
            h.fetch_add(1, Ordering::Relaxed);
        }))));
        for b in b"ok\nKernel panic - not syncing: x\nagain Kernel panic - not syncing\n" {
            u.write(0, *b).unwrap();
        }
        assert!(buf.lock().unwrap().starts_with(b"ok\nKernel panic"));
        assert_eq!(hits.load(Ordering::Relaxed), 1);
        u.write(1, 0x02).unwrap(); // IER: THR empty interrupt
        assert!(count.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn linked_capture_mirrors_output_and_takes_input() {
        let slot: Arc<OnceLock<ConsoleLink>> = Arc::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut u = uart(evt, Arc::new(AtomicU64::new(0)), Capture::new(buf.clone(), None).with_link(slot.clone()));
        u.write(0, b'a').unwrap(); // before the link is set: captured only
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        slot.set(ConsoleLink::new(move |b| s.lock().unwrap().extend_from_slice(b))).ok().unwrap();
        u.write(0, b'b').unwrap();
        assert_eq!(*buf.lock().unwrap(), b"ab");
        assert_eq!(*seen.lock().unwrap(), b"b");
        // Host keys land in the receive FIFO: LSR.DR set, RBR returns them in order.
        assert_eq!(u.enqueue_raw_bytes(b"xy").unwrap(), 2);
        assert_eq!(u.read(5) & 1, 1);
        assert_eq!((u.read(0), u.read(0)), (b'x', b'y'));
        assert_eq!(u.read(5) & 1, 0);
    }

    #[test]
    fn uart_state_round_trips() {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let cap = || Capture::new(Arc::new(Mutex::new(Vec::new())), None);
        let mut u = uart(evt(), Arc::new(AtomicU64::new(0)), cap());
        u.write(3, 0x80).unwrap(); // LCR.DLAB: the divisor latch
        u.write(0, 3).unwrap();
        u.write(3, 0x03).unwrap(); // 8N1
        u.write(1, 0x01).unwrap(); // IER: receive interrupts
        u.write(7, 0x5a).unwrap(); // scratch
        u.enqueue_raw_bytes(b"hi").unwrap();
        let st = UartState::from(u.state());
        assert_eq!(st.in_buffer, b"hi");
        let json = serde_json::to_string(&st).unwrap();
        let back: UartState = serde_json::from_str(&json).unwrap();
        let mut r = uart_from(&back, evt(), Arc::new(AtomicU64::new(0)), cap()).unwrap();
        assert_eq!(r.state(), u.state());
        assert_eq!((r.read(7), r.read(1), r.read(0), r.read(0)), (0x5a, 0x01, b'h', b'i'));
    }
}
