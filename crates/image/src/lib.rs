//! `locald-image`: OCI images for locald-vmm. So far image references
//! parsed as docker does ([`reference`]) and the layer unpacker
//! ([`unpack`]), which stages an image's root filesystem on the host plus
//! a metadata table for the ext4 builder. Library code only, run on the
//! caller's thread.

pub mod reference;
pub mod unpack;

pub use reference::{ImageReference, ReferenceError};
