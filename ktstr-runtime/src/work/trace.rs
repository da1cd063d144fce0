//! Where and when a worker ran, in bounded memory, so a test can relate
//! its progress to scenario steps (guest CLOCK_MONOTONIC ns throughout):
//! per CPU the first and last stamp there, the first [`MAX_MOVES`] CPU
//! changes, and progress stamps per time slot.

use serde::{Deserialize, Serialize};

/// CPU changes kept in [`Trace::moves`]; later ones are only counted.
pub const MAX_MOVES: usize = 256;
/// Progress slots per run at most (the slot widens for long runs).
pub const MAX_SLOTS: u64 = 512;
/// Narrowest progress slot.
pub const MIN_SLOT_NS: u64 = 10_000_000;

/// Stamps on one CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSpan {
    pub cpu: u32,
    pub first_ns: u64,
    pub last_ns: u64,
    pub stamps: u64,
}

/// A stay on one CPU: the first stamp after arriving there (`at_ns`)
/// to the last before leaving (`last_ns`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub cpu: u32,
    pub at_ns: u64,
    pub last_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// One entry per CPU the worker was seen on, in order of first visit.
    pub on_cpu: Vec<CpuSpan>,
    /// Its stay on its first CPU, then one per change, up to [`MAX_MOVES`].
    pub moves: Vec<Move>,
    /// CPU changes not kept in `moves`.
    pub moves_dropped: u64,
    /// Slot `i` covers `[start_ns + i*slot_ns, start_ns + (i+1)*slot_ns)`.
    pub start_ns: u64,
    pub slot_ns: u64,
    /// Progress stamps per slot (a stamp follows every unit of work).
    pub slots: Vec<u32>,
    #[serde(skip)]
    cur: usize,
}

impl Trace {
    /// A trace for a run from `start_ns` to `end_ns`.
    pub fn new(start_ns: u64, end_ns: u64) -> Self {
        let span = end_ns.saturating_sub(start_ns).max(1);
        let slot_ns = span.div_ceil(MAX_SLOTS).max(MIN_SLOT_NS);
        let n = span.div_ceil(slot_ns) as usize;
        Self {
            start_ns,
            slot_ns,
            slots: vec![0; n],
            ..Self::default()
        }
    }

    /// A stamp on `cpu` at `now`.
    #[inline]
    pub fn stamp(&mut self, cpu: u32, now: u64) {
        let moved = self.on_cpu.get(self.cur).is_none_or(|s| s.cpu != cpu);
        self.stamp_on(cpu, now, moved);
    }

    /// [`Trace::stamp`] for a caller that already knows whether `cpu`
    /// differs from the last stamp's (`Tally::tick` does): one check per
    /// stamp on the hot path instead of two.
    #[inline]
    pub(crate) fn stamp_on(&mut self, cpu: u32, now: u64, moved: bool) {
        debug_assert_eq!(moved, self.on_cpu.get(self.cur).is_none_or(|s| s.cpu != cpu));
        if moved {
            self.cur = match self.on_cpu.iter().position(|s| s.cpu == cpu) {
                Some(i) => i,
                None => {
                    self.on_cpu.push(CpuSpan {
                        cpu,
                        first_ns: now,
                        last_ns: now,
                        stamps: 0,
                    });
                    self.on_cpu.len() - 1
                }
            };
            // Once one is dropped `moves` is full, so later ones drop too.
            if self.moves.len() < MAX_MOVES {
                self.moves.push(Move { cpu, at_ns: now, last_ns: now });
            } else {
                self.moves_dropped += 1;
            }
        } else if self.moves_dropped == 0 {
            if let Some(m) = self.moves.last_mut() {
                m.last_ns = now;
            }
        }
        let s = &mut self.on_cpu[self.cur];
        s.last_ns = now;
        s.stamps += 1;
        if self.slot_ns > 0 && now >= self.start_ns {
            if let Some(c) = self
                .slots
                .get_mut(((now - self.start_ns) / self.slot_ns) as usize)
            {
                *c = c.saturating_add(1);
            }
        }
    }

    /// The last stamp on `cpu`, if it ever ran there.
    pub fn last_on(&self, cpu: u32) -> Option<u64> {
        self.on_cpu.iter().find(|s| s.cpu == cpu).map(|s| s.last_ns)
    }

