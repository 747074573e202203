//! The content-addressed image cache ([`ImageStore`]), under a directory
//! the caller owns and trusts (`<locald cache dir>/images`):
//!
//! ```text
//! blobs/sha256/<hex>      manifests, indexes, configs, layers (0644)
//! blobs/.tmp-<pid>-<n>/   a pull's staging directory (removed when done)
//! refs/<sha256(key)>.json one per cached name: key → manifest digest (0600)
//! locks/                  flock(2) files: store.lock, ref-<hash>.lock
//! ```
//!
//! A pull fetches every blob into its own staging directory, hashing
//! while it writes; a blob is checked against its digest and declared
//! size and fsynced there, and only when *all* of the image's blobs are
//! good are they renamed into `blobs/sha256/` and the ref written (temp
//! file + rename). A mismatch is one error and leaves nothing: the
//! staging directory goes, no blob or ref appears. An interrupted pull
//! leaves only its staging directory, which the next [`ImageStore::open`]
//! removes once its process is gone.
//!
//! Concurrency: a pull holds `store.lock` shared and `ref-<hash>.lock`
//! exclusive; [`ImageStore::prune`] holds `store.lock` exclusive. So two
//! pulls of one image (threads or processes) run one after the other, the
//! second finding every blob present; renaming identical content over a
//! blob another pull just placed is harmless. Everything is created with
//! `O_NOFOLLOW`, directories 0700.
//!
//! Blocking file I/O, on the caller's thread.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::ImageError;
use crate::manifest::{self, Document, ImageConfig};
use crate::reference::is_sha256_hex;

/// What a pull or [`ImageStore::get`] returns: everything the rootfs
/// builder and the VM config need, with layer paths inside the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PulledImage {
    /// The name it is cached under: a normalized reference
    /// (`docker.io/library/alpine:latest`) or a local source key
    /// (`oci-archive:/abs/path.tar`).
    pub reference: String,
    /// Digest of the image manifest (the platform's, for an index).
    pub manifest_digest: String,
    /// Digest of the index it was picked from, if any.
    pub index_digest: Option<String>,
    /// Digest of the config blob.
    pub config_digest: String,
    /// The parsed config.
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
}

impl PulledImage {
    /// A stable key for caches derived from this image (the rootfs cache):
    /// the manifest digest's hex.
    pub fn key(&self) -> &str {
        self.manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(&self.manifest_digest)
    }
}

/// One layer blob in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub digest: String,
    /// As the manifest declares it; pass to `Unpacker::apply_layer`.
    pub media_type: String,
    /// Compressed size in bytes.
    pub size: u64,
    /// `blobs/sha256/<hex>` in the cache.
    pub path: PathBuf,
}

/// One line of `images`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    pub reference: String,
    pub manifest_digest: String,
    /// Bytes on disk of its manifest(s), config and layers (shared blobs
    /// count for every image that uses them).
    pub size: u64,
    /// When it was pulled (seconds since the epoch).
    pub created: u64,
}

/// What [`ImageStore::prune`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub blobs_removed: usize,
    pub bytes_freed: u64,
}

/// A ref file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RefRecord {
    pub key: String,
    pub manifest_digest: String,
    pub index_digest: Option<String>,
    pub created: u64,
    /// For local sources: size, mtime and inode of the input, so an
    /// unchanged input is not read again.
    pub fingerprint: Option<String>,
}

/// The cache. Cheap to open; one per process or per operation.
#[derive(Debug)]
pub struct ImageStore {
    dir: PathBuf,
    blobs: PathBuf,
    refs: PathBuf,
    locks: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A name for a temp file or dir that says which process owns it.
fn tmp_name() -> String {
    format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn mkdir(p: &Path) -> Result<(), ImageError> {
    match fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let md = fs::symlink_metadata(p).map_err(|e| ImageError::io("stat", p, e))?;
            if md.is_dir() {
                Ok(())
            } else {
                Err(ImageError::Cache {
                    path: p.to_path_buf(),
                    reason: "exists and is not a directory (or is a symlink)".to_string(),
                })
            }
        }
        Err(e) => Err(ImageError::io("mkdir", p, e)),
    }
}

pub(crate) fn create_file(p: &Path, mode: u32) -> Result<File, ImageError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| ImageError::io("create", p, e))
}

