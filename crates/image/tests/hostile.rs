//! Hostile layers: every test asserts the unpacker's answer (a typed error,
//! or containment inside the root where the policy is to resolve in-root)
//! AND that nothing next to the staging root changed (the canary).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;
use locald_image::unpack::{LimitKind, Limits, PathRole, Rejection, UnpackError};

/// Whether a rejection is the expected one.
type Check = fn(&Rejection) -> bool;

/// Symlinks (name, target) planted before the entry under test.
type Links<'a> = Vec<(&'a str, &'a str)>;

/// The rejection of a failed unpack, or a panic naming what came instead.
fn rejection(r: Result<impl std::fmt::Debug, UnpackError>) -> Rejection {
    match r {
        Err(UnpackError::Entry { reason, .. }) => reason,
        other => panic!("expected an entry rejection, got {other:?}"),
    }
}

fn canary_abs(s: &Scratch) -> String {
    s.canary.to_str().unwrap().to_string()
}

#[test]
fn absolute_path() {
    let s = Scratch::new();
    let target = format!("{}/pwned", canary_abs(&s));
    let mut l = Layer::new();
    l.file("ok", b"fine").file(&target, b"pwned");
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::Absolute(PathRole::Name)), "{r}");
    s.assert_outside_untouched();
    let mut l = Layer::new();
    l.dir("/", 0o777);
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::Absolute(PathRole::Name)), "{r}");
    s.assert_outside_untouched();
}

#[test]
fn dotdot_components() {
    for name in ["../canary/pwned", "a/../../canary/pwned", "..", "a/.."] {
        let s = Scratch::new();
        let mut l = Layer::new();
        l.dir("a", 0o755).file(name, b"pwned");
        let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
        assert!(
            matches!(r, Rejection::DotDot(PathRole::Name)),
            "{name}: {r}"
        );
        s.assert_outside_untouched();
    }
}

#[test]
fn symlink_then_written_through_same_layer() {
    // `evil -> ../canary` (relative, climbing out) and `abs -> /…/canary`:
    // a later entry under them lands INSIDE the root (chroot semantics).
    let s = Scratch::new();
    let abs = canary_abs(&s);
    let mut l = Layer::new();
    l.symlink("evil", "../canary")
        .file("evil/pwned", b"pwned")
        .symlink("abs", &abs)
        .file("abs/pwned2", b"pwned")
        .symlink("up", "../../../../..")
        .file("up/pwned3", b"pwned");
    let (t, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
    s.assert_outside_untouched();
    assert_eq!(fs::read(s.p("canary/pwned")).unwrap(), b"pwned");
    assert!(t.get(b"canary/pwned").is_some());
    let inside = format!("{}/pwned2", abs.trim_start_matches('/'));
    assert_eq!(fs::read(s.p(&inside)).unwrap(), b"pwned");
    assert_eq!(fs::read(s.p("pwned3")).unwrap(), b"pwned");
    // The symlinks themselves are kept verbatim.
    assert_eq!(
        fs::read_link(s.p("evil")).unwrap().to_str(),
        Some("../canary")
    );
}

#[test]
fn symlink_then_written_through_later_layer() {
    let s = Scratch::new();
    let abs = canary_abs(&s);
    let mut l1 = Layer::new();
    l1.symlink("evil", &abs)
        .symlink("secret-link", &format!("{abs}/secret"))
        .symlink("dirlink", "../canary");
    let mut l2 = Layer::new();
    l2.file("evil/pwned", b"pwned")
        // A file over a symlink to an outside file replaces the symlink.
        .file("secret-link", b"overwritten?")
        // A directory entry over a symlink to an outside dir: replaced, the
        // outside dir is not chmod-ed.
        .dir("dirlink", 0o777);
    s.unpack(&[(&l1.finish(), TAR), (&l2.finish(), TAR)])
        .unwrap();
    s.assert_outside_untouched();
    assert_eq!(fs::read(s.p("secret-link")).unwrap(), b"overwritten?");
    assert!(fs::symlink_metadata(s.p("dirlink")).unwrap().is_dir());
    assert_eq!(fs::read(s.canary.join("secret")).unwrap(), b"secret");
}

#[test]
fn symlinked_parent_loops_and_dotdot_links() {
    let s = Scratch::new();
    let mut l = Layer::new();
    l.symlink("d", "..").file("d/d/d/pwned", b"x");
    s.unpack(&[(&l.finish(), TAR)]).unwrap();
    assert!(exists(&s.p("pwned")));
    s.assert_outside_untouched();

    for (links, name) in [
        (&[("loop", "loop")][..], "loop/x"),
        (&[("a", "b"), ("b", "a")][..], "a/x"),
        (&[("a", "a/a")][..], "a/x"),
    ] {
        let s = Scratch::new();
        let mut l = Layer::new();
        for (n, t) in links {
            l.symlink(n, t);
        }
        l.file(name, b"x");
        let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
        assert!(
            matches!(r, Rejection::SymlinkLoop { .. } | Rejection::TooDeep { .. }),
            "{name}: {r}"
        );
        s.assert_outside_untouched();
    }

    // A parent that is a file.
    let s = Scratch::new();
    let mut l = Layer::new();
    l.file("f", b"f").file("f/x", b"x");
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::NotADirectory(_)), "{r}");
    s.assert_outside_untouched();
}

