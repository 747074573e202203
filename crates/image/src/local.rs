//! Local inputs: OCI image layout directories, and tarballs — OCI
//! archives (a layout in a tar), `docker save` archives in the old layout
//! (`manifest.json`, `<id>/layer.tar`, `<hex>.json`) and in Docker 25+'s
//! (an OCI layout plus `manifest.json`).
//!
//! A tarball is never extracted: one pass over its headers records where
//! each regular file's data is (and symlinks, which old `docker save`
//! uses for repeated layers); files are then read by exact name from that
//! table, so hostile names (`../x`, `/etc/passwd`) are only names that
//! nothing looks up. Everything read is verified like a registry blob.
//! Blocking, on the caller's thread.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex};
use serde::Deserialize;

use crate::cache::{digest_hex, sha256_digest, BlobWriter};
use crate::error::ImageError;
use crate::manifest::{self, Arch, Document};
use crate::pull::{copy_reader, Fetch, Resolved};
use crate::unpack::Compression;

/// The annotation naming a manifest in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Most entries we index in a tarball.
const MAX_TAR_ENTRIES: usize = 1_000_000;

/// Read access to an OCI layout's files, by name.
pub(crate) trait LayoutFiles {
    /// What the errors call it.
    fn describe(&self) -> String;
    /// A file of at most 8 MiB, or `None` if absent.
    fn read_small(&mut self, name: &str) -> Result<Option<Vec<u8>>, ImageError>;
    /// The reader of file `name`.
    fn open(&mut self, name: &str) -> Result<Box<dyn Read + '_>, ImageError>;
}

fn blob_name(digest: &str) -> Result<String, ImageError> {
    Ok(format!("blobs/sha256/{}", digest_hex(digest)?))
}

fn read_limited(what: &str, r: impl Read) -> Result<Vec<u8>, ImageError> {
    let mut v = Vec::new();
    r.take(manifest::MAX_JSON_BYTES + 1)
        .read_to_end(&mut v)
        .map_err(|e| ImageError::invalid(what, format!("read: {e}")))?;
    if v.len() as u64 > manifest::MAX_JSON_BYTES {
        return Err(ImageError::invalid(what, "larger than 8 MiB"));
    }
    Ok(v)
}

/// An OCI image layout directory.
pub(crate) struct LayoutDir {
    dir: PathBuf,
}

impl LayoutDir {
    pub fn open(dir: &Path) -> Result<LayoutDir, ImageError> {
        let md = std::fs::metadata(dir).map_err(|e| ImageError::io("stat", dir, e))?;
        if !md.is_dir() {
            return Err(ImageError::invalid(
                dir.display().to_string(),
                "not a directory",
            ));
        }
        Ok(LayoutDir {
            dir: dir.to_path_buf(),
        })
    }
}

impl LayoutFiles for LayoutDir {
    fn describe(&self) -> String {
        format!("OCI layout {}", self.dir.display())
    }

    fn read_small(&mut self, name: &str) -> Result<Option<Vec<u8>>, ImageError> {
        let p = self.dir.join(name);
        match File::open(&p) {
            Ok(f) => read_limited(&p.display().to_string(), f).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io("open", p, e)),
        }
    }

    fn open(&mut self, name: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        let p = self.dir.join(name);
        let f = File::open(&p).map_err(|e| ImageError::io("open", &p, e))?;
        Ok(Box::new(f))
    }
}

impl Fetch for LayoutDir {
    fn fetch(
        &mut self,
        desc: &Descriptor,
        w: &mut BlobWriter,
        done: &mut dyn FnMut(u64),
    ) -> Result<(), ImageError> {
        let name = blob_name(desc.digest().as_ref())?;
        let r = LayoutFiles::open(self, &name)?;
        copy_reader(r, w, done)
    }
}

#[derive(Deserialize)]
struct OciLayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

fn names_of(idx: &ImageIndex) -> Vec<String> {
    idx.manifests()
        .iter()
        .filter_map(|d| {
            let a = d.annotations().as_ref()?;
            a.get(REF_NAME).or_else(|| a.get(CONTAINERD_NAME)).cloned()
        })
        .collect()
}

fn name_matches(d: &Descriptor, tag: &str) -> bool {
    let Some(a) = d.annotations() else {
        return false;
    };
    let suffix = format!(":{tag}");
    [REF_NAME, CONTAINERD_NAME].iter().any(|k| {
        a.get(*k).is_some_and(|n| {
            n == tag
                || n.ends_with(&suffix)
                || crate::cache::normalize_name(n) == crate::cache::normalize_name(tag)
        })
    })
}

