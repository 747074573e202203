//! Unit tests of the unpacker internals: name normalization, the
//! same-layer bookkeeping, the table's subtree removal, media types.

use super::*;

#[test]
fn normalize_names() {
    fn n(b: &[u8]) -> Result<Vec<&[u8]>, Rejection> {
        normalize(b, PathRole::Name, &Limits::default())
    }
    assert_eq!(n(b"./a//b/./c/").unwrap(), [&b"a"[..], b"b", b"c"]);
    assert!(n(b".").unwrap().is_empty());
    assert!(n(b"./").unwrap().is_empty());
    assert!(matches!(n(b""), Err(Rejection::Empty(_))));
    assert!(matches!(n(b"/a"), Err(Rejection::Absolute(_))));
    assert!(matches!(n(b"a/../b"), Err(Rejection::DotDot(_))));
    assert!(matches!(n(b"a\0b"), Err(Rejection::Nul(_))));
    assert_eq!(n(b"a\\..\\b").unwrap(), [&b"a\\..\\b"[..]]);
    assert_eq!(n(b"\xff\xfe").unwrap(), [&b"\xff\xfe"[..]]);
}

#[test]
fn mark_added_marks_ancestors() {
    let mut ls = LayerState::default();
    ls.mark_added(b"a/b/c");
    for p in [&b""[..], b"a", b"a/b", b"a/b/c"] {
        assert!(ls.added.contains(p), "{p:?}");
    }
    assert!(!ls.added.contains(&b"a/b/cd"[..]));
}

#[test]
fn remove_tree_is_prefix_exact() {
    let mut t = MetadataTable::default();
    let rec = Record {
        kind: NodeKind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: 0,
        xattrs: Vec::new(),
    };
    for p in ["a", "a/x", "a/y/z", "a-b", "a.b", "ab", "b"] {
        t.insert(p.as_bytes().to_vec(), rec.clone());
    }
    t.remove_tree(b"a");
    let left: Vec<&[u8]> = t.iter().map(|(p, _)| p).collect();
    assert_eq!(left, [&b"a-b"[..], b"a.b", b"ab", b"b"]);
}

#[test]
fn media_types_and_magic() {
    use Compression as C;
    let m = |s: &str| Compression::from_media_type(s).unwrap();
    assert_eq!(m("application/vnd.oci.image.layer.v1.tar"), C::None);
    assert_eq!(m("application/vnd.oci.image.layer.v1.tar+gzip"), C::Gzip);
    assert_eq!(m("application/vnd.oci.image.layer.v1.tar+zstd"), C::Zstd);
    assert_eq!(
        m("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        C::Gzip
    );
    assert!(matches!(
        Compression::from_media_type("application/vnd.oci.image.config.v1+json"),
        Err(UnpackError::UnknownMediaType(_))
    ));
    assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8, 0]), C::Gzip);
    assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), C::Zstd);
    assert_eq!(Compression::sniff(b"etc/"), C::None);
    assert_eq!(Compression::sniff(&[]), C::None);
}

#[test]
fn host_modes() {
    assert_eq!(host_mode(0o4755, false), 0o755);
    assert_eq!(host_mode(0o000, false), 0o600);
    assert_eq!(host_mode(0o1777, true), 0o777);
    assert_eq!(host_mode(0o000, true), 0o700);
}
