//! Measurement primitives: a log-bucket latency histogram (bounded
//! memory, ≤ 12.5 % relative error), the coefficient of variation, the
//! longest-gap tracker, and `/proc/PID/schedstat` parsing.

use serde::{Deserialize, Serialize};

/// Values below this are counted exactly; above, each power of two is cut
/// into `SUB` equal buckets.
const EXACT: u64 = 16;
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets for every `u64`: 16 exact ones, then 8 per power of two from 2^4 to 2^63.
const BUCKETS: usize = EXACT as usize + (64 - 4) * SUB as usize;

/// A histogram of nanosecond values in 496 log-spaced buckets (4 KiB,
/// whatever the sample count). Percentiles are the upper edge of the
/// bucket holding the rank, clamped to the exact maximum.
#[derive(Clone, PartialEq, Eq)]
pub struct Histogram {
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
    buckets: Box<[u64; BUCKETS]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { count: 0, sum: 0, min: u64::MAX, max: 0, buckets: Box::new([0; BUCKETS]) }
    }
}

/// Count, p50, p99 and max, not 496 buckets.
impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Histogram {{ count: {}, p50: {:?}, p99: {:?}, max: {:?} }}", self.count, self.quantile(0.5), self.quantile(0.99), self.max())
    }
}

fn bucket(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // ≥ 4
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    EXACT as usize + (e as usize - 4) * SUB as usize + sub as usize
}

/// Inclusive upper edge of bucket `i`.
fn upper(i: usize) -> u64 {
    if i < EXACT as usize {
        return i as u64;
    }
    let j = i - EXACT as usize;
    let e = (j / SUB as usize) as u32 + 4;
    let sub = (j % SUB as usize) as u64;
    let width = 1u64 << (e - SUB_BITS);
    ((SUB + sub) << (e - SUB_BITS)).saturating_add(width - 1)
}

impl Histogram {
    pub fn record(&mut self, v: u64) {
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.buckets[bucket(v)] += 1;
    }
    pub fn merge(&mut self, o: &Histogram) {
        self.count += o.count;
        self.sum = self.sum.saturating_add(o.sum);
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.buckets.iter_mut().zip(o.buckets.iter()).for_each(|(a, b)| *a += b);
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn max(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max)
    }
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }
    /// The value at quantile `q` (0.5 = median, 0.99 = p99); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper(i).clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

/// Sparse wire form: only non-empty buckets, as `[index, count]`.
#[derive(Serialize, Deserialize)]
struct HistogramWire {
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
    buckets: Vec<(u16, u64)>,
}

impl Serialize for Histogram {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let buckets = self.buckets.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| (i as u16, *c)).collect();
        HistogramWire { count: self.count, sum: self.sum, min: self.min, max: self.max, buckets }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Histogram {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = HistogramWire::deserialize(d)?;
        let mut h = Histogram { count: w.count, sum: w.sum, min: w.min, max: w.max, ..Histogram::default() };
        for (i, c) in w.buckets {
            *h.buckets.get_mut(i as usize).ok_or_else(|| serde::de::Error::custom(format!("histogram bucket {i} out of range")))? = c;
        }
        Ok(h)
    }
}

/// Coefficient of variation (population standard deviation over the
/// mean) of `xs`; `None` for fewer than two values or a zero mean.
pub fn cv(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    if mean == 0.0 {
        return None;
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
    Some(var.sqrt() / mean)
}

/// Stamps per window: one thread-CPU-time read per window (a syscall)
/// keeps the cost far below the work between stamps.
const WINDOW: u32 = 256;
/// An interval this long closes the window at once, so the window that
/// holds it is short.
const SUSPECT_NS: u64 = 1_000_000;

/// The longest time a worker was runnable but not running, from its own
/// progress stamps. The raw figure is the longest interval between
/// consecutive stamps; each window of stamps also reads the thread's CPU
/// time, and a window's gap is capped at its wall time minus the CPU
/// time the kernel charged the worker in it. So time the guest kernel
/// counts as running (a TCG vCPU thread the host descheduled, an
/// interrupt) is not a scheduling gap. A worker calls `pause` before it
/// blocks on purpose (sleep, pipe read, futex wait): a chosen sleep is
/// never a gap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GapTracker {
    last: Option<u64>,
    win_wall: u64,
    win_cpu: u64,
    win_max: u64,
    win_max_at: u64,
    n: u32,
    /// Longest gap, in ns.
    pub max: u64,
    /// When it ended (ns, the stamp's clock).
    pub at: u64,
}

impl GapTracker {
    /// A progress stamp at `now`; `cpu` reads the thread's CPU time (ns)
    /// and is called once per window.
    #[inline]
    pub fn stamp(&mut self, now: u64, cpu: impl FnOnce() -> u64) {
        match self.last {
            None => {
                (self.win_wall, self.win_cpu, self.win_max, self.n) = (now, cpu(), 0, 0);
            }
            Some(l) => {
                let d = now.saturating_sub(l);
                if d > self.win_max {
                    (self.win_max, self.win_max_at) = (d, now);
                }
                self.n += 1;
                if self.n >= WINDOW || d >= SUSPECT_NS {
                    self.close(now, cpu());
                }
            }
        }
        self.last = Some(now);
    }

    fn close(&mut self, now: u64, cpu: u64) {
        let off_cpu = now.saturating_sub(self.win_wall).saturating_sub(cpu.saturating_sub(self.win_cpu));
        let g = self.win_max.min(off_cpu);
        if g > self.max {
            (self.max, self.at) = (g, self.win_max_at);
        }
        (self.win_wall, self.win_cpu, self.win_max, self.n) = (now, cpu, 0, 0);
    }

