//! Image references, parsed and normalized as docker does
//! (`distribution/reference`'s `ParseNormalizedNamed`): `alpine` is
//! `docker.io/library/alpine:latest`, `user/app:tag` is
//! `docker.io/user/app:tag`, `host:5000/ns/app@sha256:…` keeps its host.
//! The first path component is a registry host when it contains `.` or
//! `:`, is `localhost`, or has an upper-case letter (docker's rule);
//! otherwise the registry is `docker.io`. Pure functions, any thread.

use std::fmt;

use thiserror::Error;

/// The default registry of short names.
pub const DOCKER_HUB: &str = "docker.io";

/// Longest repository path (docker's `NameTotalLengthMax`).
const MAX_NAME_LEN: usize = 255;
/// Longest tag.
const MAX_TAG_LEN: usize = 128;

/// Why a reference does not parse. One line each.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error("image reference {0:?}: invalid registry host")]
    InvalidHost(String),
    #[error("image reference {0:?}: invalid repository name (lower-case letters, digits and separators . _ __ - only)")]
    InvalidName(String),
    #[error("image reference {0:?}: repository name longer than 255 characters")]
    NameTooLong(String),
    #[error("image reference {0:?}: invalid tag (at most 128 of [A-Za-z0-9_.-], not starting with . or -)")]
    InvalidTag(String),
    #[error(
        "image reference {0:?}: invalid digest (expected sha256: and 64 lower-case hex digits)"
    )]
    InvalidDigest(String),
    #[error("image reference {0:?}: digest algorithm not supported (only sha256)")]
    UnsupportedDigest(String),
}

/// A parsed, normalized image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Registry host, with `:port` if given (`docker.io` for short names).
    pub registry: String,
    /// Repository path, e.g. `library/alpine`.
    pub repository: String,
    /// Tag; `latest` when neither a tag nor a digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>` when given.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses `s` as docker does (see the module docs).
    pub fn parse(s: &str) -> Result<ImageReference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let err_name = || ReferenceError::InvalidName(s.to_string());
        // Digest first: `name[:tag]@digest`.
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                validate_digest(s, d)?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let i = last_slash + i;
                (&rest[..i], Some(&rest[i + 1..]))
            }
            None => (rest, None),
        };
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(ReferenceError::InvalidTag(s.to_string()));
            }
        }
        if name.is_empty() {
            return Err(err_name());
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, remainder)) if is_registry_host(first) => {
                if !valid_host(first) {
                    return Err(ReferenceError::InvalidHost(s.to_string()));
                }
                (first.to_string(), remainder.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(err_name());
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong(s.to_string()));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(ImageReference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The host part of the registry, without `:port` (brackets kept for
    /// IPv6: `[::1]`).
    pub fn host(&self) -> &str {
        host_of(&self.registry)
    }

    /// True for `localhost`, `127.0.0.1` and `[::1]` registries (any port):
    /// the only ones spoken to over plain HTTP without being named insecure.
    pub fn is_loopback(&self) -> bool {
        matches!(self.host(), "localhost" | "127.0.0.1" | "[::1]")
    }

    /// The same repository at `digest` (tag dropped).
    pub fn with_digest(&self, digest: &str) -> ImageReference {
        ImageReference {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        }
    }
}

impl fmt::Display for ImageReference {
    /// The normalized form: `registry/repository[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageReference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageReference::parse(s)
    }
}

/// `host[:port]` → `host` (IPv6 `[…]` kept whole).
pub(crate) fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        match registry.find(']') {
            Some(i) => &registry[..=i],
            None => registry,
        }
    } else {
        registry.split(':').next().unwrap_or(registry)
    }
}

/// Docker's rule for "the first component is a registry".
fn is_registry_host(first: &str) -> bool {
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.bytes().any(|b| b.is_ascii_uppercase())
}

/// `host[:port]`: DNS labels or an `[IPv6]` literal, optional numeric port.
fn valid_host(h: &str) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let ip = &rest[..end];
        if ip.is_empty()
            || !ip
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        let after = &rest[end + 1..];
        match after.strip_prefix(':') {
            Some(p) => (None, Some(p)),
            None if after.is_empty() => (None, None),
            None => return false,
        }
    } else {
        match h.split_once(':') {
            Some((host, p)) => (Some(host), Some(p)),
            None => (Some(h), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    match host {
        None => true,
        Some(host) => {
            !host.is_empty()
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                })
        }
    }
}

/// One repository path component: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let mut need_alnum = true;
    while i < b.len() {
        if alnum(b[i]) {
            need_alnum = false;
            i += 1;
            continue;
        }
        if need_alnum {
            return false;
        }
        // A separator: ".", "_", "__" or one or more "-".
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > start);
        need_alnum = true;
    }
    !need_alnum
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

fn validate_digest(whole: &str, d: &str) -> Result<(), ReferenceError> {
    match d.split_once(':') {
        Some(("sha256", hex)) if is_sha256_hex(hex) => Ok(()),
        Some(("sha256", _)) => Err(ReferenceError::InvalidDigest(whole.to_string())),
        Some((alg, hex))
            if !alg.is_empty()
                && alg.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b)
                })
                && hex.len() >= 32
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b)) =>
        {
            Err(ReferenceError::UnsupportedDigest(whole.to_string()))
        }
        _ => Err(ReferenceError::InvalidDigest(whole.to_string())),
    }
}

