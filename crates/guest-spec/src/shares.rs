//! `/.locald/shares`: the virtio-fs shares the guest mounts. For each share
//! three NUL-terminated fields `TAG\0PATH\0MODE\0`, e.g.
//! `locald-share0\0/mnt/src\0rw\0`. Pure functions, any thread.
//!
//! `TAG` is non-empty, `PATH` absolute (starts with `/`), `MODE` exactly
//! `rw` or `ro`; the last NUL may be missing. Both are otherwise raw bytes.

use crate::fields::{lossy, mode_field, parse_mode, push_field, split_nul};

/// One virtio-fs share to mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShareSpec {
    /// virtio-fs mount tag (the `mount(2)` source).
    pub tag: Vec<u8>,
    /// Absolute mount point in the guest.
    pub path: Vec<u8>,
    /// Mount read-only.
    pub read_only: bool,
}

/// Why `/.locald/shares` was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharesError {
    /// The field count is not a multiple of three (the count found).
    FieldCount(usize),
    /// A share has an empty tag (its index).
    EmptyTag(usize),
    /// A mount point is not absolute (as found).
    NotAbsolute(String),
    /// A `MODE` is neither `rw` nor `ro` (as found).
    BadMode(String),
}

impl std::fmt::Display for SharesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FieldCount(n) => {
                write!(f, "expected TAG, PATH, MODE triples, found {n} fields")
            }
            Self::EmptyTag(i) => write!(f, "empty tag (share {i})"),
            Self::NotAbsolute(p) => write!(f, "mount point '{p}' is not absolute"),
            Self::BadMode(m) => write!(f, "bad mode '{m}' (must be 'rw' or 'ro')"),
        }
    }
}

impl std::error::Error for SharesError {}

/// The file's bytes for `shares` (empty for none; the archive then omits
/// the file). Fields are cut at a NUL.
pub fn encode(shares: &[ShareSpec]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in shares {
        push_field(&mut out, &s.tag);
        push_field(&mut out, &s.path);
        push_field(&mut out, mode_field(s.read_only));
    }
    out
}

/// Parses the file (see the module documentation); empty means no shares.
pub fn decode(data: &[u8]) -> Result<Vec<ShareSpec>, SharesError> {
    let fields = split_nul(data);
    if !fields.len().is_multiple_of(3) {
        return Err(SharesError::FieldCount(fields.len()));
    }
    fields
        .chunks_exact(3)
        .enumerate()
        .map(|(i, f)| {
            let (tag, path, mode) = (f[0], f[1], f[2]);
            if tag.is_empty() {
                return Err(SharesError::EmptyTag(i));
            }
            if !path.starts_with(b"/") {
                return Err(SharesError::NotAbsolute(lossy(path)));
            }
            let read_only = parse_mode(mode).ok_or_else(|| SharesError::BadMode(lossy(mode)))?;
            Ok(ShareSpec {
                tag: tag.to_vec(),
                path: path.to_vec(),
                read_only,
            })
        })
        .collect()
}
