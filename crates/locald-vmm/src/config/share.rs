//! Share configuration: [`ShareConfig`] (one host directory exposed to the
//! guest at a path), parsed from the CLI's `--share HOST_DIR:GUEST_PATH[:ro]`
//! and checked by [`check_shares`] as part of `VmConfig::validate`. Pure
//! data; runs wherever the VM is configured.

use std::path::PathBuf;

use crate::error::ConfigError;

/// How the guest kernel caches what it reads from a share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShareCache {
    /// No caching: every read and write goes to the host (direct I/O), and
    /// names and attributes are looked up again each time. Host edits are
    /// seen at once; shared `mmap` needs a kernel that allows it on direct
    /// I/O files.
    Never,
    /// The default: file data is cached while a file stays open and dropped
    /// at each open; names and attributes are trusted for 1 s. A host edit
    /// is seen by the next `open` (attributes within 1 s).
    #[default]
    Auto,
    /// Everything cached for a day: fastest, for trees the host does not
    /// change while the VM runs.
    Always,
}

impl ShareCache {
    /// Parses `never`, `auto` or `always`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "never" => Some(Self::Never),
            "auto" => Some(Self::Auto),
            "always" => Some(Self::Always),
            _ => None,
        }
    }

    /// The name [`ShareCache::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

/// Most bytes in a guest path (the spec file and `mount(2)` limit).
pub const GUEST_PATH_MAX: usize = 1024;

/// One host directory shared with the guest over virtio-fs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// Host directory served.
    pub host_dir: PathBuf,
    /// Absolute path the default guest init mounts it at.
    pub guest_path: String,
    /// Refuse every write (on the host side; the guest also mounts it `ro`).
    pub read_only: bool,
    /// Guest caching.
    pub cache: ShareCache,
}

impl ShareConfig {
    /// Parses `HOST_DIR:GUEST_PATH[:ro|:rw]` with the given cache mode.
    pub fn parse(spec: &str, cache: ShareCache) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::ShareSpec(spec.to_string(), why.to_string());
        let (rest, read_only) = if let Some(r) = spec.strip_suffix(":ro") {
            (r, true)
        } else if let Some(r) = spec.strip_suffix(":rw") {
            (r, false)
        } else {
            (spec, false)
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            return Err(bad("expected HOST_DIR:GUEST_PATH[:ro]"));
        };
        if host.is_empty() {
            return Err(bad("empty host directory"));
        }
        Ok(ShareConfig {
            host_dir: PathBuf::from(host),
            guest_path: guest.to_string(),
            read_only,
            cache,
        })
    }

    /// The virtio-fs mount tag of the share at `index`.
    pub fn tag(index: usize) -> String {
        format!("locald-share{index}")
    }
}

/// Checks every share: the host directory exists, guest paths are
/// absolute, normalised, not `/` and unique.
pub fn check_shares(shares: &[ShareConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for s in shares {
        let spec = || format!("{}:{}", s.host_dir.display(), s.guest_path);
        let bad = |why: String| ConfigError::ShareSpec(spec(), why);
        match std::fs::metadata(&s.host_dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad("host path is not a directory".into())),
            Err(e) => return Err(bad(format!("host directory: {e}"))),
        }
        let g = &s.guest_path;
        if !g.starts_with('/') {
            return Err(bad(format!("guest path '{g}' is not absolute")));
        }
        if g.len() > GUEST_PATH_MAX || g.contains('\0') {
            return Err(bad("guest path too long or contains NUL".into()));
        }
        let parts: Vec<&str> = g.split('/').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Err(bad("cannot mount a share over /".into()));
        }
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(bad(format!("guest path '{g}' has . or .. components")));
        }
        let norm = format!("/{}", parts.join("/"));
        if !seen.insert(norm.clone()) {
            return Err(bad(format!("guest path '{norm}' is used by two shares")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modes() {
        let s = ShareConfig::parse("/tmp:/mnt/x:ro", ShareCache::Auto).unwrap();
        assert_eq!(s.host_dir, PathBuf::from("/tmp"));
        assert_eq!(s.guest_path, "/mnt/x");
        assert!(s.read_only);
        let s = ShareConfig::parse("/tmp:/mnt/x", ShareCache::Never).unwrap();
        assert!(!s.read_only);
        assert_eq!(s.cache, ShareCache::Never);
        let s = ShareConfig::parse("/a:b:/mnt:rw", ShareCache::Auto).unwrap();
        assert_eq!(s.host_dir, PathBuf::from("/a:b"));
        assert!(ShareConfig::parse("/tmp", ShareCache::Auto).is_err());
        assert!(ShareConfig::parse(":/x", ShareCache::Auto).is_err());
    }

    #[test]
    fn checks_paths() {
        let ok = |g: &str| ShareConfig::parse(&format!("/tmp:{g}"), ShareCache::Auto).unwrap();
        assert!(check_shares(&[ok("/mnt/a"), ok("/mnt/b")]).is_ok());
        let e = check_shares(&[ok("mnt")]).unwrap_err().to_string();
        assert!(e.contains("not absolute"), "{e}");
        let e = check_shares(&[ok("/mnt/a"), ok("/mnt//a/")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("used by two shares"), "{e}");
        assert!(check_shares(&[ok("/")]).is_err());
        assert!(check_shares(&[ok("/a/../b")]).is_err());
        let missing = ShareConfig::parse("/nonexistent-locald:/m", ShareCache::Auto).unwrap();
        let e = check_shares(&[missing]).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
    }
}
