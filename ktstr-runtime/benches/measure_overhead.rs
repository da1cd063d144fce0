//! What measuring costs a spinner: work chunks per CPU-second of a bare loop
//! (stops on a flag another thread sets) against the measured loop every
//! `Work::Spin` worker runs (a clock read, a CPU read, the gap tracker and
//! the trace after each chunk). Runs on the host, no VM. Prints the median loss over
//! alternating rounds; the goal is under 2 %.
//!
//! `cargo bench -p ktstr-runtime --bench measure_overhead [-- ROUNDS MS]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ktstr_runtime::work::tally::{chunk, now_ns, Tally};
use ktstr_runtime::work::trace::Trace;

/// This thread's CPU time: host load steals wall time, not CPU time, so
/// chunks per CPU-second compare the loops themselves.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn bare(ms: u64) -> f64 {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(ms));
            stop.store(true, Ordering::Relaxed);
        });
        let c0 = thread_cpu();
        let (mut x, mut n) = (1u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            x = chunk(x);
            n += 1;
        }
        std::hint::black_box(x);
        n as f64 / (thread_cpu() - c0)
    })
}

fn measured(ms: u64) -> f64 {
    let mut t = Tally::default();
    let start = now_ns();
    // The trace a worker keeps (per-CPU stays, progress slots) is part of the cost.
    t.trace = Trace::new(start, start + ms * 1_000_000);
    let c0 = thread_cpu();
    let n = t.burn_until(start + ms * 1_000_000);
    n as f64 / (thread_cpu() - c0)
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = args.first().copied().unwrap_or(15) as usize;
    let ms = args.get(1).copied().unwrap_or(200);
    // One CPU for both loops, so they compete with the same neighbours.
    // SAFETY: no preconditions.
    let cpu = unsafe { libc::sched_getcpu() }.max(0) as usize;
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let mut losses = Vec::new();
    let (mut sb, mut sm) = (0.0, 0.0);
    for i in 0..rounds {
        // Alternate which goes first, so drift in host load cancels out.
        let (b, m) = if i % 2 == 0 { (bare(ms), measured(ms)) } else { let m = measured(ms); (bare(ms), m) };
        sb += b;
        sm += m;
        losses.push((1.0 - m / b) * 100.0);
    }
    losses.sort_by(f64::total_cmp);
    let median = losses[losses.len() / 2];
    println!(
        "measure_overhead: spinner chunks per CPU-second bare {:.0}, measured {:.0}; loss per round median {median:.2} % (min {:.2} %, max {:.2} %, {rounds} rounds of {ms} ms on CPU {cpu}); goal < 2 %: {}",
        sb / rounds as f64,
        sm / rounds as f64,
        losses[0],
        losses[losses.len() - 1],
        if median < 2.0 { "met" } else { "NOT met" }
    );
}
