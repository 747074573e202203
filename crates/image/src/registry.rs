//! Pulling from OCI distribution-spec registries with `oci-client`, on a
//! current-thread tokio runtime that this module creates and drives with
//! `block_on` from the caller's (blocking) thread. Anonymous pulls and the
//! bearer-token flow are `oci-client`'s; credentials come from the docker
//! `config.json` `auths` (see [`docker_credentials`]). Plain HTTP only for
//! `localhost`, `127.0.0.1`, `[::1]` and registries named in
//! [`PullOptions::insecure_registries`]. An index is resolved here (not by
//! `oci-client`'s resolver) so a missing platform can list what there is
//! and the index itself is cached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_spec::image::Descriptor;
use serde::Deserialize;

use crate::cache::{sha256_digest, BlobWriter};
use crate::error::ImageError;
use crate::manifest::{self, Arch, Document};
use crate::pull::{Fetch, PullOptions, Resolved};
use crate::reference::{host_of, ImageReference, DOCKER_HUB};

/// Registry credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, ***)"),
        }
    }
}

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub fn default_docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// `https://host:port/v1/` → `host:port`.
fn auth_key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// The credentials for `registry` in the docker config at `path` (missing
/// file: anonymous). `auths` entries with `auth` (base64 `user:pass`) or
/// `username`/`password` are used; credential helpers (`credsStore`,
/// `credHelpers`) and identity tokens are not supported: a debug log says
/// so and the pull is anonymous.
pub fn docker_credentials(path: &Path, registry: &str) -> Result<Credentials, ImageError> {
    let bad = |reason: String| ImageError::DockerConfig {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(e) => return Err(bad(e.to_string())),
    };
    let cfg: DockerConfig = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let hub = registry == DOCKER_HUB;
    let matches = |k: &str| {
        let h = auth_key_host(k);
        h == registry
            || (hub && matches!(h, "index.docker.io" | "registry-1.docker.io" | "docker.io"))
    };
    if let Some(helper) = cfg
        .cred_helpers
        .iter()
        .find(|(k, _)| matches(k))
        .map(|(_, v)| v)
    {
        tracing::debug!(
            registry,
            helper,
            "docker credHelpers are not supported; pulling anonymously"
        );
        return Ok(Credentials::Anonymous);
    }
    let Some(entry) = cfg
        .auths
        .iter()
        .filter(|(k, _)| matches(k))
        .map(|(_, v)| v)
        .next()
    else {
        if let Some(store) = &cfg.creds_store {
            tracing::debug!(
                registry,
                store,
                "docker credsStore is not supported; pulling anonymously"
            );
        }
        return Ok(Credentials::Anonymous);
    };
    if let Some(a) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.trim())
            .map_err(|e| bad(format!("auths[{registry}].auth is not base64: {e}")))?;
        let s = String::from_utf8(raw)
            .map_err(|_| bad(format!("auths[{registry}].auth is not UTF-8")))?;
        let Some((u, p)) = s.split_once(':') else {
            return Err(bad(format!(
                "auths[{registry}].auth is not base64 of user:password"
            )));
        };
        return Ok(Credentials::Basic {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Credentials::Basic {
            username: u.clone(),
            password: p.clone(),
        });
    }
    if entry.identitytoken.is_some() {
        tracing::debug!(
            registry,
            "docker identity tokens are not supported; pulling anonymously"
        );
    } else if cfg.creds_store.is_some() {
        tracing::debug!(
            registry,
            "docker credsStore is not supported; pulling anonymously"
        );
    }
    Ok(Credentials::Anonymous)
}

/// True if `registry` is spoken to over plain HTTP.
pub(crate) fn is_insecure(r: &ImageReference, insecure: &[String]) -> bool {
    r.is_loopback()
        || insecure
            .iter()
            .any(|i| i == &r.registry || i.as_str() == host_of(&r.registry))
}

/// One registry pull: the runtime, the client and the reference.
pub(crate) struct RegistrySource {
    rt: tokio::runtime::Runtime,
    client: oci_client::Client,
    reference: oci_client::Reference,
    image: ImageReference,
    auth: RegistryAuth,
}

