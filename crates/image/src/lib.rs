//! `locald-image`: OCI images for locald-vmm. So far the layer unpacker
//! ([`unpack`]), which stages an image's root filesystem on the host plus
//! a metadata table for the ext4 builder; registry, reference and cache
//! modules come next. Library code only, run on the caller's thread.

pub mod unpack;
