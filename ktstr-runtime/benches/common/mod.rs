//! What the VM benchmarks share: the kernel list, vCPU counts, medians
//! and a kernel's label.

// Each bench uses only part of this.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The images in `KTSTR_BENCH_KERNELS` (`;`-separated); `None` when unset.
pub fn kernels() -> Option<Vec<PathBuf>> {
    let list = std::env::var("KTSTR_BENCH_KERNELS").ok()?;
    Some(list.split(';').filter(|s| !s.is_empty()).map(PathBuf::from).collect())
}

/// The `,`-separated vCPU counts in `var`, else in `default`.
pub fn cpu_counts(var: &str, default: &str) -> Vec<u32> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect()
}

/// A kernel's label: its file name, or its directory's for a `bzImage`.
pub fn label(k: &Path) -> String {
    let n = k.file_name().unwrap().to_string_lossy().into_owned();
    if n == "bzImage" {
        k.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned()
    } else {
        n
    }
}