    /// The worker is about to block on purpose; the next stamp starts a
    /// new runnable stretch.
    #[inline]
    pub fn pause(&mut self, now: u64, cpu: impl FnOnce() -> u64) {
        if self.last.is_some() {
            self.close(now, cpu());
        }
        self.last = None;
    }
}

/// `/proc/PID/schedstat`: time on CPU, time waiting on a runqueue (run
/// delay), and the number of timeslices run (needs `CONFIG_SCHED_INFO`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedStat {
    pub run_ns: u64,
    pub wait_ns: u64,
    pub timeslices: u64,
}

impl SchedStat {
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
        let (run_ns, wait_ns, timeslices) = (it.next()??, it.next()??, it.next()??);
        Some(Self { run_ns, wait_ns, timeslices })
    }
    /// This task's figures (`/proc/thread-self/schedstat`), if the kernel has them.
    pub fn read_self() -> Option<Self> {
        std::fs::read_to_string("/proc/thread-self/schedstat").ok().and_then(|s| Self::parse(&s))
    }
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            run_ns: self.run_ns.saturating_sub(earlier.run_ns),
            wait_ns: self.wait_ns.saturating_sub(earlier.wait_ns),
            timeslices: self.timeslices.saturating_sub(earlier.timeslices),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_u64_and_stay_within_an_eighth() {
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(upper(BUCKETS - 1), u64::MAX);
        for v in [0u64, 1, 15, 16, 17, 31, 32, 100, 1000, 12_345, 1 << 20, (1 << 40) + 7, u64::MAX / 3] {
            let b = bucket(v);
            assert!(upper(b) >= v, "{v} above its bucket's edge {}", upper(b));
            assert!(b == 0 || upper(b - 1) < v, "{v} belongs in an earlier bucket");
            assert!((upper(b) - v) as f64 <= v as f64 / 8.0, "{v}: edge {} too far", upper(b));
        }
        // Bucket edges are increasing.
        assert!((1..BUCKETS).all(|i| upper(i) > upper(i - 1)));
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in 1..=1000u64 {
            h.record(v * 1000); // 1 µs .. 1 ms
        }
        let p50 = h.quantile(0.5).unwrap() as f64;
        let p99 = h.quantile(0.99).unwrap() as f64;
        assert!((500_000.0..=500_000.0 * 1.125).contains(&p50), "{p50}");
        assert!((990_000.0..=1_000_000.0).contains(&p99), "{p99} (clamped to the max)");
        assert_eq!(h.max(), Some(1_000_000));
        assert_eq!(h.quantile(0.0), Some(1023), "the upper edge of the lowest bucket (1000 ns is in 960..=1023)");
        let mut one = Histogram::default();
        one.record(7_777);
        assert_eq!(one.quantile(0.99), Some(7_777), "a single sample is exact");
        // Merge, then the JSON round trip keeps everything.
        let mut m = one.clone();
        m.merge(&h);
        assert_eq!(m.count(), 1001);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.len() < 2000, "sparse: {json}");
        assert_eq!(serde_json::from_str::<Histogram>(&json).unwrap(), m);
        assert!(serde_json::from_str::<Histogram>(r#"{"count":1,"sum":1,"min":1,"max":1,"buckets":[[9999,1]]}"#).is_err());
    }

    #[test]
    fn coefficient_of_variation() {
        assert_eq!(cv(&[5.0]), None);
        assert_eq!(cv(&[0.0, 0.0]), None);
        assert_eq!(cv(&[3.0, 3.0, 3.0]), Some(0.0));
        let c = cv(&[90.0, 110.0]).unwrap();
        assert!((c - 0.1).abs() < 1e-12, "{c}");
    }

    #[test]
    fn gaps_skip_voluntary_sleeps_and_time_charged_as_running() {
        // The worker always ran: its CPU time follows the wall clock.
        let mut g = GapTracker::default();
        g.stamp(100, || 0);
        g.stamp(150, || 50);
        // Preempted from 150 to 400: 250 ns off CPU (CPU time +50 only).
        g.stamp(400, || 100);
        g.pause(450, || 150);
        g.stamp(10_000, || 150); // after a sleep: no gap
        g.stamp(10_100, || 250);
        assert_eq!((g.max, g.at), (200, 400), "the interval 250 capped at the 200 ns off CPU in its window");
        // 5 ms between stamps, but charged as running (a host stall under
        // TCG): not a scheduling gap.
        g.stamp(5_010_100, || 5_000_250);
        assert_eq!(g.max, 200);
        // 5 ms off CPU: a gap.
        g.stamp(10_010_100, || 5_000_300);
        assert_eq!((g.max, g.at), (4_999_950, 10_010_100));
    }

    #[test]
    fn long_windows_close_after_256_stamps() {
        let mut g = GapTracker::default();
        let mut reads = 0;
        let mut t = 0;
        for _ in 0..=512 {
            t += 1000;
            g.stamp(t, || {
                reads += 1;
                t
            });
        }
        assert_eq!(reads, 3, "one read to open, one per 256 stamps");
        assert_eq!(g.max, 0, "never off CPU");
    }

    #[test]
    fn schedstat() {
        let a = SchedStat::parse("1000 200 3\n").unwrap();
        let b = SchedStat::parse("5000 700 10").unwrap();
        assert_eq!(b.since(&a), SchedStat { run_ns: 4000, wait_ns: 500, timeslices: 7 });
        assert_eq!(SchedStat::parse("1 2"), None);
        assert_eq!(SchedStat::parse("x y z"), None);
    }
}