/// Picks the image manifest of a layout: by `tag` (the ref-name
/// annotation), else the only entry, else the `linux/<arch>` one; nested
/// indexes are resolved by platform.
pub(crate) fn resolve_layout(
    files: &mut dyn LayoutFiles,
    tag: Option<&str>,
    arch: Arch,
) -> Result<Resolved, ImageError> {
    let what = files.describe();
    let layout = files
        .read_small("oci-layout")?
        .ok_or_else(|| ImageError::invalid(&what, "no oci-layout file"))?;
    let layout: OciLayoutFile = serde_json::from_slice(&layout)
        .map_err(|e| ImageError::invalid(&what, format!("oci-layout: {e}")))?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(ImageError::invalid(
            &what,
            format!(
                "imageLayoutVersion {} (only 1.x is supported)",
                layout.image_layout_version
            ),
        ));
    }
    let index = files
        .read_small("index.json")?
        .ok_or_else(|| ImageError::invalid(&what, "no index.json"))?;
    let Document::Index(idx) =
        manifest::parse_document("index.json", &index, Some(manifest::OCI_INDEX))?
    else {
        return Err(ImageError::invalid(&what, "index.json is not an index"));
    };
    let mut desc = if let Some(tag) = tag {
        idx.manifests()
            .iter()
            .find(|d| name_matches(d, tag))
            .cloned()
            .ok_or_else(|| {
                ImageError::invalid(
                    &what,
                    format!(
                        "no image named {tag:?}; it has: {}",
                        names_of(&idx).join(", ")
                    ),
                )
            })?
    } else if idx.manifests().len() == 1 {
        idx.manifests()[0].clone()
    } else if idx.manifests().is_empty() {
        return Err(ImageError::invalid(&what, "index.json lists no image"));
    } else {
        manifest::select_platform(&idx, arch).map_err(|e| {
            ImageError::invalid(
                &what,
                format!(
                    "{} images and no platform match ({e}); name one with :TAG ({})",
                    idx.manifests().len(),
                    names_of(&idx).join(", ")
                ),
            )
        })?
    };
    let mut parent: Option<(String, Vec<u8>)> = None;
    for _ in 0..4 {
        let digest = manifest::check_digest(&desc)?;
        let bytes = files
            .read_small(&blob_name(&digest)?)?
            .ok_or_else(|| ImageError::invalid(&what, format!("blob {digest} is missing")))?;
        let actual = sha256_digest(&bytes);
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                expected: digest,
                actual,
            });
        }
        let mt = desc.media_type().to_string();
        match manifest::parse_document(&format!("manifest {digest}"), &bytes, Some(&mt))? {
            Document::Image(_) => {
                return Ok(Resolved {
                    manifest_digest: digest,
                    manifest: bytes,
                    manifest_media_type: Some(mt),
                    index: parent,
                    fingerprint: None,
                })
            }
            Document::Index(inner) => {
                desc = manifest::select_platform(&inner, arch)?;
                parent = Some((digest, bytes));
            }
        }
    }
    Err(ImageError::invalid(
        &what,
        "indexes nested more than 4 deep",
    ))
}

/// Where a file's data is in a tarball.
#[derive(Clone, Debug)]
enum TarEntry {
    File {
        offset: u64,
        size: u64,
    },
    Symlink(String),
    /// The name occurs more than once: ambiguous, refused when looked up.
    Duplicate,
}

/// A tarball (OCI archive or `docker save`), indexed by name.
pub(crate) struct TarArchive {
    path: PathBuf,
    file: File,
    entries: HashMap<String, TarEntry>,
    /// For synthesized manifests (old `docker save`): digest → file name.
    blob_names: HashMap<String, String>,
}