pub(crate) fn open_nofollow(p: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| ImageError::io("open", p, e))
}

fn fsync_dir(p: &Path) -> Result<(), ImageError> {
    let d = File::open(p).map_err(|e| ImageError::io("open", p, e))?;
    d.sync_all().map_err(|e| ImageError::io("fsync", p, e))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// The hex of a `sha256:` digest, or an error.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(h) if is_sha256_hex(h) => Ok(h),
        _ => Err(ImageError::InvalidDigest(digest.to_string())),
    }
}

/// True unless `kill(pid, 0)` says the process does not exist.
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission;
    // it has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The pid in a `.tmp-<pid>-<n>` name.
fn tmp_owner(name: &str) -> Option<u32> {
    name.strip_prefix(".tmp-")?.split('-').next()?.parse().ok()
}

/// An flock(2) on a file under `locks/`; released on drop (close).
#[derive(Debug)]
pub(crate) struct Lock {
    _file: File,
}

impl Lock {
    fn take(path: &Path, exclusive: bool) -> Result<Lock, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| ImageError::io("open lock", path, e))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let r = unsafe { libc::flock(file.as_raw_fd(), op) };
            if r == 0 {
                return Ok(Lock { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ImageError::io("flock", path, e));
            }
        }
    }
}

impl ImageStore {
    /// Opens (creating if needed) the cache at `dir`. The caller has
    /// checked that `dir`'s parent is trusted (owner, mode). Removes the
    /// staging directories and temp files of pulls whose process is gone.
    pub fn open(dir: &Path) -> Result<ImageStore, ImageError> {
        mkdir(dir)?;
        let s = ImageStore {
            dir: dir.to_path_buf(),
            blobs: dir.join("blobs/sha256"),
            refs: dir.join("refs"),
            locks: dir.join("locks"),
        };
        mkdir(&dir.join("blobs"))?;
        mkdir(&s.blobs)?;
        mkdir(&s.refs)?;
        mkdir(&s.locks)?;
        s.sweep(&dir.join("blobs"))?;
        s.sweep(&s.refs)?;
        Ok(s)
    }

