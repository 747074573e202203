//! Test images built in Rust, for this crate's tests and other crates'
//! (enable the `testing` feature: `locald-image = { path = …, features =
//! ["testing"] }` under `[dev-dependencies]`). Layers from entry lists
//! (files, dirs, symlinks, hard links, whiteouts, opaque dirs), plain,
//! gzip or zstd; images with a config (Entrypoint, Cmd, Env, WorkingDir,
//! User, ExposedPorts, Labels); multi-platform indexes; OCI layout
//! directories, OCI archives and `docker save` tarballs (old layout).
//! Output is deterministic (fixed mtimes, owners), so the same spec gives
//! the same digests. Panics on I/O errors: test code. Any thread.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::cache::sha256_digest;
use crate::manifest::{self, Arch};

/// One tar entry of a test layer.
#[derive(Clone, Debug)]
pub enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
    HardLink {
        path: String,
        target: String,
    },
    /// Deletes `path` of lower layers (writes `dir/.wh.name`).
    Whiteout(String),
    /// Hides everything lower layers have in directory `path` (writes
    /// `path/.wh..wh..opq`).
    Opaque(String),
}

impl Entry {
    /// A 0644 file.
    pub fn file(path: &str, data: impl AsRef<[u8]>) -> Entry {
        Entry::File {
            path: path.to_string(),
            data: data.as_ref().to_vec(),
            mode: 0o644,
        }
    }
    /// A 0755 file.
    pub fn exe(path: &str, data: impl AsRef<[u8]>) -> Entry {
        Entry::File {
            path: path.to_string(),
            data: data.as_ref().to_vec(),
            mode: 0o755,
        }
    }
    /// A 0755 directory.
    pub fn dir(path: &str) -> Entry {
        Entry::Dir {
            path: path.to_string(),
            mode: 0o755,
        }
    }
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }
    pub fn hardlink(path: &str, target: &str) -> Entry {
        Entry::HardLink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }
    pub fn whiteout(path: &str) -> Entry {
        Entry::Whiteout(path.to_string())
    }
    pub fn opaque(dir: &str) -> Entry {
        Entry::Opaque(dir.to_string())
    }
}

/// How a test layer is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

impl Comp {
    pub fn media_type(self) -> &'static str {
        match self {
            Comp::None => manifest::OCI_LAYER_TAR,
            Comp::Gzip => manifest::OCI_LAYER_GZIP,
            Comp::Zstd => manifest::OCI_LAYER_ZSTD,
        }
    }
}

/// A blob and its descriptor fields.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, data: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&data),
            data,
        }
    }

    pub fn hex(&self) -> &str {
        &self.digest["sha256:".len()..]
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

/// `dir/name` → `dir/<prefix>name`.
fn prefixed(path: &str, prefix: &str) -> String {
    match path.rsplit_once('/') {
        Some((d, n)) => format!("{d}/{prefix}{n}"),
        None => format!("{prefix}{path}"),
    }
}

/// An uncompressed tar of `entries`, in order.
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::File { path, data, mode } => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, path, &data[..]).unwrap();
            }
            Entry::Dir { path, mode } => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, path, target).unwrap();
            }
            Entry::HardLink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, path, target).unwrap();
            }
            Entry::Whiteout(path) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, prefixed(path, ".wh."), std::io::empty())
                    .unwrap();
            }
            Entry::Opaque(dir) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(
                    &mut h,
                    format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
                    std::io::empty(),
                )
                .unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// `tar` compressed as `c`.
