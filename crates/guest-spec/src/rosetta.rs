//! `/.locald/rosetta`: run x86-64 Linux binaries with Apple's Rosetta (the
//! macOS Virtualization.framework backend shares the Rosetta runtime as a
//! virtio-fs device). The file holds that device's virtio-fs tag, e.g.
//! `rosetta`, with no terminator. Pure functions, any thread.
//!
//! The guest init mounts the tag read-only and registers the interpreter
//! with `binfmt_misc` (see `crates/guest-init/src/rosetta.rs`). Decoding
//! strips one trailing NUL or newline; the tag must then be 1 to
//! [`MAX_TAG_LEN`] bytes without NUL, newline or `/`.

use crate::fields::{lossy, strip_terminator, until_nul};

/// Longest virtio-fs tag (the `tag[36]` field of the device configuration).
pub const MAX_TAG_LEN: usize = 36;

/// Contents of `/.locald/rosetta`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RosettaSpec {
    /// virtio-fs tag of the Rosetta share.
    pub tag: Vec<u8>,
}

/// Why `/.locald/rosetta` was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RosettaError {
    /// The tag is empty.
    Empty,
    /// The tag is longer than [`MAX_TAG_LEN`] bytes (its length).
    TooLong(usize),
    /// The tag contains NUL, newline or `/` (the tag, lossily).
    BadTag(String),
}

impl std::fmt::Display for RosettaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "empty virtio-fs tag"),
            Self::TooLong(n) => {
                write!(f, "virtio-fs tag of {n} bytes is longer than {MAX_TAG_LEN}")
            }
            Self::BadTag(t) => write!(f, "virtio-fs tag '{t}' contains NUL, newline or '/'"),
        }
    }
}

impl std::error::Error for RosettaError {}

impl RosettaSpec {
    /// The file's bytes (the tag, cut at a NUL).
    pub fn encode(&self) -> Vec<u8> {
        until_nul(&self.tag).to_vec()
    }

    /// Parses the file (see the module documentation).
    pub fn decode(data: &[u8]) -> Result<Self, RosettaError> {
        let tag = strip_terminator(data);
        if tag.is_empty() {
            return Err(RosettaError::Empty);
        }
        if tag.len() > MAX_TAG_LEN {
            return Err(RosettaError::TooLong(tag.len()));
        }
        if tag.iter().any(|&b| matches!(b, 0 | b'\n' | b'/')) {
            return Err(RosettaError::BadTag(lossy(tag)));
        }
        Ok(RosettaSpec { tag: tag.to_vec() })
    }
}
