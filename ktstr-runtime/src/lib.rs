//! ktstr runtime, linked into every ktstr test binary.

pub mod channel;
pub mod initramfs;
pub mod vmm;
