//! [`ImageStore::pull`]: what to pull ([`ImageSource`]), how
//! ([`PullOptions`]), and the import pipeline every source shares: check
//! the manifest (media types, digests) before fetching anything, fetch
//! the config and the missing layers into a staging directory with
//! verification, then commit blobs and ref. Blocking, on the caller's
//! thread (the registry source runs its own current-thread runtime).

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::Descriptor;

use crate::cache::{self, BlobWriter, ImageStore, PulledImage, Staging};
use crate::error::ImageError;
use crate::manifest::{self, Arch, Document};
use crate::progress::{Progress, ProgressEvent};
use crate::reference::ImageReference;

/// What to pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// An image in an OCI distribution registry.
    Registry(ImageReference),
    /// An OCI image layout directory; `tag` picks the manifest by its
    /// `org.opencontainers.image.ref.name` annotation.
    OciLayout { dir: PathBuf, tag: Option<String> },
    /// A `docker save` tarball (old layout or Docker 25+'s OCI layout in
    /// a tar) or an OCI archive (an OCI layout in a tar), told apart by
    /// their contents. `tag` as for `OciLayout`.
    Archive { path: PathBuf, tag: Option<String> },
}

impl ImageSource {
    /// A CLI argument: a directory holding an `oci-layout` file is an OCI
    /// layout, an existing regular file an archive (either may end in
    /// `:TAG` when the whole argument is not a path); anything else must
    /// parse as a reference. So a plain directory named `alpine` in the
    /// working directory does not shadow the image `alpine`.
    pub fn parse(arg: &str) -> Result<ImageSource, ImageError> {
        let local = |p: &Path, tag: Option<String>| -> Option<ImageSource> {
            let md = std::fs::metadata(p).ok()?;
            if md.is_dir() && p.join("oci-layout").is_file() {
                Some(ImageSource::OciLayout {
                    dir: p.to_path_buf(),
                    tag,
                })
            } else if md.is_file() {
                Some(ImageSource::Archive {
                    path: p.to_path_buf(),
                    tag,
                })
            } else {
                None
            }
        };
        if let Some(s) = local(Path::new(arg), None) {
            return Ok(s);
        }
        if let Some((path, tag)) = arg.rsplit_once(':') {
            if !tag.contains('/') && !tag.is_empty() {
                if let Some(s) = local(Path::new(path), Some(tag.to_string())) {
                    return Ok(s);
                }
            }
        }
        Ok(ImageSource::Registry(ImageReference::parse(arg)?))
    }

    /// The name the image is cached under: the normalized reference, or
    /// `oci:`/`archive:` plus the absolute path (and `:tag`).
    pub fn key(&self) -> String {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let with_tag = |s: String, t: &Option<String>| match t {
            Some(t) => format!("{s}:{t}"),
            None => s,
        };
        match self {
            ImageSource::Registry(r) => r.to_string(),
            ImageSource::OciLayout { dir, tag } => {
                with_tag(format!("oci:{}", abs(dir).display()), tag)
            }
            ImageSource::Archive { path, tag } => {
                with_tag(format!("archive:{}", abs(path).display()), tag)
            }
        }
    }
}

/// How to pull.
#[derive(Clone, Debug)]
pub struct PullOptions {
    /// The platform to pick from a multi-platform index (linux/`arch`).
    pub arch: Arch,
    /// Registries (`host` or `host:port`) spoken to over plain HTTP, in
    /// addition to `localhost`, `127.0.0.1` and `[::1]`.
    pub insecure_registries: Vec<String>,
    /// The docker `config.json` to take credentials from; `None`:
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Largest total of an image's declared blob sizes (config and
    /// layers) that a pull accepts; checked before anything is fetched.
    /// Default 32 GiB. Blobs can never grow past their declared sizes, so
    /// this bounds the disk a pull uses.
    pub max_image_bytes: u64,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            arch: Arch::host(),
            insecure_registries: Vec::new(),
            docker_config: None,
            max_image_bytes: 32 << 30,
        }
    }
}

