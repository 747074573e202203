//! Functional tests of the layer unpacker: multi-layer images with
//! whiteouts, opaque directories, hard links, symlinks, modes, mtimes,
//! xattrs and device nodes; compression; the metadata table.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;
use locald_image::unpack::{Compression, Limits, NodeKind, UnpackError, Unpacker};

#[test]
fn multi_layer_image() {
    let s = Scratch::new();
    let mut l1 = Layer::new();
    l1.dir("./", 0o755)
        .dir("etc", 0o755)
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/gone", b"x")
        .dir("etc/gonedir", 0o755)
        .file("etc/gonedir/inner", b"y")
        .dir("opq", 0o755)
        .file("opq/lower1", b"l1")
        .dir("opq/sub", 0o700)
        .file("opq/sub/lower2", b"l2")
        .file("opq/keep-by-layer2", b"old")
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file("usr/bin/tool", b"tool-binary")
        .hardlink("usr/bin/tool-alias", "usr/bin/tool")
        .symlink("bin", "usr/bin")
        .symlink("etc/abs", "/usr/bin/tool");
    let mut l2 = Layer::new();
    l2.mtime(1_700_000_000)
        .file("etc/.wh.gone", b"")
        .file("etc/.wh.gonedir", b"")
        // Before the opaque marker: kept (this layer adds it).
        .file("opq/keep-by-layer2", b"new")
        .file("opq/.wh..wh..opq", b"")
        // After the marker: kept too.
        .file("opq/after", b"after")
        // Written through the `bin -> usr/bin` symlink of layer 1.
        .file("bin/second", b"2")
        .hardlink("etc/tool-link", "usr/bin/tool")
        .file("etc/passwd", b"replaced\n")
        .file("etc/.wh.never-existed", b"");
    let (t, st) = s
        .unpack(&[(&l1.finish(), TAR), (&l2.finish(), TAR)])
        .unwrap();
    s.assert_outside_untouched();

    assert!(!exists(&s.p("etc/gone")));
    assert!(!exists(&s.p("etc/gonedir")));
    assert!(t.get(b"etc/gone").is_none() && t.get(b"etc/gonedir/inner").is_none());
    assert_eq!(fs::read(s.p("etc/passwd")).unwrap(), b"replaced\n");
    assert_eq!(t.get(b"etc/passwd").unwrap().mtime, 1_700_000_000);

    let mut opq: Vec<_> = fs::read_dir(s.p("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    opq.sort();
    assert_eq!(opq, ["after", "keep-by-layer2"]);
    assert_eq!(fs::read(s.p("opq/keep-by-layer2")).unwrap(), b"new");
    assert!(t.get(b"opq/lower1").is_none() && t.get(b"opq/sub").is_none());
    assert!(t.get(b"opq/sub/lower2").is_none());

    // The symlinked parent resolves inside the root; the table has the
    // canonical path.
    assert_eq!(fs::read(s.p("usr/bin/second")).unwrap(), b"2");
    assert!(t.get(b"usr/bin/second").is_some());
    assert!(t.get(b"bin/second").is_none());
    assert_eq!(t.get(b"bin").unwrap().kind, NodeKind::Symlink);
    assert_eq!(
        fs::read_link(s.p("etc/abs")).unwrap().to_str(),
        Some("/usr/bin/tool")
    );

    // Hard links share the inode (and the record).
    let ino = fs::metadata(s.p("usr/bin/tool")).unwrap().ino();
    assert_eq!(fs::metadata(s.p("usr/bin/tool-alias")).unwrap().ino(), ino);
    assert_eq!(fs::metadata(s.p("etc/tool-link")).unwrap().ino(), ino);
    assert_eq!(fs::metadata(s.p("usr/bin/tool")).unwrap().nlink(), 3);
    assert_eq!(t.get(b"etc/tool-link"), t.get(b"usr/bin/tool"));

    assert_eq!(t.get(b"").unwrap().kind, NodeKind::Dir);
    assert_eq!(st.layers, 2);
    assert_eq!(st.files, 11);
}

#[test]
fn modes_owners_mtimes_xattrs() {
    let s = Scratch::new();
    let mut l = Layer::new();
    let mut e = E::new(b"usr/bin/sudo", b'0');
    e.data = b"suid";
    e.mode = 0o4755;
    e.uid = 0;
    e.gid = 0;
    e.pax = vec![
        (b"SCHILY.xattr.user.comment", b"hello"),
        (b"SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
        (b"SCHILY.xattr.trusted.t", b"t"),
        (b"mtime", b"1650000000.5"),
    ];
    l.entry(e);
    let mut e = E::new(b"home/user/secret", b'0');
    e.data = b"private";
    e.mode = 0o000;
    e.uid = 1000;
    e.gid = 1001;
    l.entry(e);
    let mut e = E::new(b"tmp", b'5');
    e.mode = 0o1777;
    l.entry(e);
    let mut e = E::new(b"locked", b'5');
    e.mode = 0o000;
    e.uid = 33;
    l.entry(e);
    l.file("locked/inside", b"i");
    let (t, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
    s.assert_outside_untouched();

    // Special bits only in the table; the host keeps them off.
    assert_eq!(mode(&s.p("usr/bin/sudo")), 0o755);
    let r = t.get(b"usr/bin/sudo").unwrap();
    assert_eq!(r.mode, 0o4755);
    assert_eq!(r.mtime, 1_650_000_000);
    assert_eq!(
        fs::metadata(s.p("usr/bin/sudo")).unwrap().mtime(),
        1_650_000_000
    );
    let names: Vec<&[u8]> = r.xattrs.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(
        names,
        [&b"security.capability"[..], b"trusted.t", b"user.comment"]
    );
    assert_eq!(
        getxattr(&s.p("usr/bin/sudo"), "user.comment").as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(getxattr(&s.p("usr/bin/sudo"), "security.capability"), None);

    // Mode 000 becomes owner-readable on the host; ownership only recorded.
    assert_eq!(mode(&s.p("home/user/secret")), 0o600);
    let r = t.get(b"home/user/secret").unwrap();
    assert_eq!((r.mode, r.uid, r.gid), (0, 1000, 1001));
    let me = fs::metadata(s.p("home/user/secret")).unwrap();
    assert_eq!(me.uid(), fs::metadata(&s.base).unwrap().uid());
    assert_eq!(mode(&s.p("tmp")), 0o777);
    assert_eq!(t.get(b"tmp").unwrap().mode, 0o1777);
    assert_eq!(mode(&s.p("locked")), 0o700);
    assert_eq!(fs::read(s.p("locked/inside")).unwrap(), b"i");
    // Implicit parents: root-owned 0755 records.
    let r = t.get(b"home/user").unwrap();
    assert_eq!((r.kind, r.mode, r.uid), (NodeKind::Dir, 0o755, 0));
    // Directory mtimes are set at the end (after their children).
    assert_eq!(fs::metadata(s.p("locked")).unwrap().mtime(), 1_600_000_000);
}

fn getxattr(p: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(bytes(p)).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

#[test]
fn device_nodes_are_recorded_not_created() {
    let s = Scratch::new();
    let mut l = Layer::new();
    l.dir("dev", 0o755);
    let mut e = E::new(b"dev/null", b'3');
    e.dev = (1, 3);
    e.mode = 0o666;
    l.entry(e);
    let mut e = E::new(b"dev/sda", b'4');
    e.dev = (8, 0);
    e.mode = 0o660;
    e.gid = 6;
    l.entry(e);
    let mut e = E::new(b"dev/fifo", b'6');
    e.mode = 0o600;
    l.entry(e);
    l.hardlink("dev/null2", "dev/null");
    let mut l2 = Layer::new();
    l2.file("dev/.wh.sda", b"");
    let (t, _) = s
        .unpack(&[(&l.finish(), TAR), (&l2.finish(), TAR)])
        .unwrap();
    s.assert_outside_untouched();
    for p in ["dev/null", "dev/fifo", "dev/null2"] {
        let md = fs::symlink_metadata(s.p(p)).unwrap();
        assert!(md.file_type().is_file(), "{p} is a placeholder file");
        assert_eq!((md.len(), md.mode() & 0o7777), (0, 0o600));
    }
    assert_eq!(
        t.get(b"dev/null").unwrap().kind,
        NodeKind::CharDevice { major: 1, minor: 3 }
    );
    assert_eq!(t.get(b"dev/null").unwrap().mode, 0o666);
    assert_eq!(t.get(b"dev/null2"), t.get(b"dev/null"));
    assert_eq!(t.get(b"dev/fifo").unwrap().kind, NodeKind::Fifo);
    assert!(t.get(b"dev/sda").is_none() && !exists(&s.p("dev/sda")));
    assert!(NodeKind::Fifo.is_special());
}

#[test]
fn replacements_file_dir_symlink() {
    let s = Scratch::new();
    let mut l1 = Layer::new();
    l1.dir("a", 0o755)
        .file("a/x", b"x")
        .file("b", b"file")
        .symlink("c", "a")
        .file("d", b"d");
    let mut l2 = Layer::new();
    l2.file("a", b"now a file")
        .dir("b", 0o711)
        .file("b/y", b"y")
        .dir("c", 0o755)
        .symlink("d", "b")
        // Same layer: a file then a dir of the same name, and back.
        .file("e", b"e")
        .dir("e", 0o755)
        .dir("f", 0o755)
        .file("f/z", b"z")
        .file("f", b"f");
    let (t, _) = s
        .unpack(&[(&l1.finish(), TAR), (&l2.finish(), TAR)])
        .unwrap();
    s.assert_outside_untouched();
    assert_eq!(fs::read(s.p("a")).unwrap(), b"now a file");
    assert!(t.get(b"a/x").is_none());
    assert_eq!(t.get(b"a").unwrap().kind, NodeKind::File);
    assert_eq!(fs::read(s.p("b/y")).unwrap(), b"y");
    assert_eq!(t.get(b"b").unwrap().kind, NodeKind::Dir);
    assert!(fs::symlink_metadata(s.p("c")).unwrap().is_dir());
    assert_eq!(fs::read_link(s.p("d")).unwrap().to_str(), Some("b"));
    assert!(fs::symlink_metadata(s.p("e")).unwrap().is_dir());
    assert_eq!(fs::read(s.p("f")).unwrap(), b"f");
    assert!(t.get(b"f/z").is_none());
}

#[test]
fn compression_gzip_zstd_sniffed() {
    let s = Scratch::new();
    let mut a = Layer::new();
    a.file("from-gzip", b"g").file("shared", b"gz");
    let mut b = Layer::new();
    b.file("from-zstd", b"z").file("shared", b"zst");
    let mut c = Layer::new();
    c.file("from-docker", b"d");
    let ga = gzip(&a.finish());
    let zb = zstd(&b.finish());
    let gc = gzip(&c.finish());
    let mut u = Unpacker::new(&s.root, Limits::default()).unwrap();
    u.apply_layer(&ga[..], TGZ).unwrap();
    u.apply_layer(&zb[..], TZST).unwrap();
    u.apply_layer(&gc[..], "application/vnd.docker.image.rootfs.diff.tar.gzip")
        .unwrap();
    let st = u.apply_layer_sniffed(&zstd(&c.finish())[..]).unwrap();
    assert_eq!(st.files, 1);
    let (_, total) = u.finish().unwrap();
    assert_eq!(total.layers, 4);
    assert_eq!(fs::read(s.p("shared")).unwrap(), b"zst");
    assert!(exists(&s.p("from-gzip")) && exists(&s.p("from-zstd")) && exists(&s.p("from-docker")));

    let mut u = Unpacker::new(&s.root, Limits::default()).unwrap();
    let e = u.apply_layer(&ga[..], TAR).unwrap_err();
    assert!(
        matches!(
            e,
            UnpackError::CompressionMismatch {
                declared: Compression::None,
                found: Compression::Gzip
            }
        ),
        "{e}"
    );
    let e = u.apply_layer(&a.finish()[..], TZST).unwrap_err();
    assert!(matches!(e, UnpackError::CompressionMismatch { .. }), "{e}");
    let e = u
        .apply_layer(
            &a.finish()[..],
            "application/vnd.oci.image.layer.v1.tar+bzip2",
        )
        .unwrap_err();
    assert!(matches!(e, UnpackError::UnknownMediaType(_)), "{e}");
    // A corrupt gzip stream is a read error.
    let mut bad = ga.clone();
    let mid = bad.len() / 2;
    bad.truncate(mid);
    let e = u.apply_layer(&bad[..], TGZ).unwrap_err();
    assert!(matches!(e, UnpackError::Read(_)), "{e}");
    s.assert_outside_untouched();
}

#[test]
fn long_and_non_utf8_names() {
    let s = Scratch::new();
    let long = format!("{}/{}", "d".repeat(150), "f".repeat(200));
    let mut l = Layer::new();
    l.file(&long, b"long");
    let mut e = E::new(b"caf\xe9", b'0');
    e.data = b"latin1";
    l.entry(e);
    let (t, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
    assert_eq!(fs::read(s.p(&long)).unwrap(), b"long");
    assert!(t.get(b"caf\xe9").is_some());
    use std::os::unix::ffi::OsStrExt;
    let p = s.root.join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    assert_eq!(fs::read(p).unwrap(), b"latin1");
    s.assert_outside_untouched();
}

#[test]
fn table_serializes() {
    let s = Scratch::new();
    let mut l = Layer::new();
    l.file("a", b"a").symlink("l", "a");
    let mut e = E::new(b"c", b'3');
    e.dev = (5, 1);
    l.entry(e);
    let (t, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
    let json = serde_json::to_string(&t).unwrap();
    let back: locald_image::unpack::MetadataTable = serde_json::from_str(&json).unwrap();
    assert_eq!(back, t);
    // The root has a record even when no layer names `./`.
    assert_eq!(t.len(), 4);
    let paths: Vec<&[u8]> = t.iter().map(|(p, _)| p).collect();
    assert_eq!(paths, [&b""[..], b"a", b"c", b"l"]);
}