/// 64 lower-case hex digits.
pub(crate) fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        ImageReference::parse(s).unwrap().to_string()
    }

    #[test]
    fn short_names_normalize_like_docker() {
        assert_eq!(norm("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(norm("alpine:3.19"), "docker.io/library/alpine:3.19");
        assert_eq!(norm("user/app:tag"), "docker.io/user/app:tag");
        assert_eq!(norm("user/sub/app"), "docker.io/user/sub/app:latest");
        assert_eq!(norm("docker.io/alpine"), "docker.io/library/alpine:latest");
        assert_eq!(
            norm("index.docker.io/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            norm("docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
    }

    #[test]
    fn registry_hosts() {
        let r = ImageReference::parse(&format!("host:5000/ns/app@{D}")).unwrap();
        assert_eq!(r.registry, "host:5000");
        assert_eq!(r.repository, "ns/app");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.host(), "host");
        assert!(!r.is_loopback());
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert!(ImageReference::parse("localhost/app")
            .unwrap()
            .is_loopback());
        assert!(ImageReference::parse("localhost:5000/app")
            .unwrap()
            .is_loopback());
        assert!(ImageReference::parse("127.0.0.1:41234/a/b:t")
            .unwrap()
            .is_loopback());
        let v6 = ImageReference::parse("[::1]:5000/app:1").unwrap();
        assert_eq!(v6.registry, "[::1]:5000");
        assert!(v6.is_loopback());
        assert_eq!(norm("ghcr.io/owner/img:v1"), "ghcr.io/owner/img:v1");
        assert_eq!(norm("quay.io/a/b/c"), "quay.io/a/b/c:latest");
        // Not a host: no dot, colon or upper case, not localhost.
        assert_eq!(norm("myhost/app"), "docker.io/myhost/app:latest");
        // Upper case in the first component makes it a host (docker's rule).
        assert_eq!(
            ImageReference::parse("MyHost/app").unwrap().registry,
            "MyHost"
        );
    }

    #[test]
    fn tag_and_digest() {
        let r = ImageReference::parse(&format!("alpine:3@{D}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("3"));
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.to_string(), format!("docker.io/library/alpine:3@{D}"));
        let r = ImageReference::parse(&format!("alpine@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{D}"));
        assert_eq!(r.with_digest(D).to_string(), r.to_string());
        // A port is not a tag.
        let r = ImageReference::parse("host:5000/app").unwrap();
        assert_eq!(r.registry, "host:5000");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = ImageReference::parse("host:5000/app:v2").unwrap();
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.name(), "host:5000/app");
    }

    #[test]
    fn invalid_references() {
        use ReferenceError::*;
        let e = |s: &str| ImageReference::parse(s).unwrap_err();
        assert_eq!(e(""), Empty);
        assert!(matches!(e("Alpine"), InvalidName(_)));
        assert!(matches!(e("alpine:"), InvalidTag(_)));
        assert!(matches!(e("alpine:-x"), InvalidTag(_)));
        assert!(matches!(e("alpine:a/b"), InvalidHost(_)));
        assert!(matches!(
            e(&format!("alpine:{}", "t".repeat(129))),
            InvalidTag(_)
        ));
        assert!(matches!(e("alpine@sha256:abc"), InvalidDigest(_)));
        assert!(matches!(e("alpine@sha256:"), InvalidDigest(_)));
        assert!(matches!(
            e(&format!("alpine@sha256:{}", "A".repeat(64))),
            InvalidDigest(_)
        ));
        assert!(matches!(
            e(&format!("alpine@sha512:{}", "a".repeat(128))),
            UnsupportedDigest(_)
        ));
        assert!(matches!(e("alpine@"), InvalidDigest(_)));
        assert!(matches!(e("a//b"), InvalidName(_)));
        assert!(matches!(e("/a"), InvalidName(_)));
        assert!(matches!(e("a/"), InvalidName(_)));
        assert!(matches!(e("a..b"), InvalidName(_)));
        assert!(matches!(e("a___b"), InvalidName(_)));
        assert!(matches!(e("-a"), InvalidName(_)));
        assert!(matches!(e("a-"), InvalidName(_)));
        assert!(matches!(e("host:port/app"), InvalidHost(_)));
        assert!(matches!(e("host:123456/app"), InvalidHost(_)));
        assert!(matches!(e("-bad.host/app"), InvalidHost(_)));
        assert!(matches!(e("[zz]:5/app"), InvalidHost(_)));
        assert!(matches!(e(&"a".repeat(300)), NameTooLong(_)));
        assert!(matches!(e("a b"), InvalidName(_)));
        assert!(matches!(e("a/../b"), InvalidName(_)));
    }

    #[test]
    fn valid_separators() {
        for ok in ["a.b", "a_b", "a__b", "a-b", "a---b", "a0.b1_c2__d3-e4", "0"] {
            assert!(ImageReference::parse(ok).is_ok(), "{ok}");
        }
        // `localhost:5000` alone is the repository `localhost` with tag 5000.
        let r = ImageReference::parse("localhost:5000").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/localhost:5000");
    }

    #[test]
    fn errors_are_one_line() {
        for s in ["", "Alpine", "alpine@sha256:x", "h:p/a", "a:-"] {
            let msg = ImageReference::parse(s).unwrap_err().to_string();
            assert!(!msg.contains('\n'), "{msg}");
        }
    }
}
