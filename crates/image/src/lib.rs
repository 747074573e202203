//! `locald-image`: OCI images for locald-vmm. Getting images into a local
//! content-addressed cache ([`cache::ImageStore`], from registries
//! ([`registry`]) and local layouts and archives ([`local`]), with image
//! references parsed as docker does ([`reference`])), and the layer
//! unpacker ([`unpack`]), which stages an image's root filesystem on the
//! host plus a metadata table, and the ext4 builder ([`rootfs`]), which
//! turns both into a cached, read-only root disk. Library code only,
//! run on the caller's thread (a registry pull drives its own
//! current-thread tokio runtime on it). See `docs/oci-images.md`.

pub mod cache;
pub mod error;
pub mod local;
pub mod manifest;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod rootfs;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod unpack;

pub use cache::{ImageEntry, ImageStore, Layer, PruneStats, PulledImage};
pub use error::ImageError;
pub use manifest::{Arch, ImageConfig};
pub use progress::{NoProgress, Progress, ProgressEvent, TerminalProgress};
pub use pull::{ImageSource, PullOptions};
pub use reference::{ImageReference, ReferenceError};
