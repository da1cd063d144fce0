//! Kernel specs, fetch, configure, build and cache for ktstr.

/// The ktstr kernel config fragment, embedded at compile time.
pub const KCONFIG: &str = include_str!("../../ktstr.kconfig");

/// CRC32 of [`KCONFIG`] as 8 lowercase hex digits: the `kc` of cache keys.
pub fn kconfig_hash() -> String {
    format!("{:08x}", crc32fast::hash(KCONFIG.as_bytes()))
}
