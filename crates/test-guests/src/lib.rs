//! Tiny freestanding x86 test guests for locald-vmm.
//!
//! The build script assembles `guests/*.S` (at the workspace root) with GNU
//! `as` and links them with `ld`; this crate exposes where the results are.
//! Every guest prints to COM1 (0x3f8, polling LSR bit 5 before each byte)
//! and ends with an 8-bit OUT of a status byte to port 0xf4. See
//! `docs/testing.md` for what each prints.
//!
//! PVH guests are ELF64 files that carry 32-bit code and the Xen
//! `XEN_ELFNOTE_PHYS32_ENTRY` note, like a Linux `vmlinux`: linux-loader's
//! ELF loader reads ELF64 only.

use std::path::{Path, PathBuf};

pub mod builder;

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Directory that holds every built guest.
pub fn dir() -> PathBuf {
    Path::new(env!("OUT_DIR")).join("guests")
}

/// Path of the built guest `name` (e.g. `"pvh_hello"`).
///
/// # Panics
/// If `name` is not one of [`builder::GUESTS`].
pub fn path(name: &str) -> PathBuf {
    assert!(builder::spec(name).is_some(), "unknown test guest {name:?}");
    dir().join(name)
}

/// Names of all guests.
pub fn names() -> impl Iterator<Item = &'static str> {
    builder::GUESTS.iter().map(|g| g.name)
}
