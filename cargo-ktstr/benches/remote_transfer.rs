//! Upload and download of the cached 6.12 kernel entry through the remote
//! cache, against a moto S3 server on 127.0.0.1: wall time and bytes of
//! `push` (compress + hash + PUT + manifest) and `pull` (GET + decompress +
//! verify + atomic store), median of `KTSTR_BENCH_ITERS` rounds (default 3).
//!
//! `cargo bench -p cargo-ktstr --bench remote_transfer` (needs moto, see
//! docs/ci.md, and a 6.12 entry in the suite's cache
//! `~/.cache/ktstr/test-cache`, else the user's cache; `KTSTR_BENCH_KEY`
//! names another key).

#[path = "../tests/moto/mod.rs"]
mod moto;

use std::time::Duration;

use kernel_build::progress::mib;
use kernel_build::remote::{Pulled, Pushed};
use kernel_build::Cache;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let iters: usize = std::env::var("KTSTR_BENCH_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let home = kernel_build::cache::user_cache_home().join("ktstr");
    let want = std::env::var("KTSTR_BENCH_KEY").ok();
    let pick = |c: &Cache| {
        c.list().ok()?.into_iter().find(|e| match &want {
            Some(k) => &e.key == k,
            None => e.meta.version.starts_with("6.12") && e.meta.stale_reason().is_none() && e.vmlinux().is_some(),
        })
    };
    let (cache, entry) = [home.join("test-cache"), home.join("kernels")]
        .iter()
        .map(|r| Cache::at(Some(r)))
        .find_map(|c| pick(&c).map(|e| (c, e)))
        .unwrap_or_else(|| panic!("no 6.12 entry with a vmlinux in {}/{{test-cache,kernels}}; build one (see the header)", home.display()));
    let Some(m) = moto::Moto::start() else { std::process::exit(1) };
    m.bucket("bench");
    let url = "s3://bench/kernels";
    let remote = m.remote(url);
    let _read = cache.lock_shared(&entry.key).unwrap();
    println!("entry {} ({:.1} MiB on disk: image {:.1} MiB, vmlinux {:.1} MiB)", entry.key, mib(entry.disk_size()),
        mib(kernel_build::remote::file_size(&entry.image())), mib(entry.vmlinux().map(|p| kernel_build::remote::file_size(&p)).unwrap_or(0)));

    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    let (mut up_bytes, mut down_bytes) = (0, 0);
    for i in 0..iters {
        remote.remove(&entry.key).unwrap();
        match remote.push(&entry, false).unwrap() {
            Pushed::Uploaded { bytes, elapsed } => {
                ups.push(elapsed);
                up_bytes = bytes;
            }
            Pushed::AlreadyThere => panic!("the entry was removed before the push"),
        }
        let dir = tempfile::tempdir().unwrap();
        let local = Cache::open(Some(dir.path())).unwrap();
        let lock = local.lock_exclusive(&entry.key).unwrap();
        match remote.pull(&local, &lock, &entry.key).unwrap() {
            Pulled::Hit { bytes, elapsed, .. } => {
                downs.push(elapsed);
                down_bytes = bytes;
            }
            other => panic!("round {i}: pull gave {other:?}"),
        }
        println!("round {}: upload {:.2}s, download {:.2}s", i + 1, ups[i].as_secs_f64(), downs[i].as_secs_f64());
    }
    // The last round's upload is still there.
    let plain: u64 = remote.manifest(&entry.key).unwrap().unwrap().files.iter().map(|f| f.size).sum();
    let (u, d) = (median(ups), median(downs));
    println!(
        "upload:   {:.1} MiB stored in {:.2}s ({:.1} MiB/s of stored bytes), median of {iters}",
        mib(up_bytes),
        u.as_secs_f64(),
        mib(up_bytes) / u.as_secs_f64()
    );
    println!(
        "download: {:.1} MiB fetched in {:.2}s ({:.1} MiB/s), {:.1} MiB after decompression, median of {iters}",
        mib(down_bytes),
        d.as_secs_f64(),
        mib(down_bytes) / d.as_secs_f64(),
        mib(plain)
    );
    remote.remove(&entry.key).unwrap();
}
