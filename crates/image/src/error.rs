//! The error of the pulling and caching seam ([`crate::store`],
//! [`crate::registry`], [`crate::local`]): one enum, one line per value.
//! Any thread.

use std::path::PathBuf;

use thiserror::Error;

use crate::reference::ReferenceError;

/// Why a pull, a cache read or a cache change failed.
#[derive(Debug, Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("image cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },

    #[error("blob {expected}: content has digest {actual} (corrupt or tampered; nothing cached)")]
    DigestMismatch { expected: String, actual: String },

    #[error("blob {digest}: {actual} bytes, but {expected} were declared (truncated or oversized; nothing cached)")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },

    #[error("invalid digest {0:?} (expected sha256: and 64 lower-case hex digits)")]
    InvalidDigest(String),

    #[error("layer {digest}: unknown media type {media_type:?} (nothing cached)")]
    UnknownLayerMediaType { digest: String, media_type: String },

    #[error("unsupported {what} media type {media_type:?}")]
    UnsupportedMediaType {
        what: &'static str,
        media_type: String,
    },

    #[error("invalid {what}: {reason}")]
    InvalidJson { what: String, reason: String },

    #[error("no linux/{wanted} image in the index; it has: {available}")]
    PlatformNotFound { wanted: String, available: String },

    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },

    #[error("registry {registry}: {reason}")]
    Registry { registry: String, reason: String },

    #[error("registry {registry}: access denied (401/403) for {reference}; check credentials in the docker config.json")]
    Unauthorized { registry: String, reference: String },

    #[error("registry {registry}: {reference} not found")]
    NotFound { registry: String, reference: String },

    #[error(
        "image declares {declared} bytes of blobs, more than the {max} allowed (nothing cached)"
    )]
    TooLarge { declared: u64, max: u64 },

    #[error("no image {0} in the cache")]
    NotCached(String),

    #[error("docker config {path}: {reason}")]
    DockerConfig { path: PathBuf, reason: String },
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        ImageError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
