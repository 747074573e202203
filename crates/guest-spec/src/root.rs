//! `/.locald/root`: boot from a disk. Exactly three NUL-terminated fields
//! `DEVICE\0FSTYPE\0MODE\0`, e.g. `/dev/vda\0ext4\0rw\0`. Pure functions,
//! any thread.
//!
//! `MODE` is exactly `rw`, `ro`, `ro+overlay` or `rw+overlay` (no
//! newline). `+overlay`: the disk is the lower layer of an overlay whose
//! upper layer is a tmpfs, and the overlay becomes `/` (each VM gets its
//! own writable view of a shared, cached image; `ro+overlay` is what
//! `run --image` uses). Files without `+overlay` are byte-for-byte those of
//! before the flag existed. `DEVICE` and `FSTYPE` must
//! be non-empty and are otherwise raw bytes: non-UTF-8 is accepted and
//! handed to `mount(2)` unchanged. The last NUL may be missing; any other
//! field count (a doubled final NUL included) is an error.

use crate::fields::{lossy, mode_field, parse_mode, push_field, split_nul};

/// The filesystem to use as `/`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootSpec {
    /// Block device (any `mount(2)` source), e.g. `/dev/vda`.
    pub device: Vec<u8>,
    /// Filesystem type for `mount(2)`, e.g. `ext4`.
    pub fstype: Vec<u8>,
    /// Mount the disk read-only (`MODE` = `ro` or `ro+overlay`).
    pub read_only: bool,
    /// Mount the disk as the lower layer of an overlay with a tmpfs upper
    /// layer, and make the overlay `/` (`MODE` ends in `+overlay`).
    pub overlay: bool,
}

/// The `MODE` suffix that asks for an overlay root.
pub const OVERLAY_SUFFIX: &[u8] = b"+overlay";

/// Why `/.locald/root` was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootError {
    /// Not exactly three fields (the count found).
    FieldCount(usize),
    /// `DEVICE` is empty.
    EmptyDevice,
    /// `FSTYPE` is empty (for the named device).
    EmptyFstype(String),
    /// `MODE` is not `rw` or `ro`, optionally followed by `+overlay`
    /// (device, mode as found).
    BadMode(String, String),
}

impl std::fmt::Display for RootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FieldCount(n) => write!(
                f,
                "expected 3 NUL-terminated fields DEVICE, FSTYPE, MODE, found {n}"
            ),
            Self::EmptyDevice => write!(f, "empty DEVICE"),
            Self::EmptyFstype(dev) => write!(f, "empty FSTYPE for {dev}"),
            Self::BadMode(dev, mode) => {
                write!(
                    f,
                    "MODE for {dev} must be 'rw' or 'ro', optionally followed by '+overlay', got '{mode}'"
                )
            }
        }
    }
}

impl std::error::Error for RootError {}

impl RootSpec {
    /// The file's bytes (fields cut at a NUL).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        push_field(&mut out, &self.device);
        push_field(&mut out, &self.fstype);
        let mut mode = mode_field(self.read_only).to_vec();
        if self.overlay {
            mode.extend_from_slice(OVERLAY_SUFFIX);
        }
        push_field(&mut out, &mode);
        out
    }

    /// Parses the file (see the module documentation).
    pub fn decode(data: &[u8]) -> Result<Self, RootError> {
        let fields = split_nul(data);
        let [device, fstype, mode] = fields[..] else {
            return Err(RootError::FieldCount(fields.len()));
        };
        if device.is_empty() {
            return Err(RootError::EmptyDevice);
        }
        if fstype.is_empty() {
            return Err(RootError::EmptyFstype(lossy(device)));
        }
        let (base, overlay) = match mode.strip_suffix(OVERLAY_SUFFIX) {
            Some(base) => (base, true),
            None => (mode, false),
        };
        let read_only =
            parse_mode(base).ok_or_else(|| RootError::BadMode(lossy(device), lossy(mode)))?;
        Ok(RootSpec {
            device: device.to_vec(),
            fstype: fstype.to_vec(),
            read_only,
            overlay,
        })
    }
}
