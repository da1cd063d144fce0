//! The port-I/O and MMIO devices a vCPU exit is dispatched to.
//!
//! UARTs, the ACPI PM1 block (S5 power-off), the reset paths (0xcf9 and
//! the i8042 pulse), the data-channel doorbell, and two test devices:
//! a port that logs what the guest writes and a scratch MMIO page.

use std::time::Instant;

use vm_superio::{I8042Device, Trigger};

use super::acpi::{PM1A_CNT_PORT, PM1A_EVT_PORT, RESET_PORT, SLP_EN, SLP_TYP_S5};
use super::memory::{SCRATCH_MMIO, SCRATCH_MMIO_SIZE};
use super::serial::{Uart, UartState, COM1_BASE, COM2_BASE};
use crate::channel::DOORBELL_PORT;

/// Port whose writes are logged in `Outcome::port_writes`; reads return
/// the last value written plus one (a PIO round-trip check).
pub const TEST_PORT: u16 = 0x5f0;
const I8042_BASE: u16 = 0x60;
const PCI_CONFIG: std::ops::RangeInclusive<u16> = 0xcf8..=0xcff;
const SCI_EN: u16 = 1;
/// Most test-port and MMIO writes kept in the logs.
const LOG_CAP: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    PowerOff,
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    None,
    Stop(Stop),
    Doorbell,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortWrite {
    pub vcpu: usize,
    pub port: u16,
    pub value: u32,
    pub at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmioWrite {
    pub vcpu: usize,
    pub addr: u64,
    pub data: Vec<u8>,
}

/// i8042 reset pulse: latched, read by the bus after each write.
#[derive(Default)]
pub struct ResetLatch(std::cell::Cell<bool>);

impl Trigger for ResetLatch {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(true);
        Ok(())
    }
}

pub struct Devices {
    pub com1: Uart,
    pub com2: Uart,
    i8042: I8042Device<ResetLatch>,
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    test_last: u32,
    pub port_writes: Vec<PortWrite>,
    pub mmio_writes: Vec<MmioWrite>,
    scratch: Vec<u8>,
    pub doorbells: u64,
}

/// What a restored VM's devices must carry over; the logs and counters
/// start afresh, as for a new run. (The i8042 keeps only its reset latch.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    pub com: [UartState; 2],
    /// PM1 status, enable and control.
    pub pm1: [u16; 3],
    pub test_last: u32,
    pub scratch: Vec<u8>,
}

fn le(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

fn put(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = b.get(i).copied().unwrap_or(0);
    }
}

impl Devices {
    pub fn new(com1: Uart, com2: Uart) -> Self {
        Self {
            com1,
            com2,
            i8042: I8042Device::new(ResetLatch::default()),
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: SCI_EN,
            test_last: 0,
            port_writes: Vec::new(),
            mmio_writes: Vec::new(),
            scratch: vec![0; SCRATCH_MMIO_SIZE as usize],
            doorbells: 0,
        }
    }

    /// This state, for a save.
    pub fn state(&self) -> DeviceState {
        DeviceState {
            com: [self.com1.state().into(), self.com2.state().into()],
            pm1: [self.pm1_sts, self.pm1_en, self.pm1_cnt],
            test_last: self.test_last,
            scratch: self.scratch.clone(),
        }
    }

    /// Takes a saved state's registers (the UARTs are rebuilt from theirs
    /// by [`super::serial::uart_from`]).
    /// Errors when the saved scratch page is not this machine's size.
    pub fn set_state(&mut self, s: &DeviceState) -> Result<(), String> {
        if s.scratch.len() != self.scratch.len() {
            return Err(format!("saved scratch area is {} bytes, this machine's {}", s.scratch.len(), self.scratch.len()));
        }
        [self.pm1_sts, self.pm1_en, self.pm1_cnt] = s.pm1;
        self.test_last = s.test_last;
        self.scratch.copy_from_slice(&s.scratch);
        Ok(())
    }

    pub fn pio_write(&mut self, vcpu: usize, port: u16, data: &[u8]) -> Event {
        let v = le(data);
        match port {
            COM1_BASE..=0x3ff => {
                let _ = self.com1.write((port - COM1_BASE) as u8, data[0]);
            }
            COM2_BASE..=0x2ff => {
                let _ = self.com2.write((port - COM2_BASE) as u8, data[0]);
            }
            p if p == PM1A_CNT_PORT => {
                self.pm1_cnt = (v as u16 & !SLP_EN) | SCI_EN;
                if v as u16 & SLP_EN != 0 && (v as u16 >> 10) & 7 == SLP_TYP_S5 {
                    return Event::Stop(Stop::PowerOff);
                }
            }
            p if p == PM1A_EVT_PORT => self.pm1_sts &= !(v as u16), // write-1-to-clear
            p if p == PM1A_EVT_PORT + 2 => self.pm1_en = v as u16,
            // Bit 2 of the reset-control register starts the reset.
            p if p == RESET_PORT && data.len() == 1 && v & 0x4 != 0 => return Event::Stop(Stop::Reset),
            0x60 | 0x64 => {
                let _ = self.i8042.write((port - I8042_BASE) as u8, data[0]);
                if self.i8042.reset_evt().0.replace(false) {
                    return Event::Stop(Stop::Reset);
                }
            }
            p if p == DOORBELL_PORT => {
                self.doorbells += 1;
                return Event::Doorbell;
            }
            TEST_PORT => {
                self.test_last = v;
                if self.port_writes.len() >= LOG_CAP {
                    return Event::None;
                }
                self.port_writes.push(PortWrite { vcpu, port, value: v, at: Instant::now() });
            }
            _ => {}
        }
        Event::None
    }

    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let v = match port {
            COM1_BASE..=0x3ff => self.com1.read((port - COM1_BASE) as u8).into(),
            COM2_BASE..=0x2ff => self.com2.read((port - COM2_BASE) as u8).into(),
            p if p == PM1A_CNT_PORT => self.pm1_cnt.into(),
            p if p == PM1A_EVT_PORT => self.pm1_sts.into(),
            p if p == PM1A_EVT_PORT + 2 => self.pm1_en.into(),
            0x60 | 0x64 => self.i8042.read((port - I8042_BASE) as u8).into(),
            TEST_PORT => self.test_last.wrapping_add(1),
            // No CMOS/RTC: reading zeros keeps the update-in-progress bit
            // clear, so the guest does not spin on it.
            0x70 | 0x71 => 0,
            // No PCI host bridge: config reads float high.
            p if PCI_CONFIG.contains(&p) => u32::MAX,
            _ => u32::MAX,
        };
        put(data, v);
    }

    pub fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8]) {
        // A kernel probing absent devices must not grow this without bound.
        if self.mmio_writes.len() < LOG_CAP {
            self.mmio_writes.push(MmioWrite { vcpu, addr, data: data.to_vec() });
        }
        if let Some(off) = scratch_offset(addr, data.len()) {
            self.scratch[off..off + data.len()].copy_from_slice(data);
        }
    }

    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match scratch_offset(addr, data.len()) {
            Some(off) => data.copy_from_slice(&self.scratch[off..off + data.len()]),
            None => data.fill(0xff),
        }
    }
}

fn scratch_offset(addr: u64, len: usize) -> Option<usize> {
    (addr >= SCRATCH_MMIO && addr + len as u64 <= SCRATCH_MMIO + SCRATCH_MMIO_SIZE).then(|| (addr - SCRATCH_MMIO) as usize)
}
