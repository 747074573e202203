//! Typed errors of the unpacker: one [`UnpackError`] per failed layer, with
//! a [`Rejection`] naming why an entry was refused.
//!
//! Plain data, created on the unpacker's (the caller's) thread.

use std::io;
use std::path::PathBuf;

use super::Compression;

/// Which path of an entry a rejection is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRole {
    /// The entry's own name.
    Name,
    /// A hard link's target.
    LinkTarget,
    /// A symlink's target (stored verbatim, only its length and bytes are
    /// checked).
    SymlinkTarget,
}

impl std::fmt::Display for PathRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathRole::Name => "name",
            PathRole::LinkTarget => "hard-link target",
            PathRole::SymlinkTarget => "symlink target",
        })
    }
}

/// Why one tar entry was refused. Any rejection aborts the layer.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("empty {0}")]
    Empty(PathRole),
    #[error("{0} contains a NUL byte")]
    Nul(PathRole),
    #[error("absolute {0}")]
    Absolute(PathRole),
    #[error("{0} has a `..` component")]
    DotDot(PathRole),
    #[error("{role} is {len} bytes long (limit {max})")]
    PathTooLong {
        role: PathRole,
        len: usize,
        max: usize,
    },
    #[error("{role} has {depth} components (limit {max})")]
    TooDeep {
        role: PathRole,
        depth: usize,
        max: usize,
    },
    #[error("more than {max} symlinks on the way to the parent directory")]
    SymlinkLoop { max: u32 },
    #[error("a symlink with an empty target on the way: {}", .0.escape_ascii())]
    EmptySymlink(Vec<u8>),
    #[error("a parent component is not a directory: {}", .0.escape_ascii())]
    NotADirectory(Vec<u8>),
    #[error("only a directory may stand for the root (`.`)")]
    RootNotDirectory,
    #[error("bad whiteout name")]
    BadWhiteout,
    #[error("hard-link target does not exist: {}", .0.escape_ascii())]
    LinkTargetMissing(Vec<u8>),
    #[error("hard-link target is a directory: {}", .0.escape_ascii())]
    LinkTargetIsDirectory(Vec<u8>),
    #[error("{kind} entry without a {role}")]
    MissingLinkName { kind: &'static str, role: PathRole },
    #[error("sparse files are not supported")]
    Sparse,
    #[error("unsupported entry type {0:#04x}")]
    UnsupportedType(u8),
    #[error("device entry without major/minor numbers")]
    BadDevice,
    #[error("declared size {size} exceeds the remaining byte budget {remaining}")]
    TooLarge { size: u64, remaining: u64 },
    #[error("data is truncated ({got} of {size} bytes)")]
    Truncated { got: u64, size: u64 },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Which [`super::Limits`] field was exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitKind {
    /// `max_bytes`: uncompressed tar bytes over all layers.
    Bytes,
    /// `max_entries`.
    Entries,
    /// `max_metadata_bytes`: PAX / GNU long-name data of one entry.
    Metadata,
}

/// Why a layer (or the unpacker) failed. The staging tree may hold part of
/// the failed layer: callers discard it (it never holds anything outside
/// the root).
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("unknown layer media type {0:?}")]
    UnknownMediaType(String),
    #[error("layer declared as {declared:?} but its data looks like {found:?}")]
    CompressionMismatch {
        declared: Compression,
        found: Compression,
    },
    #[error("opening the staging root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed or truncated layer: {0}")]
    Read(#[source] io::Error),
    #[error("layer exceeds the {kind:?} limit ({max})")]
    Limit { kind: LimitKind, max: u64 },
    #[error("entry {index} ({}): {reason}", .path.escape_ascii())]
    Entry {
        /// 0-based index of the entry in the layer.
        index: u64,
        /// The entry's name, as raw bytes.
        path: Vec<u8>,
        #[source]
        reason: Rejection,
    },
    #[error("setting directory times: {0}")]
    Finish(#[source] io::Error),
}
