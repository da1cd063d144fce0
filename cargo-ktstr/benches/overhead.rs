//! What `cargo ktstr test` adds over `cargo nextest run` on the same tests
//! with a warm kernel cache (goal: under 100 ms). Runs the fixture crate's
//! host_only test both ways, alternating, and prints the medians; also the
//! resolve-only path (`--print-env`), which is the plugin's own work.
//!
//! `cargo bench -p cargo-ktstr --bench overhead` (needs the 6.12 tarball
//! kernel in the suite's cache, as the slow tests leave it:
//! `KTSTR_CACHE_DIR=~/.cache/ktstr/test-cache cargo ktstr kernel build /usr/src/linux-source-6.12.tar.xz`).
//! `KTSTR_BENCH_ITERS` sets the rounds (default 7).

#[path = "../tests/fixture/mod.rs"]
mod fixture;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use fixture::{text, Fixture, TARBALL};

fn timed(f: impl FnOnce() -> Output) -> Duration {
    let t = Instant::now();
    let o = f();
    let d = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    d
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let iters: usize = std::env::var("KTSTR_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let f = Fixture::new();
    let filter = "test(=ktstr/host_side)";
    let ktstr = || f.cargo_ktstr(&["test", "--kernel", TARBALL, "--", "-E", filter]);

    // Warm-up: builds the fixture; must be a kernel cache hit already.
    let o = ktstr();
    assert!(o.status.success(), "warm-up failed:\n{}", text(&o));
    assert!(text(&o).contains("cache hit"), "the kernel is not cached; run `KTSTR_CACHE_DIR={} cargo ktstr kernel build {TARBALL}` first", fixture::test_cache().display());
    let env = f.cargo_ktstr(&["test", "--kernel", TARBALL, "--print-env"]);
    let image: PathBuf = String::from_utf8_lossy(&env.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("KTSTR_KERNEL=").map(PathBuf::from))
        .expect("--print-env names KTSTR_KERNEL");
    let nextest = || {
        let mut c = f.command("cargo");
        c.args(["nextest", "run", "-E", filter]).env("KTSTR_KERNEL", &image);
        c.output().unwrap()
    };

    let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..iters {
        a.push(timed(ktstr));
        b.push(timed(nextest));
        r.push(timed(|| f.cargo_ktstr(&["test", "--kernel", TARBALL, "--print-env"])));
    }
    let (a, b, r) = (median(a), median(b), median(r));
    // Signed: on a noisy machine the medians can come out either way.
    let over_ms = (a.as_secs_f64() - b.as_secs_f64()) * 1e3;
    println!("cargo ktstr test overhead, warm cache, {iters} rounds (medians)");
    println!("  cargo ktstr test --kernel {TARBALL} -- -E '{filter}'  {}", ms(a));
    println!("  KTSTR_KERNEL=… cargo nextest run -E '{filter}'               {}", ms(b));
    println!("  difference                                                    {over_ms:+.1} ms");
    println!("  resolve only (--print-env: parse, cache lookup, labels)       {}", ms(r));
    println!("  goal < 100 ms: {}", if over_ms < 100.0 { "met" } else { "NOT met" });
}