/// `./a//b/` → `a/b`; `None` for absolute names or names with `..`.
fn clean_name(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    if s.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

impl TarArchive {
    pub fn open(path: &Path) -> Result<TarArchive, ImageError> {
        let what = || path.display().to_string();
        let mut file = File::open(path).map_err(|e| ImageError::io("open", path, e))?;
        let md = file
            .metadata()
            .map_err(|e| ImageError::io("stat", path, e))?;
        if !md.is_file() {
            return Err(ImageError::invalid(what(), "not a regular file"));
        }
        let mut head = [0u8; 4];
        let n = file
            .read(&mut head)
            .map_err(|e| ImageError::io("read", path, e))?;
        if Compression::sniff(&head[..n]) != Compression::None {
            return Err(ImageError::invalid(
                what(),
                "compressed archive; decompress it first (docker save and OCI archives are plain tar)",
            ));
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|e| ImageError::io("seek", path, e))?;
        let mut entries = HashMap::new();
        {
            let mut ar = tar::Archive::new(&file);
            let iter = ar
                .entries()
                .map_err(|e| ImageError::invalid(what(), format!("not a tar archive: {e}")))?;
            for (i, ent) in iter.enumerate() {
                if i >= MAX_TAR_ENTRIES {
                    return Err(ImageError::invalid(what(), "more than 1,000,000 entries"));
                }
                let ent =
                    ent.map_err(|e| ImageError::invalid(what(), format!("bad tar entry: {e}")))?;
                let Some(name) = clean_name(&ent.path_bytes()) else {
                    continue;
                };
                let t = ent.header().entry_type();
                let e = if t.is_file() {
                    TarEntry::File {
                        offset: ent.raw_file_position(),
                        size: ent.size(),
                    }
                } else if t.is_symlink() {
                    match ent.link_name_bytes() {
                        Some(l) => TarEntry::Symlink(String::from_utf8_lossy(&l).into_owned()),
                        None => continue,
                    }
                } else {
                    continue;
                };
                if entries.insert(name.clone(), e).is_some() {
                    entries.insert(name, TarEntry::Duplicate);
                }
            }
        }
        Ok(TarArchive {
            path: path.to_path_buf(),
            file,
            entries,
            blob_names: HashMap::new(),
        })
    }

    /// The data of `name`, following symlinks inside the archive (at most
    /// 8 hops; a target outside the archive is "missing").
    fn locate(&self, name: &str) -> Result<Option<(u64, u64)>, ImageError> {
        let mut name = name.to_string();
        for _ in 0..8 {
            match self.entries.get(&name) {
                None => return Ok(None),
                Some(TarEntry::File { offset, size }) => return Ok(Some((*offset, *size))),
                Some(TarEntry::Duplicate) => {
                    return Err(ImageError::invalid(
                        self.describe(),
                        format!("{name} occurs more than once"),
                    ))
                }
                Some(TarEntry::Symlink(target)) => {
                    let joined = if target.starts_with('/') {
                        return Ok(None);
                    } else {
                        match name.rsplit_once('/') {
                            Some((dir, _)) => format!("{dir}/{target}"),
                            None => target.clone(),
                        }
                    };
                    // Lexical `..` handling that never climbs above the top.
                    let mut parts: Vec<&str> = Vec::new();
                    for c in joined.split('/') {
                        match c {
                            "" | "." => {}
                            ".." => {
                                if parts.pop().is_none() {
                                    return Ok(None);
                                }
                            }
                            c => parts.push(c),
                        }
                    }
                    name = parts.join("/");
                }
            }
        }
        Err(ImageError::invalid(
            self.describe(),
            format!("{name}: too many symlinks"),
        ))
    }

    /// Which kind of archive this is, and its manifest.
    pub fn resolve(&mut self, tag: Option<&str>, arch: Arch) -> Result<Resolved, ImageError> {
        if self.entries.contains_key("oci-layout") && self.entries.contains_key("index.json") {
            resolve_layout(self, tag, arch)
        } else if self.entries.contains_key("manifest.json") {
            self.resolve_docker(tag)
        } else {
            Err(ImageError::invalid(
                self.describe(),
                "neither an OCI archive (oci-layout, index.json) nor a docker save archive (manifest.json)",
            ))
        }
    }

    /// Old `docker save`: builds an OCI manifest from `manifest.json`,
    /// hashing each layer file (plain layers are checked against the
    /// config's `diff_ids`).
    fn resolve_docker(&mut self, tag: Option<&str>) -> Result<Resolved, ImageError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let what = self.describe();
        let bytes = self
            .read_small("manifest.json")?
            .ok_or_else(|| ImageError::invalid(&what, "no manifest.json"))?;
        let list: Vec<Entry> = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::invalid(&what, format!("manifest.json: {e}")))?;
        let all_tags = || {
            list.iter()
                .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let entry = match tag {
            Some(tag) => list
                .iter()
                .find(|e| {
                    e.repo_tags.iter().flatten().any(|t| {
                        t == tag
                            || t.ends_with(&format!(":{tag}"))
                            || crate::cache::normalize_name(t) == crate::cache::normalize_name(tag)
                    })
                })
                .ok_or_else(|| {
                    ImageError::invalid(
                        &what,
                        format!("no image tagged {tag:?}; it has: {}", all_tags()),
                    )
                })?,
            None if list.len() == 1 => &list[0],
            None if list.is_empty() => {
                return Err(ImageError::invalid(&what, "manifest.json lists no image"))
            }
            None => {
                return Err(ImageError::invalid(
                    &what,
                    format!("{} images; name one with :TAG ({})", list.len(), all_tags()),
                ))
            }
        };
        let cfg_name = clean_name(entry.config.as_bytes()).ok_or_else(|| {
            ImageError::invalid(&what, format!("bad config name {:?}", entry.config))
        })?;
        let cfg = self
            .read_small(&cfg_name)?
            .ok_or_else(|| ImageError::invalid(&what, format!("{cfg_name} is missing")))?;
        let cfg_digest = sha256_digest(&cfg);
        // `<hex>.json` or `blobs/sha256/<hex>` names its digest.
        let base = cfg_name.rsplit('/').next().unwrap_or(&cfg_name);
        let named = base.strip_suffix(".json").unwrap_or(base);
        if crate::reference::is_sha256_hex(named) && cfg_digest != format!("sha256:{named}") {
            return Err(ImageError::DigestMismatch {
                expected: format!("sha256:{named}"),
                actual: cfg_digest,
            });
        }
        let config = manifest::parse_config(&cfg)?;
        if config.diff_ids.len() != entry.layers.len() {
            return Err(ImageError::invalid(
                &what,
                format!(
                    "{} layers but the config has {} diff_ids",
                    entry.layers.len(),
                    config.diff_ids.len()
                ),
            ));
        }
        self.blob_names.insert(cfg_digest.clone(), cfg_name);
        let mut layers = Vec::new();
        for (i, l) in entry.layers.iter().enumerate() {
            let name = clean_name(l.as_bytes())
                .ok_or_else(|| ImageError::invalid(&what, format!("bad layer name {l:?}")))?;
            let (digest, size, comp) = self.hash_file(&name)?;
            let media_type = match comp {
                Compression::None => {
                    if digest != config.diff_ids[i] {
                        return Err(ImageError::DigestMismatch {
                            expected: config.diff_ids[i].clone(),
                            actual: digest,
                        });
                    }
                    manifest::OCI_LAYER_TAR
                }
                Compression::Gzip => manifest::OCI_LAYER_GZIP,
                Compression::Zstd => manifest::OCI_LAYER_ZSTD,
            };
            self.blob_names.insert(digest.clone(), name);
            layers.push(serde_json::json!({
                "mediaType": media_type, "digest": digest, "size": size
            }));
        }
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_MANIFEST,
            "config": {
                "mediaType": manifest::OCI_CONFIG,
                "digest": cfg_digest,
                "size": cfg.len(),
            },
            "layers": layers,
        });
        let bytes =
            serde_json::to_vec(&m).map_err(|e| ImageError::invalid(&what, e.to_string()))?;
        Ok(Resolved {
            manifest_digest: sha256_digest(&bytes),
            manifest: bytes,
            manifest_media_type: Some(manifest::OCI_MANIFEST.to_string()),
            index: None,
            fingerprint: None,
        })
    }

    /// sha256, size and compression of file `name`.
    fn hash_file(&mut self, name: &str) -> Result<(String, u64, Compression), ImageError> {
        use sha2::Digest as _;
        let mut r = LayoutFiles::open(self, name)?;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut size = 0u64;
        let mut head = Vec::new();
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| ImageError::invalid(name, format!("read: {e}")))?;
            if n == 0 {
                break;
            }
            if head.len() < 4 {
                head.extend_from_slice(&buf[..n.min(4)]);
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok((format!("sha256:{hex}"), size, Compression::sniff(&head)))
    }
}

