//! `locald-image`: OCI images for locald-vmm. The layer unpacker
//! ([`unpack`]), which stages an image's root filesystem on the host plus
//! a metadata table, and the ext4 builder ([`rootfs`]), which turns both
//! into a cached, read-only root disk; registry, reference and cache
//! modules come next. Library code only, run on the caller's thread.

pub mod rootfs;
pub mod unpack;
