//! Helpers for the unpacker tests: a scratch directory with the staging
//! root and a canary next to it, and a tar layer writer that crafts raw
//! headers (the `tar` crate's Builder refuses hostile names).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use locald_image::unpack::{Limits, MetadataTable, UnpackError, UnpackStats, Unpacker};

pub const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const TZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// `<tmp>/locald-image-test-PID-N/{root,canary/secret,canary/sub/deep}`;
/// removed on drop.
pub struct Scratch {
    pub base: PathBuf,
    pub root: PathBuf,
    pub canary: PathBuf,
    before: BTreeMap<PathBuf, String>,
}

static N: AtomicU32 = AtomicU32::new(0);

impl Scratch {
    pub fn new() -> Scratch {
        let base = std::env::temp_dir().join(format!(
            "locald-image-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&base);
        let root = base.join("root");
        let canary = base.join("canary");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(canary.join("sub")).unwrap();
        fs::write(canary.join("secret"), b"secret").unwrap();
        fs::write(canary.join("sub/deep"), b"deep").unwrap();
        fs::set_permissions(canary.join("secret"), fs::Permissions::from_mode(0o640)).unwrap();
        let mut s = Scratch {
            base,
            root,
            canary,
            before: BTreeMap::new(),
        };
        s.before = s.outside();
        s
    }

    /// Everything under `base` except `root/`: names, types, modes, link
    /// counts, sizes, mtimes and contents.
    fn outside(&self) -> BTreeMap<PathBuf, String> {
        let mut m = BTreeMap::new();
        snapshot(&self.base, &self.base, &self.root, &mut m);
        // The base itself (a new entry next to root would change it too).
        let md = fs::symlink_metadata(&self.base).unwrap();
        m.insert(
            PathBuf::from("."),
            format!("{:o} {}", md.mode(), md.nlink()),
        );
        m
    }

    /// Asserts nothing outside the staging root changed.
    pub fn assert_outside_untouched(&self) {
        let now = self.outside();
        assert_eq!(now, self.before, "something outside the root changed");
    }

    pub fn unpack(
        &self,
        layers: &[(&[u8], &str)],
    ) -> Result<(MetadataTable, UnpackStats), UnpackError> {
        self.unpack_with(layers, Limits::default())
    }

    pub fn unpack_with(
        &self,
        layers: &[(&[u8], &str)],
        limits: Limits,
    ) -> Result<(MetadataTable, UnpackStats), UnpackError> {
        let mut u = Unpacker::new(&self.root, limits)?;
        for (data, mt) in layers {
            u.apply_layer(*data, mt)?;
        }
        u.finish()
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
    }
}

fn snapshot(dir: &Path, base: &Path, skip: &Path, m: &mut BTreeMap<PathBuf, String>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        if p == skip {
            continue;
        }
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(base).unwrap().to_path_buf();
        let mut desc = format!(
            "{:o} nlink={} size={} mtime={}",
            md.mode(),
            md.nlink(),
            md.size(),
            md.mtime()
        );
        if md.file_type().is_file() {
            desc.push_str(&format!(" data={:?}", fs::read(&p).unwrap()));
        } else if md.file_type().is_symlink() {
            desc.push_str(&format!(" -> {:?}", fs::read_link(&p).unwrap()));
        }
        m.insert(rel, desc);
        if md.file_type().is_dir() {
            snapshot(&p, base, skip, m);
        }
    }
}

/// A tar stream built entry by entry from raw headers.
pub struct Layer {
    out: Vec<u8>,
    mtime: u64,
}

pub struct E<'a> {
    pub name: &'a [u8],
    pub kind: u8,
    pub data: &'a [u8],
    pub link: &'a [u8],
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub dev: (u32, u32),
    /// Declared size (None: data.len()).
    pub size: Option<u64>,
    pub pax: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> E<'a> {
    pub fn new(name: &'a [u8], kind: u8) -> E<'a> {
        E {
            name,
            kind,
            data: b"",
            link: b"",
            mode: if kind == b'5' { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            dev: (0, 0),
            size: None,
            pax: Vec::new(),
        }
    }
}

fn pax_records(recs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in recs {
        // "LEN key=value\n" where LEN counts itself.
        let body = k.len() + v.len() + 3;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

impl Layer {
    pub fn new() -> Layer {
        Layer {
            out: Vec::new(),
            mtime: 1_600_000_000,
        }
    }

    fn header(&mut self, name: &[u8], kind: u8, size: u64, e: &E) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let old = h.as_old_mut();
        let n = name.len().min(100);
        old.name[..n].copy_from_slice(&name[..n]);
        let l = e.link.len().min(100);
        old.linkname[..l].copy_from_slice(&e.link[..l]);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(self.mtime);
        if kind == b'3' || kind == b'4' {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_cksum();
        h
    }

    fn raw(&mut self, h: &tar::Header, data: &[u8]) {
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    /// Appends a PAX `x` header with raw records (declared size optional).
    pub fn pax(&mut self, recs: &[(&[u8], &[u8])], size: Option<u64>) {
        let data = pax_records(recs);
        let e = E::new(b"././@PaxHeader", b'x');
        let h = self.header(
            b"././@PaxHeader",
            b'x',
            size.unwrap_or(data.len() as u64),
            &e,
        );
        self.raw(&h, &data);
    }

    pub fn entry(&mut self, e: E) -> &mut Self {
        let mut pax = e.pax.clone();
        if e.name.len() > 100 {
            pax.push((b"path", e.name));
        }
        if e.link.len() > 100 {
            pax.push((b"linkpath", e.link));
        }
        if !pax.is_empty() {
            self.pax(&pax, None);
        }
        let size = e.size.unwrap_or(e.data.len() as u64);
        let h = self.header(e.name, e.kind, size, &e);
        self.raw(&h, e.data);
        self
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        let mut e = E::new(name.as_bytes(), b'5');
        e.mode = mode;
        self.entry(e)
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        let mut e = E::new(name.as_bytes(), b'0');
        e.data = data;
        self.entry(e)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut e = E::new(name.as_bytes(), b'2');
        e.link = target.as_bytes();
        e.mode = 0o777;
        self.entry(e)
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut e = E::new(name.as_bytes(), b'1');
        e.link = target.as_bytes();
        self.entry(e)
    }

    pub fn mtime(&mut self, t: u64) -> &mut Self {
        self.mtime = t;
        self
    }

    /// Raw bytes appended as they are.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.out.extend_from_slice(b);
        self
    }

    /// The tar stream with its two zero end blocks.
    pub fn finish(&self) -> Vec<u8> {
        let mut o = self.out.clone();
        o.extend(std::iter::repeat_n(0u8, 1024));
        o
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

pub fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

pub fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

pub fn bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}