/// Fetches blobs for the shared import pipeline.
pub(crate) trait Fetch {
    /// Writes blob `desc` into `w` (which verifies it), calling `done`
    /// with the bytes written so far now and then.
    fn fetch(
        &mut self,
        desc: &Descriptor,
        w: &mut BlobWriter,
        done: &mut dyn FnMut(u64),
    ) -> Result<(), ImageError>;
}

/// What a source resolved: the image manifest (and index) bytes.
pub(crate) struct Resolved {
    pub manifest_digest: String,
    pub manifest: Vec<u8>,
    /// Media type the registry or the parent descriptor declared.
    pub manifest_media_type: Option<String>,
    pub index: Option<(String, Vec<u8>)>,
    pub fingerprint: Option<String>,
}

/// Copies `r` into `w` in chunks, reporting progress.
pub(crate) fn copy_reader(
    mut r: impl Read,
    w: &mut BlobWriter,
    done: &mut dyn FnMut(u64),
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ImageError::Invalid {
                    what: "blob".to_string(),
                    reason: format!("read: {e}"),
                })
            }
        };
        std::io::Write::write_all(w, &buf[..n]).map_err(|e| w.io_error(e))?;
        done(w.written());
    }
}

impl ImageStore {
    /// Pulls `source` into the cache and returns it. Registry sources are
    /// always resolved again (a tag may have moved); blobs already cached
    /// are not fetched. A local source whose file (or `index.json`) is
    /// unchanged since it was cached is not read again. On any error
    /// nothing new is cached.
    pub fn pull(
        &self,
        source: &ImageSource,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<PulledImage, ImageError> {
        let key = source.key();
        let _store = self.lock_store_shared()?;
        let _ref = self.lock_ref(&key)?;
        progress.event(&ProgressEvent::Resolving { source: &key });
        match source {
            ImageSource::Registry(r) => {
                let mut reg = crate::registry::RegistrySource::new(r, opts)?;
                let resolved = reg.resolve(opts.arch)?;
                self.import(&key, resolved, &mut reg, opts, progress)
            }
            ImageSource::OciLayout { dir, tag } => {
                let fp = cache::fingerprint(&dir.join("index.json"));
                if let Some(img) = self.unchanged(&key, &fp, progress)? {
                    return Ok(img);
                }
                let mut src = crate::local::LayoutDir::open(dir)?;
                let mut resolved =
                    crate::local::resolve_layout(&mut src, tag.as_deref(), opts.arch)?;
                resolved.fingerprint = fp;
                self.import(&key, resolved, &mut src, opts, progress)
            }
            ImageSource::Archive { path, tag } => {
                let fp = cache::fingerprint(path);
                if let Some(img) = self.unchanged(&key, &fp, progress)? {
                    return Ok(img);
                }
                let mut src = crate::local::TarArchive::open(path)?;
                let mut resolved = src.resolve(tag.as_deref(), opts.arch)?;
                resolved.fingerprint = fp;
                self.import(&key, resolved, &mut src, opts, progress)
            }
        }
    }

    /// The cached image for a local source whose fingerprint matches.
    fn unchanged(
        &self,
        key: &str,
        fp: &Option<String>,
        progress: &mut dyn Progress,
    ) -> Result<Option<PulledImage>, ImageError> {
        let Some(fp) = fp else { return Ok(None) };
        let Some(r) = self.read_ref(key)? else {
            return Ok(None);
        };
        if r.fingerprint.as_deref() != Some(fp.as_str()) {
            return Ok(None);
        }
        match self.image_from_ref(&r) {
            Ok(img) => {
                progress.event(&ProgressEvent::Cached {
                    reference: key,
                    manifest_digest: &img.manifest_digest,
                });
                Ok(Some(img))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cached local image unusable; importing again");
                Ok(None)
            }
        }
    }

    /// The shared pipeline (see the module docs).
    pub(crate) fn import(
        &self,
        key: &str,
        resolved: Resolved,
        fetch: &mut dyn Fetch,
        opts: &PullOptions,
        progress: &mut dyn Progress,
    ) -> Result<PulledImage, ImageError> {
        let actual = cache::sha256_digest(&resolved.manifest);
        if actual != resolved.manifest_digest {
            return Err(ImageError::DigestMismatch {
                expected: resolved.manifest_digest,
                actual,
            });
        }
        let Document::Image(m) = manifest::parse_document(
            "manifest",
            &resolved.manifest,
            resolved.manifest_media_type.as_deref(),
        )?
        else {
            return Err(ImageError::invalid(
                &resolved.manifest_digest,
                "an index where an image manifest was expected",
            ));
        };
        let total: u64 = m
            .layers()
            .iter()
            .map(|l| l.size())
            .fold(0u64, u64::saturating_add);
        let declared = total.saturating_add(m.config().size());
        if declared > opts.max_image_bytes {
            return Err(ImageError::TooLarge {
                declared,
                max: opts.max_image_bytes,
            });
        }
        progress.event(&ProgressEvent::Manifest {
            digest: &resolved.manifest_digest,
            layers: m.layers().len(),
            total_bytes: total,
        });

        let mut staging = self.staging()?;
        if let Some((d, bytes)) = &resolved.index {
            staging.put_bytes(d, bytes)?;
        }
        staging.put_bytes(&resolved.manifest_digest, &resolved.manifest)?;

        // The config: fetched, verified, and parsed before any layer.
        let cfg = m.config();
        let cfg_digest = cfg.digest().to_string();
        if cfg.size() > manifest::MAX_JSON_BYTES {
            return Err(ImageError::invalid(&cfg_digest, "config larger than 8 MiB"));
        }
        let cfg_bytes = if self.has_blob(&cfg_digest, Some(cfg.size())) {
            self.read_blob(&cfg_digest)?
        } else {
            fetch_into(&mut staging, fetch, cfg, &mut |_| {})?;
            staging.read(&cfg_digest)?
        };
        manifest::parse_config(&cfg_bytes)?;

        let count = m.layers().len();
        for (i, l) in m.layers().iter().enumerate() {
            let index = i + 1;
            let digest = l.digest().to_string();
            let size = l.size();
            if self.has_blob(&digest, Some(size)) {
                progress.event(&ProgressEvent::LayerCached {
                    index,
                    count,
                    digest: &digest,
                    size,
                });
                continue;
            }
            progress.event(&ProgressEvent::LayerStarted {
                index,
                count,
                digest: &digest,
                size,
            });
            let mut last = 0u64;
            fetch_into(&mut staging, fetch, l, &mut |done| {
                if done - last >= 512 * 1024 || done == size {
                    last = done;
                    progress.event(&ProgressEvent::LayerBytes { index, done, size });
                }
            })?;
            progress.event(&ProgressEvent::LayerVerified {
                index,
                count,
                digest: &digest,
                size,
            });
        }

        staging.commit()?;
        let r = cache::new_ref(
            key,
            &resolved.manifest_digest,
            resolved.index.map(|(d, _)| d),
            resolved.fingerprint,
        );
        self.write_ref(&r)?;
        let img = self.image_from_ref(&r)?;
        progress.event(&ProgressEvent::Cached {
            reference: key,
            manifest_digest: &img.manifest_digest,
        });
        Ok(img)
    }
}

fn fetch_into(
    staging: &mut Staging<'_>,
    fetch: &mut dyn Fetch,
    desc: &Descriptor,
    done: &mut dyn FnMut(u64),
) -> Result<(), ImageError> {
    let digest = desc.digest().to_string();
    let mut w = staging.writer(&digest, Some(desc.size()))?;
    fetch.fetch(desc, &mut w, done)?;
    w.finish()?;
    staging.add(digest);
    Ok(())
}