impl RegistrySource {
    pub fn new(r: &ImageReference, opts: &PullOptions) -> Result<RegistrySource, ImageError> {
        // reqwest is built without a default crypto provider; ring is ours.
        // Err means one is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ImageError::Registry {
                registry: r.registry.clone(),
                reason: format!("cannot start the I/O runtime: {e}"),
            })?;
        let protocol = if is_insecure(r, &opts.insecure_registries) {
            ClientProtocol::HttpsExcept(vec![r.registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            ..ClientConfig::default()
        };
        // reqwest's client builder needs a runtime context for its timers.
        let client = {
            let _g = rt.enter();
            oci_client::Client::new(config)
        };
        let creds = match opts.docker_config.clone().or_else(default_docker_config) {
            Some(p) => docker_credentials(&p, &r.registry)?,
            None => Credentials::Anonymous,
        };
        let auth = match creds {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => RegistryAuth::Basic(username, password),
        };
        let reference = match &r.digest {
            Some(d) => oci_client::Reference::with_digest(
                r.registry.clone(),
                r.repository.clone(),
                d.clone(),
            ),
            None => oci_client::Reference::with_tag(
                r.registry.clone(),
                r.repository.clone(),
                r.tag.clone().unwrap_or_else(|| "latest".to_string()),
            ),
        };
        Ok(RegistrySource {
            rt,
            client,
            reference,
            image: r.clone(),
            auth,
        })
    }

    fn map_err(&self, what: &str, e: OciDistributionError) -> ImageError {
        let registry = self.image.registry.clone();
        let reference = self.image.to_string();
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => ImageError::Unauthorized {
                registry,
                reference,
            },
            OciDistributionError::ServerError {
                code: 401 | 403, ..
            } => ImageError::Unauthorized {
                registry,
                reference,
            },
            OciDistributionError::ServerError { code: 404, .. }
            | OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound {
                registry,
                reference,
            },
            OciDistributionError::RegistryError { ref envelope, .. }
                if envelope.errors.iter().any(|x| {
                    let c = format!("{:?}", x.code);
                    c.contains("Unknown") || c.contains("NameUnknown")
                }) =>
            {
                ImageError::NotFound {
                    registry,
                    reference,
                }
            }
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected,
                actual,
            }) => ImageError::DigestMismatch { expected, actual },
            OciDistributionError::ServerError { code, message, .. } => ImageError::Registry {
                registry,
                reason: format!("{what}: HTTP {code}: {}", one_line(&message)),
            },
            other => ImageError::Registry {
                registry,
                reason: format!("{what}: {}", one_line(&error_chain(&other))),
            },
        }
    }

    fn manifest_raw(
        &self,
        reference: &oci_client::Reference,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let (bytes, _digest) = self
            .rt
            .block_on(self.client.pull_manifest_raw(
                reference,
                &self.auth,
                manifest::ACCEPTED_MANIFESTS,
            ))
            .map_err(|e| self.map_err("manifest", e))?;
        if bytes.len() as u64 > manifest::MAX_JSON_BYTES {
            return Err(ImageError::invalid(
                reference.whole(),
                "manifest larger than 8 MiB",
            ));
        }
        let bytes = bytes.to_vec();
        let actual = sha256_digest(&bytes);
        if let Some(want) = reference.digest() {
            if want != actual {
                return Err(ImageError::DigestMismatch {
                    expected: want.to_string(),
                    actual,
                });
            }
        }
        Ok((bytes, actual))
    }

    /// Fetches the manifest, and for an index the `linux/<arch>` one.
    pub fn resolve(&mut self, arch: Arch) -> Result<Resolved, ImageError> {
        let (bytes, digest) = self.manifest_raw(&self.reference)?;
        match manifest::parse_document("manifest", &bytes, None)? {
            Document::Image(_) => Ok(Resolved {
                manifest_digest: digest,
                manifest: bytes,
                manifest_media_type: None,
                index: None,
                fingerprint: None,
            }),
            Document::Index(idx) => {
                let d = manifest::select_platform(&idx, arch)?;
                let want = d.digest().to_string();
                let r = self.reference.clone_with_digest(want.clone());
                let (m, got) = self.manifest_raw(&r)?;
                if got != want {
                    return Err(ImageError::DigestMismatch {
                        expected: want,
                        actual: got,
                    });
                }
                Ok(Resolved {
                    manifest_digest: got,
                    manifest: m,
                    manifest_media_type: Some(d.media_type().to_string()),
                    index: Some((digest, bytes)),
                    fingerprint: None,
                })
            }
        }
    }
}