    /// The CPU it was on at `t` (the last kept move at or before `t`);
    /// `None` before its first stamp or past a truncated move log.
    pub fn cpu_at(&self, t: u64) -> Option<u32> {
        if self.moves_dropped > 0 && self.moves.last().is_some_and(|m| m.at_ns <= t) {
            return None;
        }
        self.moves
            .iter()
            .take_while(|m| m.at_ns <= t)
            .last()
            .map(|m| m.cpu)
    }

    /// CPUs whose stays overlap `[from, to)`: where it ran then (from the
    /// kept stays; a truncated log ends early).
    pub fn cpus_between(&self, from: u64, to: u64) -> crate::cpuset::CpuSet {
        self.moves.iter().filter(|m| m.at_ns < to && m.last_ns >= from).map(|m| m.cpu).collect()
    }

    /// Progress stamps in the slots that lie wholly inside `[from, to)`.
    pub fn stamps_between(&self, from: u64, to: u64) -> u64 {
        if self.slot_ns == 0 {
            return 0;
        }
        let first = from.saturating_sub(self.start_ns).div_ceil(self.slot_ns) as usize;
        let end = (to.saturating_sub(self.start_ns) / self.slot_ns) as usize;
        self.slots
            .iter()
            .take(end)
            .skip(first)
            .map(|&c| c as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn spans_moves_and_slots() {
        let mut t = Trace::new(1000 * MS, 3000 * MS);
        assert_eq!((t.slot_ns, t.slots.len()), (10 * MS, 200));
        for i in 0..100 {
            t.stamp(1, 1000 * MS + i * MS);
        }
        for i in 0..50 {
            t.stamp(0, 1100 * MS + i * MS);
        }
        t.stamp(1, 1200 * MS);
        assert_eq!(t.last_on(1), Some(1200 * MS));
        assert_eq!(t.last_on(0), Some(1149 * MS));
        assert_eq!(t.last_on(2), None);
        assert_eq!(t.on_cpu.len(), 2);
        assert_eq!(t.on_cpu[0].stamps, 101);
        assert_eq!(
            t.moves,
            [
                Move { cpu: 1, at_ns: 1000 * MS, last_ns: 1099 * MS },
                Move { cpu: 0, at_ns: 1100 * MS, last_ns: 1149 * MS },
                Move { cpu: 1, at_ns: 1200 * MS, last_ns: 1200 * MS }
            ]
        );
        assert_eq!(t.cpu_at(999 * MS), None);
        assert_eq!(t.cpu_at(1150 * MS), Some(0));
        assert_eq!(t.cpus_between(1050 * MS, 1150 * MS).to_string(), "0-1");
        assert_eq!(t.cpus_between(1110 * MS, 1150 * MS).to_string(), "0");
        // Nothing ran in [1150, 1200): its last CPU is not where it ran then.
        assert_eq!(t.cpus_between(1150 * MS, 1200 * MS).to_string(), "");
        // Slots wholly inside [1000, 1100): 10 slots of 10 stamps.
        assert_eq!(t.stamps_between(1000 * MS, 1100 * MS), 100);
        // A partial slot at either end is left out.
        assert_eq!(t.stamps_between(1005 * MS, 1100 * MS), 90);
        assert_eq!(t.stamps_between(1100 * MS, 5000 * MS), 51);
        // Stamps outside the run are not slotted.
        t.stamp(1, 9000 * MS);
        assert_eq!(t.slots.iter().map(|&c| c as u64).sum::<u64>(), 151);
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = Trace::new(0, 3_600_000 * MS);
        assert_eq!(t.slots.len() as u64, MAX_SLOTS);
        for i in 0..1000u64 {
            t.stamp((i % 2) as u32, i * MS);
        }
        assert_eq!(
            (t.moves.len(), t.moves_dropped, t.on_cpu.len()),
            (MAX_MOVES, 1000 - MAX_MOVES as u64, 2)
        );
        assert_eq!(t.cpu_at(10 * MS), Some(0));
        assert_eq!(
            t.cpu_at(999 * MS),
            None,
            "past the kept moves the CPU is unknown"
        );
    }
}