impl LayoutFiles for TarArchive {
    fn describe(&self) -> String {
        format!("archive {}", self.path.display())
    }

    fn read_small(&mut self, name: &str) -> Result<Option<Vec<u8>>, ImageError> {
        if self.locate(name)?.is_none() {
            return Ok(None);
        }
        let what = format!("{}: {name}", self.describe());
        let r = LayoutFiles::open(self, name)?;
        read_limited(&what, r).map(Some)
    }

    fn open(&mut self, name: &str) -> Result<Box<dyn Read + '_>, ImageError> {
        let (offset, size) = self
            .locate(name)?
            .ok_or_else(|| ImageError::invalid(self.describe(), format!("{name} is missing")))?;
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| ImageError::io("seek", &self.path, e))?;
        Ok(Box::new((&self.file).take(size)))
    }
}

impl Fetch for TarArchive {
    fn fetch(
        &mut self,
        desc: &Descriptor,
        w: &mut BlobWriter,
        done: &mut dyn FnMut(u64),
    ) -> Result<(), ImageError> {
        let digest = desc.digest().to_string();
        let name = match self.blob_names.get(&digest) {
            Some(n) => n.clone(),
            None => blob_name(&digest)?,
        };
        let r = LayoutFiles::open(self, &name)?;
        copy_reader(r, w, done)
    }
}

#[cfg(test)]
mod tests {
    use super::clean_name;

    #[test]
    fn tar_names() {
        assert_eq!(clean_name(b"./a//b/").as_deref(), Some("a/b"));
        assert_eq!(
            clean_name(b"manifest.json").as_deref(),
            Some("manifest.json")
        );
        assert_eq!(clean_name(b"/etc/passwd"), None);
        assert_eq!(clean_name(b"../x"), None);
        assert_eq!(clean_name(b"a/../../x"), None);
        assert_eq!(clean_name(b"./"), None);
    }
}
