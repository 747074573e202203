//! Manifests, indexes and image configs (OCI and Docker v2 schema 2),
//! parsed with `oci-spec` and checked before anything is fetched or
//! cached: schema version, media types (every layer's must be one the
//! unpacker knows), digests, platform selection. Pure functions, any
//! thread.

use std::collections::BTreeMap;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use crate::error::ImageError;
use crate::reference::is_sha256_hex;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The manifest media types we accept (the `Accept` header of a pull).
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Largest manifest, index or config we read into memory.
pub const MAX_JSON_BYTES: u64 = 8 << 20;

/// A CPU architecture an image can be for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The architecture this binary runs on (amd64 on anything but
    /// aarch64).
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    /// The OCI (GOARCH) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A manifest document: an index (or docker manifest list) or an image
/// manifest.
#[derive(Debug)]
pub(crate) enum Document {
    Index(Box<ImageIndex>),
    Image(Box<ImageManifest>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Versioned {
    schema_version: Option<u32>,
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
}

/// Parses a manifest or index. `declared` is the media type the registry
/// or the parent descriptor gave, if any; the document's own `mediaType`
/// wins, and without either the shape decides (`manifests` → index).
pub(crate) fn parse_document(
    what: &str,
    bytes: &[u8],
    declared: Option<&str>,
) -> Result<Document, ImageError> {
    let bad = |reason: String| ImageError::InvalidJson {
        what: what.to_string(),
        reason,
    };
    let v: Versioned = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if v.schema_version != Some(2) {
        return Err(bad(format!(
            "schemaVersion {:?} (only 2 is supported)",
            v.schema_version
        )));
    }
    let media_type = v
        .media_type
        .clone()
        .or_else(|| declared.map(str::to_string));
    let is_index = match media_type.as_deref() {
        Some(OCI_INDEX) | Some(DOCKER_LIST) => true,
        Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST) => false,
        None => v.manifests.is_some() && v.layers.is_none(),
        Some(other) => {
            return Err(ImageError::UnsupportedMediaType {
                what: "manifest",
                media_type: other.to_string(),
            })
        }
    };
    if is_index {
        let idx: ImageIndex = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        for d in idx.manifests() {
            check_digest(d)?;
        }
        Ok(Document::Index(Box::new(idx)))
    } else {
        let m: ImageManifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        check_manifest(&m)?;
        Ok(Document::Image(Box::new(m)))
    }
}

/// Digest syntax of a descriptor (only sha256 is supported).
pub(crate) fn check_digest(d: &Descriptor) -> Result<String, ImageError> {
    let s = d.digest().to_string();
    match s.split_once(':') {
        Some(("sha256", hex)) if is_sha256_hex(hex) => Ok(s),
        _ => Err(ImageError::InvalidDigest(s)),
    }
}

/// The config media type is an image config, every layer media type is
/// one the unpacker knows, every digest is sha256. Called before any
/// blob is fetched, so a bad manifest caches nothing.
pub(crate) fn check_manifest(m: &ImageManifest) -> Result<(), ImageError> {
    let cfg = m.config();
    check_digest(cfg)?;
    let cmt = cfg.media_type().to_string();
    if cmt != OCI_CONFIG && cmt != DOCKER_CONFIG {
        return Err(ImageError::UnsupportedMediaType {
            what: "config",
            media_type: cmt,
        });
    }
    for l in m.layers() {
        let digest = check_digest(l)?;
        let mt = l.media_type().to_string();
        if crate::unpack::Compression::from_media_type(&mt).is_err() {
            return Err(ImageError::UnknownLayerMediaType {
                digest,
                media_type: mt,
            });
        }
    }
    Ok(())
}

/// Picks `linux/<arch>` from an index. Entries without a platform are
/// taken only if the index has exactly one entry. A missing platform is
/// one error listing what the index has.
pub(crate) fn select_platform(idx: &ImageIndex, arch: Arch) -> Result<Descriptor, ImageError> {
    let entries = idx.manifests();
    let mut available = Vec::new();
    for d in entries {
        match d.platform() {
            Some(p) => {
                let os = p.os().to_string();
                let a = p.architecture().to_string();
                if os == "linux" && a == arch.as_str() {
                    // arm64 variants (v8, v9…) all run on our arm64 hosts.
                    return Ok(d.clone());
                }
                let mut s = format!("{os}/{a}");
                if let Some(v) = p.variant() {
                    s.push('/');
                    s.push_str(v);
                }
                available.push(s);
            }
            None => available.push("(no platform)".to_string()),
        }
    }
    if entries.len() == 1 && entries[0].platform().is_none() {
        return Ok(entries[0].clone());
    }
    Err(ImageError::PlatformNotFound {
        wanted: arch.to_string(),
        available: if available.is_empty() {
            "nothing".to_string()
        } else {
            available.join(", ")
        },
    })
}

/// The parts of an image config that running it needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`; `None` when unset (distinct from empty).
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd`; `None` when unset.
    pub cmd: Option<Vec<String>>,
    /// `Env`, `KEY=value` strings in order.
    pub env: Vec<String>,
    /// `WorkingDir`, if set and not empty.
    pub working_dir: Option<String>,
    /// `User` (`uid[:gid]` or names), if set and not empty.
    pub user: Option<String>,
    /// `ExposedPorts` keys, e.g. `80/tcp`, sorted.
    pub exposed_ports: Vec<String>,
    /// `Labels`.
    pub labels: BTreeMap<String, String>,
    /// `architecture` (GOARCH).
    pub architecture: String,
    /// `os` (GOOS).
    pub os: String,
    /// `rootfs.diff_ids`: digests of the uncompressed layers.
    pub diff_ids: Vec<String>,
}

/// Parses a config blob (OCI image config or docker container config).
pub(crate) fn parse_config(bytes: &[u8]) -> Result<ImageConfig, ImageError> {
    let c: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| ImageError::InvalidJson {
            what: "image config".to_string(),
            reason: e.to_string(),
        })?;
    let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    let mut out = ImageConfig {
        architecture: c.architecture().to_string(),
        os: c.os().to_string(),
        diff_ids: c.rootfs().diff_ids().clone(),
        ..ImageConfig::default()
    };
    if let Some(cfg) = c.config() {
        out.entrypoint = cfg.entrypoint().clone();
        out.cmd = cfg.cmd().clone();
        out.env = cfg.env().clone().unwrap_or_default();
        out.working_dir = nonempty(cfg.working_dir());
        out.user = nonempty(cfg.user());
        let mut ports = cfg.exposed_ports().clone().unwrap_or_default();
        ports.sort();
        ports.dedup();
        out.exposed_ports = ports;
        out.labels = cfg
            .labels()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
    }
    Ok(out)
}