#[test]
fn hard_link_outside_the_root() {
    let s = Scratch::new();
    let abs = canary_abs(&s);
    let secret = format!("{abs}/secret");
    let cases: Vec<(Links, String, Check)> = vec![
        (vec![], secret.clone(), |r| {
            matches!(r, Rejection::Absolute(PathRole::LinkTarget))
        }),
        (vec![], "../canary/secret".into(), |r| {
            matches!(r, Rejection::DotDot(PathRole::LinkTarget))
        }),
        (vec![], "..".into(), |r| {
            matches!(r, Rejection::DotDot(PathRole::LinkTarget))
        }),
        (vec![("evil", &abs)], "evil/secret".into(), |r| {
            matches!(r, Rejection::LinkTargetMissing(_))
        }),
        (vec![("evil", "../canary")], "evil/secret".into(), |r| {
            matches!(r, Rejection::LinkTargetMissing(_))
        }),
        (vec![], ".".into(), |r| {
            matches!(r, Rejection::LinkTargetIsDirectory(_))
        }),
        (vec![], "nothing".into(), |r| {
            matches!(r, Rejection::LinkTargetMissing(_))
        }),
    ];
    for (links, target, ok) in cases {
        let s = Scratch::new();
        let mut l = Layer::new();
        l.dir("etc", 0o755);
        for (n, t) in &links {
            l.symlink(n, t);
        }
        l.hardlink("etc/x", &target);
        let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
        assert!(ok(&r), "{target}: {r}");
        assert_eq!(fs::metadata(s.canary.join("secret")).unwrap().nlink(), 1);
        s.assert_outside_untouched();
    }

    // A hard link to a symlink (pointing outside) links the symlink itself.
    let s = Scratch::new();
    let mut l = Layer::new();
    l.symlink("out", &format!("{}/secret", canary_abs(&s)))
        .hardlink("out2", "out");
    s.unpack(&[(&l.finish(), TAR)]).unwrap();
    assert!(fs::symlink_metadata(s.p("out2"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::metadata(s.canary.join("secret")).unwrap().nlink(), 1);
    s.assert_outside_untouched();
}

#[test]
fn huge_declared_size() {
    let s = Scratch::new();
    let mut l = Layer::new();
    let mut e = E::new(b"big", b'0');
    e.data = b"only a little";
    e.size = Some(1 << 40);
    l.entry(e);
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(
        matches!(r, Rejection::TooLarge { size, .. } if size == 1 << 40),
        "{r}"
    );
    assert!(!exists(&s.p("big")));
    s.assert_outside_untouched();

    // Within the budget but past the data: truncated.
    let mut l = Layer::new();
    l.file("ok", b"ok");
    let mut e = E::new(b"short", b'0');
    e.size = Some(100_000);
    e.data = b"abc";
    l.entry(e);
    let mut bytes = l.finish();
    bytes.truncate(bytes.len() - 1024);
    let r = s.unpack(&[(&bytes, TAR)]).unwrap_err();
    assert!(
        matches!(
            r,
            UnpackError::Entry {
                reason: Rejection::Truncated { .. } | Rejection::Io { .. },
                ..
            } | UnpackError::Read(_)
        ),
        "{r}"
    );
    s.assert_outside_untouched();
}

#[test]
fn decompression_bomb_and_budget() {
    // 64 MiB of zeros in one file: gzip makes it ~64 KiB.
    let s = Scratch::new();
    let zeros = vec![0u8; 64 << 20];
    let mut l = Layer::new();
    l.file("bomb", &zeros);
    let gz = gzip(&l.finish());
    assert!(gz.len() < 1 << 20);
    let r = s
        .unpack_with(&[(&gz, TGZ)], Limits::with_budget(8 << 20))
        .unwrap_err();
    assert!(
        matches!(
            r,
            UnpackError::Entry {
                reason: Rejection::TooLarge { .. },
                ..
            }
        ),
        "{r}"
    );
    assert!(!exists(&s.p("bomb")));
    s.assert_outside_untouched();

    // Many small files: the budget counts every byte, over layers.
    let s = Scratch::new();
    let mut l = Layer::new();
    for i in 0..100 {
        l.file(&format!("f{i}"), &[1u8; 4096]);
    }
    let z = zstd(&l.finish());
    let r = s
        .unpack_with(&[(&z, TZST), (&z, TZST)], Limits::with_budget(600 << 10))
        .unwrap_err();
    assert!(
        matches!(
            r,
            UnpackError::Limit {
                kind: LimitKind::Bytes,
                ..
            } | UnpackError::Entry {
                reason: Rejection::TooLarge { .. },
                ..
            }
        ),
        "{r}"
    );
    let written: u64 = fs::read_dir(&s.root)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(written <= 600 << 10, "{written}");
    s.assert_outside_untouched();
}

#[test]
fn entry_count_and_metadata_limits() {
    let s = Scratch::new();
    let mut l = Layer::new();
    for i in 0..50 {
        l.file(&format!("f{i}"), b"");
    }
    let limits = Limits {
        max_entries: 20,
        ..Limits::default()
    };
    let r = s.unpack_with(&[(&l.finish(), TAR)], limits).unwrap_err();
    assert!(
        matches!(
            r,
            UnpackError::Limit {
                kind: LimitKind::Entries,
                max: 20
            }
        ),
        "{r}"
    );
    s.assert_outside_untouched();

    // A 4 MiB PAX header (the tar crate would hold it in memory).
    let s = Scratch::new();
    let big = vec![b'a'; 4 << 20];
    let mut l = Layer::new();
    l.pax(&[(b"comment", &big)], None);
    l.file("x", b"x");
    let r = s.unpack(&[(&l.finish(), TAR)]).unwrap_err();
    assert!(
        matches!(
            r,
            UnpackError::Limit {
                kind: LimitKind::Metadata,
                ..
            }
        ),
        "{r}"
    );
    s.assert_outside_untouched();

    // A PAX header declaring 1 TiB.
    let s = Scratch::new();
    let mut l = Layer::new();
    l.pax(&[(b"comment", b"x")], Some(1 << 40));
    l.file("x", b"x");
    let r = s.unpack(&[(&l.finish(), TAR)]).unwrap_err();
    assert!(
        matches!(
            r,
            UnpackError::Limit {
                kind: LimitKind::Metadata,
                ..
            } | UnpackError::Read(_)
        ),
        "{r}"
    );
    s.assert_outside_untouched();
}

#[test]
fn path_length_and_depth() {
    let s = Scratch::new();
    let long = "x".repeat(5000);
    let mut l = Layer::new();
    l.file(&long, b"x");
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::PathTooLong { len: 5000, .. }), "{r}");
    let deep = vec!["d"; 300].join("/");
    let mut l = Layer::new();
    l.file(&deep, b"x");
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::TooDeep { depth: 300, .. }), "{r}");
    // Depth reached through symlinks: `a -> a/a/a/a/a/a/a/a` style growth.
    let mut l = Layer::new();
    l.dir("a", 0o755).symlink("a/b", "../a/b/../b/../b");
    let deep = format!("a/{}/x", vec!["b"; 30].join("/"));
    l.file(&deep, b"x");
    let r = s.unpack(&[(&l.finish(), TAR)]);
    if let Err(e) = r {
        assert!(matches!(e, UnpackError::Entry { .. }), "{e}");
    }
    s.assert_outside_untouched();
}

