//! What several KVM integration tests share.

/// Where a bzImage stand-in kernel loads.
pub const LOAD: u64 = 0x10_0000;

/// A bzImage (boot protocol 2.15, 64-bit entry) whose kernel is `code`,
/// loaded at [`LOAD`]: a stand-in kernel for `kvm::run`.
pub fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512];
    img[0x1f1] = 4; // setup_sects
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&(LOAD as u32).to_le_bytes());
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    let mut body = vec![0xf4u8; 0x200]; // startup_32 slot: unused
    body.extend_from_slice(code);
    img.extend_from_slice(&body);
    img
}