    fn sweep(&self, dir: &Path) -> Result<(), ImageError> {
        let rd = fs::read_dir(dir).map_err(|e| ImageError::io("read dir", dir, e))?;
        for ent in rd.flatten() {
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(pid) = tmp_owner(name) else { continue };
            if pid != std::process::id() && !pid_alive(pid) {
                let p = ent.path();
                tracing::debug!(path = %p.display(), "removing a dead pull's temp files");
                let is_dir = ent.file_type().is_ok_and(|t| t.is_dir());
                let _ = if is_dir {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
        Ok(())
    }

    /// The cache directory (for the rootfs cache next to it, say).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where blob `digest` lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.blobs.join(digest_hex(digest)?))
    }

    /// True if blob `digest` is present with `size` bytes (`None`: any).
    pub(crate) fn has_blob(&self, digest: &str, size: Option<u64>) -> bool {
        let Ok(p) = self.blob_path(digest) else {
            return false;
        };
        match fs::symlink_metadata(p) {
            Ok(md) => md.is_file() && size.is_none_or(|s| md.len() == s),
            Err(_) => false,
        }
    }

    pub(crate) fn read_blob(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.blob_path(digest)?;
        let f = open_nofollow(&p)?;
        let mut v = Vec::new();
        f.take(manifest::MAX_JSON_BYTES + 1)
            .read_to_end(&mut v)
            .map_err(|e| ImageError::io("read", &p, e))?;
        if v.len() as u64 > manifest::MAX_JSON_BYTES {
            return Err(ImageError::invalid(digest, "JSON blob larger than 8 MiB"));
        }
        Ok(v)
    }

    pub(crate) fn lock_store_shared(&self) -> Result<Lock, ImageError> {
        Lock::take(&self.locks.join("store.lock"), false)
    }

    pub(crate) fn lock_ref(&self, key: &str) -> Result<Lock, ImageError> {
        let h = hex(&Sha256::digest(key.as_bytes()));
        Lock::take(&self.locks.join(format!("ref-{}.lock", &h[..32])), true)
    }

    fn ref_path(&self, key: &str) -> PathBuf {
        self.refs
            .join(format!("{}.json", hex(&Sha256::digest(key.as_bytes()))))
    }

    pub(crate) fn read_ref(&self, key: &str) -> Result<Option<RefRecord>, ImageError> {
        let p = self.ref_path(key);
        let f = match open_nofollow(&p) {
            Ok(f) => f,
            Err(ImageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let r: RefRecord =
            serde_json::from_reader(std::io::BufReader::new(f)).map_err(|e| ImageError::Cache {
                path: p.clone(),
                reason: format!("corrupt ref: {e}"),
            })?;
        if r.key != key {
            return Err(ImageError::Cache {
                path: p,
                reason: format!("ref names {:?}, not {key:?}", r.key),
            });
        }
        Ok(Some(r))
    }

    /// Writes a ref atomically (temp file, fsync, rename, fsync dir).
    pub(crate) fn write_ref(&self, r: &RefRecord) -> Result<(), ImageError> {
        let tmp = self.refs.join(tmp_name());
        let res = (|| {
            let mut f = create_file(&tmp, 0o600)?;
            let bytes = serde_json::to_vec_pretty(r).map_err(|e| ImageError::Cache {
                path: tmp.clone(),
                reason: e.to_string(),
            })?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| ImageError::io("write", &tmp, e))?;
            let dst = self.ref_path(&r.key);
            fs::rename(&tmp, &dst).map_err(|e| ImageError::io("rename", &dst, e))?;
            fsync_dir(&self.refs)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// A new staging directory for one pull.
    pub(crate) fn staging(&self) -> Result<Staging<'_>, ImageError> {
        let dir = self.dir.join("blobs").join(tmp_name());
        mkdir(&dir)?;
        Ok(Staging {
            store: self,
            dir,
            staged: Vec::new(),
        })
    }

    /// The cached image named `name` (a reference, normalized first, or a
    /// local source key as [`ImageStore::list`] shows it), without any
    /// network access. Blobs were verified when they were cached; here
    /// only their presence and sizes are checked.
    pub fn get(&self, name: &str) -> Result<Option<PulledImage>, ImageError> {
        let key = normalize_name(name);
        match self.read_ref(&key)? {
            Some(r) => self.image_from_ref(&r).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn image_from_ref(&self, r: &RefRecord) -> Result<PulledImage, ImageError> {
        let bytes = self.read_blob(&r.manifest_digest)?;
        let Document::Image(m) = manifest::parse_document("cached manifest", &bytes, None)? else {
            return Err(ImageError::Cache {
                path: self.blob_path(&r.manifest_digest)?,
                reason: "ref points to an index, not a manifest".to_string(),
            });
        };
        let config_digest = m.config().digest().to_string();
        let config = manifest::parse_config(&self.read_blob(&config_digest)?)?;
        let mut layers = Vec::new();
        for l in m.layers() {
            let digest = l.digest().to_string();
            if !self.has_blob(&digest, Some(l.size())) {
                return Err(ImageError::Cache {
                    path: self.blob_path(&digest)?,
                    reason: format!("layer of {} missing or of the wrong size", r.key),
                });
            }
            layers.push(Layer {
                path: self.blob_path(&digest)?,
                digest,
                media_type: l.media_type().to_string(),
                size: l.size(),
            });
        }
        Ok(PulledImage {
            reference: r.key.clone(),
            manifest_digest: r.manifest_digest.clone(),
            index_digest: r.index_digest.clone(),
            config_digest,
            config,
            layers,
        })
    }

    fn all_refs(&self) -> Result<Vec<RefRecord>, ImageError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.refs).map_err(|e| ImageError::io("read dir", &self.refs, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| ImageError::io("read dir", &self.refs, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(".tmp-") || !name.ends_with(".json") {
                continue;
            }
            let p = ent.path();
            let f = open_nofollow(&p)?;
            match serde_json::from_reader::<_, RefRecord>(std::io::BufReader::new(f)) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(path = %p.display(), error = %e, "skipping a corrupt ref"),
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Every blob digest `r` needs (index, manifest, config, layers). A
    /// missing manifest yields what can be known.
    fn blobs_of(&self, r: &RefRecord) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        let size = |d: &str| {
            self.blob_path(d)
                .ok()
                .and_then(|p| fs::symlink_metadata(p).ok())
                .map_or(0, |m| m.len())
        };
        if let Some(i) = &r.index_digest {
            v.push((i.clone(), size(i)));
        }
        v.push((r.manifest_digest.clone(), size(&r.manifest_digest)));
        if let Ok(bytes) = self.read_blob(&r.manifest_digest) {
            if let Ok(Document::Image(m)) = manifest::parse_document("manifest", &bytes, None) {
                let c = m.config().digest().to_string();
                v.push((c.clone(), size(&c)));
                for l in m.layers() {
                    let d = l.digest().to_string();
                    v.push((d.clone(), size(&d)));
                }
            }
        }
        v
    }

    /// Every cached image, sorted by name, with its size on disk.
    pub fn list(&self) -> Result<Vec<ImageEntry>, ImageError> {
        Ok(self
            .all_refs()?
            .into_iter()
            .map(|r| {
                let mut seen = BTreeSet::new();
                let size = self
                    .blobs_of(&r)
                    .into_iter()
                    .filter(|(d, _)| seen.insert(d.clone()))
                    .map(|(_, s)| s)
                    .sum();
                ImageEntry {
                    reference: r.key,
                    manifest_digest: r.manifest_digest,
                    size,
                    created: r.created,
                }
            })
            .collect())
    }

    /// Forgets the image `name` (its ref); its blobs stay until
    /// [`ImageStore::prune`]. `NotCached` if there is no such image.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let key = normalize_name(name);
        let _store = self.lock_store_shared()?;
        let _ref = self.lock_ref(&key)?;
        if self.read_ref(&key)?.is_none() {
            return Err(ImageError::NotCached(key));
        }
        let p = self.ref_path(&key);
        fs::remove_file(&p).map_err(|e| ImageError::io("remove", &p, e))?;
        fsync_dir(&self.refs)
    }

    /// Deletes every blob no ref needs, waiting for running pulls to end
    /// (and holding new ones off) while it does.
    pub fn prune(&self) -> Result<PruneStats, ImageError> {
        let _store = Lock::take(&self.locks.join("store.lock"), true)?;
        let mut keep = BTreeSet::new();
        for r in self.all_refs()? {
            for (d, _) in self.blobs_of(&r) {
                keep.insert(d);
            }
        }
        let mut stats = PruneStats::default();
        let rd =
            fs::read_dir(&self.blobs).map_err(|e| ImageError::io("read dir", &self.blobs, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| ImageError::io("read dir", &self.blobs, e))?;
            let name = ent.file_name();
            let name = name.to_string_lossy();
            if keep.contains(&format!("sha256:{name}")) {
                continue;
            }
            let p = ent.path();
            let len = fs::symlink_metadata(&p).map_or(0, |m| m.len());
            fs::remove_file(&p).map_err(|e| ImageError::io("remove", &p, e))?;
            stats.blobs_removed += 1;
            stats.bytes_freed += len;
        }
        fsync_dir(&self.blobs)?;
        Ok(stats)
    }
}

/// A reference is looked up in its normalized form; anything that is not
/// a reference (a local source key) as given.
pub(crate) fn normalize_name(name: &str) -> String {
    match crate::reference::ImageReference::parse(name) {
        Ok(r) => r.to_string(),
        Err(_) => name.to_string(),
    }
}

/// One pull's staging directory. Blobs are verified here and moved into
/// the store only by [`Staging::commit`]; dropping it removes everything
/// it holds.
pub(crate) struct Staging<'a> {
    store: &'a ImageStore,
    dir: PathBuf,
    staged: Vec<String>,
}

impl Staging<'_> {
    /// A writer for blob `digest` of `size` bytes (`None`: unknown, for
    /// blobs whose digest is computed by us).
    pub fn writer(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter, ImageError> {
        let hex = digest_hex(digest)?;
        let path = self.dir.join(hex);
        let _ = fs::remove_file(&path);
        let file = create_file(&path, 0o644)?;
        Ok(BlobWriter {
            file,
            path,
            hasher: Sha256::new(),
            written: 0,
            digest: digest.to_string(),
            size,
            overrun: None,
        })
    }

    /// Records a verified blob (from [`BlobWriter::finish`]).
    pub fn add(&mut self, digest: String) {
        if !self.staged.contains(&digest) {
            self.staged.push(digest);
        }
    }

    /// Verifies and stages an in-memory blob.
    pub fn put_bytes(&mut self, digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
        let mut w = self.writer(digest, Some(bytes.len() as u64))?;
        w.write_all(bytes).map_err(|e| w.io_error(e))?;
        w.finish()?;
        self.add(digest.to_string());
        Ok(())
    }

    /// Reads a staged JSON blob (at most 8 MiB).
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.dir.join(digest_hex(digest)?);
        let mut v = Vec::new();
        open_nofollow(&p)?
            .take(manifest::MAX_JSON_BYTES + 1)
            .read_to_end(&mut v)
            .map_err(|e| ImageError::io("read", &p, e))?;
        if v.len() as u64 > manifest::MAX_JSON_BYTES {
            return Err(ImageError::invalid(digest, "JSON blob larger than 8 MiB"));
        }
        Ok(v)
    }

    /// Moves every staged blob into `blobs/sha256/` and fsyncs the
    /// directory. Call only when all of an image's blobs are staged.
    pub fn commit(self) -> Result<(), ImageError> {
        for d in &self.staged {
            let hex = digest_hex(d)?;
            let from = self.dir.join(hex);
            let to = self.store.blobs.join(hex);
            fs::rename(&from, &to).map_err(|e| ImageError::io("rename", &to, e))?;
        }
        fsync_dir(&self.store.blobs)
        // Drop removes the (now empty) staging directory.
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Writes one blob into a staging directory, hashing as it goes; refuses
/// to grow past the declared size. [`BlobWriter::finish`] checks size and
/// digest and fsyncs.
pub(crate) struct BlobWriter {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    written: u64,
    digest: String,
    size: Option<u64>,
    /// Set when a write went past the declared size: the size it reached.
    overrun: Option<u64>,
}

impl BlobWriter {
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The digest of what was written so far.
    pub fn current_digest(&self) -> String {
        format!("sha256:{}", hex(&self.hasher.clone().finalize()))
    }

    /// An I/O error of this writer: the size overrun our `write` reports
    /// becomes `SizeMismatch`.
    pub fn io_error(&self, e: std::io::Error) -> ImageError {
        match (self.overrun, self.size) {
            (Some(actual), Some(expected)) => ImageError::SizeMismatch {
                digest: self.digest.clone(),
                expected,
                actual,
            },
            _ => ImageError::io("write", &self.path, e),
        }
    }

    /// Checks size and digest, fsyncs. The blob stays in staging.
    pub fn finish(mut self) -> Result<(), ImageError> {
        self.file
            .flush()
            .map_err(|e| ImageError::io("write", &self.path, e))?;
        if let Some(s) = self.size {
            if self.written != s {
                return Err(ImageError::SizeMismatch {
                    digest: self.digest,
                    expected: s,
                    actual: self.written,
                });
            }
        }
        let actual = format!("sha256:{}", hex(&self.hasher.clone().finalize()));
        if actual != self.digest {
            return Err(ImageError::DigestMismatch {
                expected: self.digest,
                actual,
            });
        }
        self.file
            .sync_all()
            .map_err(|e| ImageError::io("fsync", &self.path, e))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(s) = self.size {
            if self.written + buf.len() as u64 > s {
                self.overrun = Some(self.written + buf.len() as u64);
                return Err(std::io::Error::other("blob longer than its declared size"));
            }
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// `size:mtime:inode` of a local input (for a directory, of its
/// `index.json`).
pub(crate) fn fingerprint(p: &Path) -> Option<String> {
    let md = fs::metadata(p).ok()?;
    Some(format!(
        "{}:{}.{}:{}:{}",
        md.len(),
        md.mtime(),
        md.mtime_nsec(),
        md.dev(),
        md.ino()
    ))
}

pub(crate) fn new_ref(
    key: &str,
    manifest_digest: &str,
    index_digest: Option<String>,
    fingerprint: Option<String>,
) -> RefRecord {
    RefRecord {
        key: key.to_string(),
        manifest_digest: manifest_digest.to_string(),
        index_digest,
        created: now(),
        fingerprint,
    }
}