#[test]
fn replacing_directories_never_follows_symlinks() {
    // Lower layer: dir `d` holding symlinks to the canary (relative and
    // absolute). Upper layers remove `d` by a file, a whiteout, an opaque
    // marker of its parent: the canary stays.
    let abs_of = |s: &Scratch| canary_abs(s);
    for how in 0..3 {
        let s = Scratch::new();
        let abs = abs_of(&s);
        let mut l1 = Layer::new();
        l1.dir("p", 0o755)
            .dir("p/d", 0o755)
            .symlink("p/d/rel", "../../../canary")
            .symlink("p/d/abs", &abs)
            .symlink("p/d/file", &format!("{abs}/secret"));
        let mut l2 = Layer::new();
        match how {
            0 => l2.file("p/d", b"file now"),
            1 => l2.file("p/.wh.d", b""),
            _ => l2.file("p/.wh..wh..opq", b""),
        };
        let (t, _) = s
            .unpack(&[(&l1.finish(), TAR), (&l2.finish(), TAR)])
            .unwrap();
        s.assert_outside_untouched();
        assert!(t.get(b"p/d/rel").is_none(), "{how}");
        assert!(!exists(&s.p("p/d/rel")));
    }
}

#[test]
fn dot_empty_and_bad_whiteouts() {
    let s = Scratch::new();
    let cases: Vec<(&[u8], u8, Check)> = vec![
        (b".", b'0', |r| matches!(r, Rejection::RootNotDirectory)),
        (b"./", b'2', |r| matches!(r, Rejection::RootNotDirectory)),
        (b"", b'0', |r| matches!(r, Rejection::Empty(PathRole::Name))),
        (b"a/.wh.", b'0', |r| matches!(r, Rejection::BadWhiteout)),
        (b"a/.wh..", b'0', |r| matches!(r, Rejection::BadWhiteout)),
        (b"a/.wh...", b'0', |r| matches!(r, Rejection::BadWhiteout)),
        (b"x", b'V', |r| {
            matches!(r, Rejection::UnsupportedType(b'V'))
        }),
    ];
    for (name, kind, ok) in cases {
        let mut l = Layer::new();
        l.dir("a", 0o755);
        let mut e = E::new(name, kind);
        e.link = b"somewhere";
        l.entry(e);
        let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
        assert!(ok(&r), "{:?}: {r}", name.escape_ascii().to_string());
        s.assert_outside_untouched();
    }
    // `.` as a directory is the root itself: allowed, but the root keeps
    // owner access.
    let mut l = Layer::new();
    let mut e = E::new(b".", b'5');
    e.mode = 0o000;
    l.entry(e);
    let (t, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
    assert_eq!(t.get(b"").unwrap().mode, 0);
    assert_eq!(mode(&s.root), 0o700);
    s.assert_outside_untouched();
}

#[test]
fn nul_names_and_sparse() {
    let s = Scratch::new();
    let mut l = Layer::new();
    let mut e = E::new(b"x", b'0');
    e.pax = vec![(b"path", b"a\0/../../canary/pwned")];
    l.entry(e);
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::Nul(PathRole::Name)), "{r}");
    s.assert_outside_untouched();

    let mut l = Layer::new();
    let mut e = E::new(b"sym", b'2');
    e.pax = vec![(b"linkpath", b"a\0b")];
    l.entry(e);
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::Nul(PathRole::SymlinkTarget)), "{r}");

    let mut l = Layer::new();
    let mut e = E::new(b"sparse", b'0');
    e.pax = vec![(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")];
    l.entry(e);
    let r = rejection(s.unpack(&[(&l.finish(), TAR)]));
    assert!(matches!(r, Rejection::Sparse), "{r}");

    let mut l = Layer::new();
    l.entry(E::new(b"sparse", b'S'));
    let r = s.unpack(&[(&l.finish(), TAR)]).unwrap_err();
    assert!(
        matches!(
            r,
            UnpackError::Entry {
                reason: Rejection::Sparse,
                ..
            } | UnpackError::Read(_)
        ),
        "{r}"
    );
    s.assert_outside_untouched();
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let s = Scratch::new();
    let mut junk = vec![0x55u8; 4096];
    junk[0] = b'x';
    let r = s.unpack(&[(&junk, TAR)]).unwrap_err();
    assert!(matches!(r, UnpackError::Read(_)), "{r}");
    s.assert_outside_untouched();
}
