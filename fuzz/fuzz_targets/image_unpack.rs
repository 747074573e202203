//! Fuzzes the OCI layer unpacker (`locald_image::unpack`) with arbitrary
//! bytes as one or two layers, unpacked into a scratch staging root on the
//! host (runs on libFuzzer's thread, like the unpacker's caller).
//!
//! Input: byte 0 picks how layers are declared (0: plain tar media type,
//! 1: gzip, 2: zstd, else sniffed from the magic); bytes 1-2 (u16 LE) are
//! the length of the first layer; the rest after it is the second layer
//! (if any).
//!
//! Oracles, besides "no panic": nothing outside the staging root changes
//! (a canary directory at the fixed path `/tmp/locald-fuzz-unpack-canary`,
//! with a file, a subdirectory and a symlink, is compared before and after
//! every input; seeds aim symlinks and hard links at it, by absolute path
//! and through `..`); the scratch directory holding the root holds nothing
//! else; and after a successful unpack the metadata table and the staged
//! tree agree: every record's path exists with the recorded kind (regular
//! file for devices and fifos) and every staged path has a record.

#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use locald_image::unpack::{Limits, NodeKind, Unpacker};

const CANARY: &str = "/tmp/locald-fuzz-unpack-canary";

struct Env {
    base: PathBuf,
    root: PathBuf,
    canary: BTreeMap<PathBuf, String>,
}

fn snapshot(dir: &Path, m: &mut BTreeMap<PathBuf, String>) {
    let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for p in names {
        let md = fs::symlink_metadata(&p).unwrap();
        let mut d = format!("{:o} {} {} {}", md.mode(), md.nlink(), md.size(), md.mtime());
        if md.is_file() {
            d.push_str(&format!(" {:?}", fs::read(&p).unwrap()));
        }
        m.insert(p.clone(), d);
        if md.is_dir() {
            snapshot(&p, m);
        }
    }
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let c = Path::new(CANARY);
        let _ = fs::create_dir_all(c.join("sub"));
        let _ = fs::write(c.join("secret"), b"secret");
        let _ = fs::write(c.join("sub/deep"), b"deep");
        let _ = std::os::unix::fs::symlink("/etc/passwd", c.join("link"));
        let base = PathBuf::from(format!("/tmp/locald-fuzz-unpack-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let mut canary = BTreeMap::new();
        snapshot(c, &mut canary);
        Env {
            root: base.join("root"),
            base,
            canary,
        }
    })
}

/// Every path under `dir`, relative to `root`, not following symlinks.
fn staged(root: &Path, dir: &Path, out: &mut Vec<(Vec<u8>, fs::Metadata)>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
        if md.is_dir() {
            staged(root, &p, out);
        }
        out.push((rel, md));
    }
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    if data.len() < 3 {
        return;
    }
    let media = match data[0] {
        0 => Some("application/vnd.oci.image.layer.v1.tar"),
        1 => Some("application/vnd.oci.image.layer.v1.tar+gzip"),
        2 => Some("application/vnd.oci.image.layer.v1.tar+zstd"),
        _ => None,
    };
    let split = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let rest = &data[3..];
    let (a, b) = rest.split_at(split.min(rest.len()));
    let _ = fs::remove_dir_all(&env.root);
    fs::create_dir(&env.root).unwrap();
    let limits = Limits {
        max_bytes: 8 << 20,
        max_entries: 4096,
        max_metadata_bytes: 64 << 10,
        ..Limits::default()
    };
    let mut u = Unpacker::new(&env.root, limits).unwrap();
    let mut ok = true;
    for layer in [a, b] {
        if layer.is_empty() {
            continue;
        }
        let r = match media {
            Some(m) => u.apply_layer(layer, m),
            None => u.apply_layer_sniffed(layer),
        };
        if r.is_err() {
            ok = false;
            break;
        }
    }
    let table = u.finish();

    let mut now = BTreeMap::new();
    snapshot(Path::new(CANARY), &mut now);
    assert_eq!(now, env.canary, "the canary changed");
    let next: Vec<_> = fs::read_dir(&env.base).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(next, ["root"], "something appeared next to the root");

    if let (true, Ok((table, _))) = (ok, table) {
        let mut host = Vec::new();
        staged(&env.root, &env.root, &mut host);
        for (rel, md) in &host {
            let rec = table
                .get(rel)
                .unwrap_or_else(|| panic!("no record for staged {:?}", rel.escape_ascii().to_string()));
            let ft = md.file_type();
            let agrees = match rec.kind {
                NodeKind::Dir => ft.is_dir(),
                NodeKind::Symlink => ft.is_symlink(),
                _ => ft.is_file(),
            };
            assert!(agrees, "{:?}: {:?} vs {ft:?}", rel.escape_ascii().to_string(), rec.kind);
            if rec.kind.is_special() {
                assert_eq!(md.len(), 0);
            }
        }
        for (p, _) in table.iter() {
            if !p.is_empty() {
                let hp = env.root.join(std::ffi::OsStr::from_bytes(p));
                assert!(fs::symlink_metadata(&hp).is_ok(), "record without a file: {:?}", p.escape_ascii().to_string());
            }
        }
    }
});
