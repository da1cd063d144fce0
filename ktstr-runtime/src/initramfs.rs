//! initramfs builder. PLACEHOLDER.