pub fn compress(tar: &[u8], c: Comp) -> Vec<u8> {
    match c {
        Comp::None => tar.to_vec(),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Comp::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

/// An image config.
#[derive(Clone, Debug, Default)]
pub struct ConfigSpec {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// What to build.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub arch: Arch,
    pub config: ConfigSpec,
    pub layers: Vec<(Vec<Entry>, Comp)>,
}

/// A built image: manifest, config and layer blobs.
#[derive(Clone, Debug)]
pub struct BuiltImage {
    pub arch: Arch,
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// The uncompressed layer tars (for `docker save` archives).
    pub layer_tars: Vec<Vec<u8>>,
}

impl BuiltImage {
    /// Every blob: config, layers, manifest.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut v = vec![&self.config];
        v.extend(self.layers.iter());
        v.push(&self.manifest);
        v
    }
}

fn strs(v: &[String]) -> serde_json::Value {
    json!(v)
}

/// The config JSON of `spec`.
pub fn config_json(spec: &ConfigSpec, arch: Arch, diff_ids: &[String]) -> Vec<u8> {
    let mut c = serde_json::Map::new();
    if let Some(e) = &spec.entrypoint {
        c.insert("Entrypoint".into(), strs(e));
    }
    if let Some(e) = &spec.cmd {
        c.insert("Cmd".into(), strs(e));
    }
    if !spec.env.is_empty() {
        c.insert("Env".into(), strs(&spec.env));
    }
    if let Some(w) = &spec.working_dir {
        c.insert("WorkingDir".into(), json!(w));
    }
    if let Some(u) = &spec.user {
        c.insert("User".into(), json!(u));
    }
    if !spec.exposed_ports.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = spec
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect();
        c.insert("ExposedPorts".into(), serde_json::Value::Object(m));
    }
    if !spec.labels.is_empty() {
        c.insert("Labels".into(), json!(spec.labels));
    }
    serde_json::to_vec(&json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch.as_str(),
        "os": "linux",
        "config": c,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [],
    }))
    .unwrap()
}

/// Builds the blobs of `spec`.
pub fn build_image(spec: &ImageSpec) -> BuiltImage {
    let mut layers = Vec::new();
    let mut tars = Vec::new();
    let mut diff_ids = Vec::new();
    for (entries, c) in &spec.layers {
        let t = layer_tar(entries);
        diff_ids.push(sha256_digest(&t));
        layers.push(Blob::new(c.media_type(), compress(&t, *c)));
        tars.push(t);
    }
    let config = Blob::new(
        manifest::OCI_CONFIG,
        config_json(&spec.config, spec.arch, &diff_ids),
    );
    let m = json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    BuiltImage {
        arch: spec.arch,
        manifest: Blob::new(manifest::OCI_MANIFEST, serde_json::to_vec(&m).unwrap()),
        config,
        layers,
        layer_tars: tars,
    }
}

/// An index of `images`, each with its linux/arch platform.
pub fn build_index(images: &[&BuiltImage]) -> Blob {
    let m: Vec<_> = images
        .iter()
        .map(|i| {
            let mut d = i.manifest.descriptor();
            d["platform"] = json!({"architecture": i.arch.as_str(), "os": "linux"});
            d
        })
        .collect();
    let idx = json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": m});
    Blob::new(manifest::OCI_INDEX, serde_json::to_vec(&idx).unwrap())
}

/// A scratch image holding one file, `/app` (0755), taken from `binary`,
/// with `Entrypoint ["/app"]`.
pub fn scratch_image(binary: &Path, arch: Arch) -> ImageSpec {
    let data = fs::read(binary).unwrap_or_else(|e| panic!("read {}: {e}", binary.display()));
    ImageSpec {
        arch,
        config: ConfigSpec {
            entrypoint: Some(vec!["/app".to_string()]),
            ..ConfigSpec::default()
        },
        layers: vec![(vec![Entry::exe("app", data)], Comp::Gzip)],
    }
}

/// A three-layer image exercising the unpacker: a gzip base (dirs, files,
/// a symlink, a hard link), a zstd layer with a whiteout and an opaque
/// directory, and a plain layer; a config with every field set.
pub fn sample_image(arch: Arch) -> ImageSpec {
    let mut labels = BTreeMap::new();
    labels.insert("org.example.test".to_string(), "yes".to_string());
    ImageSpec {
        arch,
        config: ConfigSpec {
            entrypoint: Some(vec!["/bin/app".into(), "--serve".into()]),
            cmd: Some(vec!["--port".into(), "8080".into()]),
            env: vec!["PATH=/usr/bin:/bin".into(), "MODE=test".into()],
            working_dir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            exposed_ports: vec!["8080/tcp".into(), "53/udp".into()],
            labels,
        },
        layers: vec![
            (
                vec![
                    Entry::dir("bin"),
                    Entry::exe("bin/app", format!("app for {arch}\n")),
                    Entry::dir("etc"),
                    Entry::file("etc/motd", "hello\n"),
                    Entry::file("etc/gone", "removed by layer 2\n"),
                    Entry::dir("srv"),
                    Entry::file("srv/old", "hidden by the opaque dir\n"),
                    Entry::symlink("usr-bin", "bin"),
                    Entry::hardlink("bin/app-link", "bin/app"),
                ],
                Comp::Gzip,
            ),
            (
                vec![
                    Entry::whiteout("etc/gone"),
                    Entry::opaque("srv"),
                    Entry::file("srv/new", "layer 2\n"),
                ],
                Comp::Zstd,
            ),
            (vec![Entry::file("etc/layer3", "plain\n")], Comp::None),
        ],
    }
}

