//! Wall time of a kernel build from one clean tarball: the default base
//! (tinyconfig + ktstr.kconfig) versus `--base defconfig`.
//!
//! `cargo bench -p kernel-build --bench build_time -- [TARBALL] [--defconfig] [--defconfig-only] [--ccache]`
//! Each build goes into a fresh temp cache. ccache is off unless `--ccache`
//! (a warm ccache would time the cache, not the build); defconfig runs only
//! with `--defconfig` because it takes far longer.

use std::path::PathBuf;
use std::time::Instant;

use kernel_build::{Base, Options};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let tarball = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_else(|| "/usr/src/linux-source-6.12.tar.xz".into());
    let defconfig_only = args.iter().any(|a| a == "--defconfig-only");
    let with_defconfig = defconfig_only || args.iter().any(|a| a == "--defconfig");
    let ccache = args.iter().any(|a| a == "--ccache");
    if !PathBuf::from(&tarball).is_file() {
        eprintln!("build_time: {tarball} not found; skipping (apt-get install linux-source-6.12)");
        return;
    }
    let mut runs = Vec::new();
    if !defconfig_only {
        runs.push(("default (tinyconfig + ktstr.kconfig)", None));
    }
    if with_defconfig {
        runs.push(("defconfig + ktstr.kconfig", Some(Base::Defconfig)));
    }
    for (name, base) in runs {
        let root = tempfile::tempdir().expect("temp cache");
        let opts = Options { base, cache_root: Some(root.path().to_path_buf()), force: true, ccache, ..Options::default() };
        let t = Instant::now();
        match kernel_build::resolve_one(&tarball, &opts) {
            Ok(k) => {
                let size = std::fs::metadata(&k.image).map(|m| m.len()).unwrap_or(0);
                println!(
                    "build_time: {name}: {:.1} min wall, image {:.1} MiB (ccache {})",
                    t.elapsed().as_secs_f64() / 60.0,
                    size as f64 / (1 << 20) as f64,
                    if ccache { "on" } else { "off" }
                );
            }
            Err(e) => {
                println!("build_time: {name}: failed after {:.1} min: {e:#}", t.elapsed().as_secs_f64() / 60.0);
                std::process::exit(1);
            }
        }
    }
    if !with_defconfig {
        println!("build_time: defconfig not run (pass --defconfig; it takes much longer)");
    }
}