impl Fetch for RegistrySource {
    fn fetch(
        &mut self,
        desc: &Descriptor,
        w: &mut BlobWriter,
        done: &mut dyn FnMut(u64),
    ) -> Result<(), ImageError> {
        let digest = desc.digest().to_string();
        let size = desc.size();
        let od = OciDescriptor {
            media_type: desc.media_type().to_string(),
            digest: digest.clone(),
            size: i64::try_from(size).unwrap_or(i64::MAX),
            ..OciDescriptor::default()
        };
        let rt = &self.rt;
        let res: Result<(), ImageError> = rt.block_on(async {
            let mut stream = self
                .client
                .pull_blob_stream(&self.reference, &od)
                .await
                .map_err(|e| self.map_err(&format!("blob {digest}"), e))?;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(bytes) => {
                        std::io::Write::write_all(w, &bytes).map_err(|e| w.io_error(e))?;
                        done(w.written());
                    }
                    Err(e) => {
                        tracing::debug!(%digest, error = %e, "blob stream failed");
                        // oci-client's own check ends the stream with an
                        // error; report it as ours.
                        return Err(if w.written() == size {
                            ImageError::DigestMismatch {
                                expected: digest.clone(),
                                actual: w.current_digest(),
                            }
                        } else {
                            ImageError::SizeMismatch {
                                digest: digest.clone(),
                                expected: size,
                                actual: w.written(),
                            }
                        });
                    }
                }
            }
            Ok(())
        });
        res
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("locald-image-dc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn docker_config_auths() {
        let d = tmpdir("auths");
        // "user:pa:ss" (a colon in the password is kept).
        let p = write(
            &d,
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnNlY3JldA=="},
                "reg.example:5000": {"auth": "dXNlcjpwYTpzcw=="},
                "http://other.example/v2/": {"username": "u2", "password": "p2"},
                "helper.example": {}
            }, "credsStore": "desktop"}"#,
        );
        let basic = |u: &str, p: &str| Credentials::Basic {
            username: u.into(),
            password: p.into(),
        };
        assert_eq!(
            docker_credentials(&p, "docker.io").unwrap(),
            basic("hub", "secret")
        );
        assert_eq!(
            docker_credentials(&p, "reg.example:5000").unwrap(),
            basic("user", "pa:ss")
        );
        assert_eq!(
            docker_credentials(&p, "other.example").unwrap(),
            basic("u2", "p2")
        );
        assert_eq!(
            docker_credentials(&p, "helper.example").unwrap(),
            Credentials::Anonymous
        );
        assert_eq!(
            docker_credentials(&p, "unknown.example").unwrap(),
            Credentials::Anonymous
        );
        assert_eq!(
            docker_credentials(&d.join("missing.json"), "docker.io").unwrap(),
            Credentials::Anonymous
        );
        let bad = write(&d, r#"{"auths": {"x.example": {"auth": "!!"}}}"#);
        let e = docker_credentials(&bad, "x.example")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not base64"), "{e}");
        let helpers = write(
            &d,
            r#"{"credHelpers": {"x.example": "ecr-login"}, "auths": {"x.example": {"auth": "dTpw"}}}"#,
        );
        assert_eq!(
            docker_credentials(&helpers, "x.example").unwrap(),
            Credentials::Anonymous
        );
        assert!(!format!("{:?}", basic("a", "hidden")).contains("hidden"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn insecure_hosts() {
        let r = |s: &str| ImageReference::parse(s).unwrap();
        assert!(is_insecure(&r("localhost:5000/a"), &[]));
        assert!(is_insecure(&r("127.0.0.1:5000/a"), &[]));
        assert!(is_insecure(&r("[::1]:5000/a"), &[]));
        assert!(!is_insecure(&r("reg.example:5000/a"), &[]));
        assert!(is_insecure(
            &r("reg.example:5000/a"),
            &["reg.example".into()]
        ));
        assert!(is_insecure(
            &r("reg.example:5000/a"),
            &["reg.example:5000".into()]
        ));
        assert!(!is_insecure(
            &r("reg.example:5000/a"),
            &["reg.example:6000".into()]
        ));
        assert!(!is_insecure(&r("alpine"), &[]));
    }
}