/// An OCI image layout directory being written.
pub struct OciLayout {
    pub dir: PathBuf,
    manifests: Vec<serde_json::Value>,
}

impl OciLayout {
    /// Creates `dir` (and parents) with `oci-layout` and an empty index.
    pub fn create(dir: &Path) -> OciLayout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let l = OciLayout {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        };
        l.write_index();
        l
    }

    fn write_index(&self) {
        let idx = json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": self.manifests});
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&idx).unwrap(),
        )
        .unwrap();
    }

    /// Writes one blob.
    pub fn write_blob(&self, b: &Blob) -> PathBuf {
        let p = self.dir.join("blobs/sha256").join(b.hex());
        fs::write(&p, &b.data).unwrap();
        p
    }

    fn add(&mut self, desc: serde_json::Value, name: Option<&str>) {
        let mut d = desc;
        if let Some(n) = name {
            d["annotations"] = json!({ crate::local::REF_NAME: n });
        }
        self.manifests.push(d);
        self.write_index();
    }

    /// Adds an image (its blobs and an index.json entry, named `name`).
    pub fn add_image(&mut self, img: &BuiltImage, name: Option<&str>) {
        for b in img.blobs() {
            self.write_blob(b);
        }
        let mut d = img.manifest.descriptor();
        d["platform"] = json!({"architecture": img.arch.as_str(), "os": "linux"});
        self.add(d, name);
    }

    /// Adds a multi-platform index of `images`, named `name`; returns it.
    pub fn add_index(&mut self, images: &[&BuiltImage], name: Option<&str>) -> Blob {
        for i in images {
            for b in i.blobs() {
                self.write_blob(b);
            }
        }
        let idx = build_index(images);
        self.write_blob(&idx);
        self.add(idx.descriptor(), name);
        idx
    }
}

fn tar_file(b: &mut tar::Builder<fs::File>, name: &str, data: &[u8]) {
    let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
    b.append_data(&mut h, name, data).unwrap();
}

/// Tars the layout directory `layout` into `out` (an OCI archive, as
/// `skopeo copy … oci-archive:` writes).
pub fn oci_archive(layout: &Path, out: &Path) {
    let f = fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(f);
    b.mode(tar::HeaderMode::Deterministic);
    b.append_dir_all(".", layout).unwrap();
    b.into_inner().unwrap().sync_all().unwrap();
}

/// Writes `img` as an old-layout `docker save` archive tagged `repo_tag`:
/// `manifest.json`, `repositories`, `<config hex>.json` and
/// `<diff id hex>/layer.tar` (uncompressed, as docker writes them).
pub fn docker_archive(img: &BuiltImage, repo_tag: &str, out: &Path) {
    let f = fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(f);
    let mut layer_names = Vec::new();
    for t in &img.layer_tars {
        let hex = &sha256_digest(t)["sha256:".len()..];
        let name = format!("{hex}/layer.tar");
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        b.append_data(&mut h, format!("{hex}/"), std::io::empty())
            .unwrap();
        tar_file(&mut b, &name, t);
        tar_file(&mut b, &format!("{hex}/VERSION"), b"1.0");
        layer_names.push(name);
    }
    let cfg_name = format!("{}.json", img.config.hex());
    tar_file(&mut b, &cfg_name, &img.config.data);
    let m = json!([{"Config": cfg_name, "RepoTags": [repo_tag], "Layers": layer_names}]);
    tar_file(&mut b, "manifest.json", &serde_json::to_vec(&m).unwrap());
    let (repo, tag) = repo_tag.rsplit_once(':').unwrap_or((repo_tag, "latest"));
    let top = &sha256_digest(img.layer_tars.last().map_or(&[][..], |v| v))["sha256:".len()..];
    let r = json!({ repo: { tag: top } });
    tar_file(&mut b, "repositories", &serde_json::to_vec(&r).unwrap());
    b.into_inner().unwrap().sync_all().unwrap();
}

/// A unique scratch directory under the temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "locald-image-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
