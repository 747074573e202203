//! The ext4 builder end to end: layers unpacked by `Unpacker`, built with
//! `build_rootfs_image`, and the image checked with `debugfs` and
//! `e2fsck -fn` (e2fsprogs, installed by scripts/setup-host.sh):
//! ownership, full modes (setuid, setgid, sticky), device numbers, fifos,
//! xattrs (binary values), symlinks, hard links (same inode), mtimes
//! (after 2038 too), awkward names, the mount points; errors for names a
//! debugfs command file cannot carry; the cache and its lock.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use locald_image::rootfs::{
    build_rootfs_image, cached_rootfs, script::quote, EntryProblem, Ext4Error, RootfsOptions,
    MOUNT_POINTS,
};
use locald_image::unpack::MetadataTable;

/// `debugfs -R REQUEST IMAGE` stdout.
fn debugfs(image: &Path, request: &str) -> String {
    debugfs_raw(image, request.as_bytes())
}

/// [`debugfs`] with a request in bytes (non-UTF-8 names).
fn debugfs_raw(image: &Path, request: &[u8]) -> String {
    use std::os::unix::ffi::OsStrExt;
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(std::ffi::OsStr::from_bytes(request))
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `path` quoted for a debugfs request (UTF-8 paths).
fn q(path: &[u8]) -> String {
    String::from_utf8(quote(path).unwrap()).unwrap()
}

/// What `stat` says about one inode.
#[derive(Debug)]
struct Stat {
    inode: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    links: u32,
    mtime: i64,
    device: Option<(u32, u32)>,
    text: String,
}

fn after<'a>(text: &'a str, key: &str) -> &'a str {
    let i = text.find(key).unwrap_or_else(|| panic!("{key} in {text}")) + key.len();
    text[i..].split_whitespace().next().unwrap()
}

fn stat(image: &Path, path: &[u8]) -> Stat {
    let mut req = b"stat ".to_vec();
    req.extend_from_slice(&quote(path).unwrap());
    let text = debugfs_raw(image, &req);
    assert!(text.contains("Inode:"), "stat {path:?}: {text}");
    let ty = after(&text, "Type:");
    let tbits = match ty {
        "regular" => 0o100000,
        "directory" => 0o040000,
        "symlink" => 0o120000,
        "character" => 0o020000,
        "block" => 0o060000,
        "FIFO" => 0o010000,
        other => panic!("type {other}"),
    };
    // " mtime: 0xf4865700:00000001 -- …"
    let m = after(&text, "mtime:");
    let (lo, extra) = m.trim_start_matches("0x").split_once(':').unwrap();
    let lo = u32::from_str_radix(lo, 16).unwrap();
    let extra = u32::from_str_radix(extra, 16).unwrap();
    let mtime = i64::from(lo as i32) + (i64::from(extra & 3) << 32);
    let device = text.find("major/minor number:").map(|_| {
        let (a, b) = after(&text, "major/minor number:").split_once(':').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    });
    Stat {
        inode: after(&text, "Inode:").parse().unwrap(),
        mode: tbits | u32::from_str_radix(after(&text, "Mode:"), 8).unwrap(),
        uid: after(&text, "User:").parse().unwrap(),
        gid: after(&text, "Group:").parse().unwrap(),
        links: after(&text, "Links:").parse().unwrap(),
        mtime,
        device,
        text,
    }
}

/// The raw value of xattr `name` of `path`.
fn xattr(image: &Path, path: &[u8], name: &str, scratch: &Path) -> Option<Vec<u8>> {
    let out = scratch.join("xattr-value");
    let _ = fs::remove_file(&out);
    debugfs(
        image,
        &format!(
            "ea_get -f {} {} {name}",
            q(out.as_os_str().as_encoded_bytes()),
            q(path)
        ),
    );
    fs::read(&out).ok()
}

fn fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build(s: &Scratch, table: &MetadataTable) -> Result<PathBuf, Ext4Error> {
    let dest = s.base.join("out/root.ext4");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    build_rootfs_image(&s.root, table, &dest, &RootfsOptions::default()).map(|_| dest)
}

/// Gives the whole tree to 4321:4321 when running as root (what a
/// non-root build sees: files owned by the builder, not by root).
fn as_other_owner(root: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(4321), Some(4321)).unwrap();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
}

/// Names of everything in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn image_holds_the_table() {
    let s = Scratch::new();
    let mut l1 = Layer::new();
    l1.dir("./", 0o755)
        .dir("bin", 0o755)
        .dir("dev", 0o755)
        .dir("tmp", 0o1777);
    let mut e = E::new(b"bin/su", b'0');
    e.data = b"setuid binary";
    e.mode = 0o4755;
    l1.entry(e);
    let mut e = E::new(b"bin/sg", b'0');
    e.data = b"setgid";
    e.mode = 0o2711;
    e.gid = 42;
    l1.entry(e);
    let mut e = E::new(b"home", b'5');
    e.mode = 0o750;
    e.uid = 70_000;
    e.gid = 80_000;
    l1.entry(e);
    let mut e = E::new(b"home/secret", b'0');
    e.data = b"s";
    e.mode = 0o640;
    e.uid = 1000;
    e.gid = 1001;
    e.pax = vec![
        (b"SCHILY.xattr.user.comment", b"hello"),
        (
            b"SCHILY.xattr.security.capability",
            b"\x01\x00\x00\x02\x00\xff\x00\x00",
        ),
        (b"SCHILY.xattr.trusted.t", b"t\0binary\xff"),
    ];
    l1.entry(e);
    l1.hardlink("bin/su-link", "bin/su");
    l1.symlink("bin/sh", "/bin/busybox");
    l1.symlink("long", &"x/".repeat(100));
    let mut e = E::new(b"dev/null", b'3');
    e.dev = (1, 3);
    e.mode = 0o666;
    l1.entry(e);
    let mut e = E::new(b"dev/sda", b'4');
    e.dev = (8, 0);
    e.mode = 0o660;
    e.gid = 6;
    l1.entry(e);
    let mut e = E::new(b"dev/big", b'3');
    e.dev = (300, 70_000);
    e.mode = 0o600;
    l1.entry(e);
    let mut e = E::new(b"dev/fifo", b'6');
    e.mode = 0o620;
    l1.entry(e);
    l1.file("we ird\"name\ttab", b"awkward");
    l1.file("caf\u{e9}", b"utf8");
    l1.entry({
        let mut e = E::new(b"bin/\xff\xfe", b'0');
        e.data = b"not utf8";
        e
    });
    let mut l2 = Layer::new();
    l2.mtime(4_102_444_800).file("future", b"2100");
    let (table, _) = s
        .unpack(&[(&l1.finish(), TAR), (&l2.finish(), TAR)])
        .unwrap();
    // As a non-root builder sees it: the staged files are the builder's
    // (mkfs copies that owner), so every owner comes from a command.
    as_other_owner(&s.root);
    let img = build(&s, &table).unwrap();
    fsck(&img);

    let su = stat(&img, b"/bin/su");
    assert_eq!((su.mode, su.uid, su.gid), (0o104755, 0, 0), "{}", su.text);
    assert_eq!(su.mtime, 1_600_000_000);
    let link = stat(&img, b"/bin/su-link");
    assert_eq!(link.inode, su.inode, "hard link shares the inode");
    assert_eq!(link.links, 2);
    let sg = stat(&img, b"/bin/sg");
    assert_eq!((sg.mode, sg.gid), (0o102711, 42));
    let home = stat(&img, b"/home");
    assert_eq!((home.mode, home.uid, home.gid), (0o040750, 70_000, 80_000));
    let secret = stat(&img, b"/home/secret");
    assert_eq!(
        (secret.mode, secret.uid, secret.gid),
        (0o100640, 1000, 1001)
    );
    let scratch = s.base.join("out");
    assert_eq!(
        xattr(&img, b"/home/secret", "user.comment", &scratch).as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        xattr(&img, b"/home/secret", "security.capability", &scratch).as_deref(),
        Some(&b"\x01\x00\x00\x02\x00\xff\x00\x00"[..])
    );
    assert_eq!(
        xattr(&img, b"/home/secret", "trusted.t", &scratch).as_deref(),
        Some(&b"t\0binary\xff"[..])
    );
    let tmp = stat(&img, b"/tmp");
    assert_eq!(tmp.mode, 0o041777, "sticky");
    let sh = stat(&img, b"/bin/sh");
    assert_eq!(sh.mode, 0o120777);
    assert!(
        sh.text.contains("Fast link dest: \"/bin/busybox\""),
        "{}",
        sh.text
    );
    assert_eq!(stat(&img, b"/long").mode, 0o120777);
    // A slow symlink: `cat` dumps its target block.
    assert_eq!(debugfs(&img, "cat /long"), "x/".repeat(100));
    let null = stat(&img, b"/dev/null");
    assert_eq!(
        (null.mode, null.device),
        (0o020666, Some((1, 3))),
        "{}",
        null.text
    );
    let sda = stat(&img, b"/dev/sda");
    assert_eq!((sda.mode, sda.gid, sda.device), (0o060660, 6, Some((8, 0))));
    let big = stat(&img, b"/dev/big");
    assert_eq!(
        (big.mode, big.device),
        (0o020600, Some((300, 70_000))),
        "{}",
        big.text
    );
    let fifo = stat(&img, b"/dev/fifo");
    assert_eq!(fifo.mode, 0o010620);
    let weird = stat(&img, b"/we ird\"name\ttab");
    assert_eq!(weird.mode, 0o100644);
    assert_eq!(
        debugfs(&img, &format!("cat {}", q(b"/we ird\"name\ttab"))),
        "awkward"
    );
    assert_eq!(debugfs(&img, "cat /caf\u{e9}"), "utf8");
    assert_eq!(stat(&img, b"/bin/\xff\xfe").mode, 0o100644);
    let future = stat(&img, b"/future");
    assert_eq!(future.mtime, 4_102_444_800, "{}", future.text);
    let root = stat(&img, b"/");
    assert_eq!((root.mode, root.uid), (0o040755, 0));
    // Mount points: dev and tmp came from the image, the others were added.
    let ls = debugfs(&img, "ls -l /");
    for (m, mode) in MOUNT_POINTS {
        let st = stat(&img, format!("/{m}").as_bytes());
        assert_eq!(st.mode & 0o170000, 0o040000, "{m} is a directory: {ls}");
        if *m != "dev" && *m != "tmp" {
            assert_eq!((st.mode & 0o7777, st.uid, st.gid), (*mode, 0, 0), "{m}");
        }
    }
    // Only the image is left next to it.
    assert_eq!(names(&scratch), ["root.ext4", "xattr-value"]);
}

#[test]
fn unexpressible_names_are_errors() {
    for name in [&b"bad\nname"[..], b"bad\rname", b"dir\n/x"] {
        let s = Scratch::new();
        let mut l = Layer::new();
        l.dir("./", 0o755);
        if name.starts_with(b"dir") {
            l.entry(E::new(b"dir\n", b'5'));
        }
        let mut e = E::new(name, b'0');
        e.data = b"x";
        l.entry(e);
        let (table, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
        let err = build(&s, &table).unwrap_err();
        let shown = String::from_utf8_lossy(
            &name[..name.iter().position(|&c| c == b'\n' || c == b'\r').unwrap()],
        )
        .into_owned();
        match &err {
            Ext4Error::Entry {
                path,
                problem: EntryProblem::Unexpressible,
            } => assert!(path.starts_with(&format!("/{shown}")), "{path}"),
            other => panic!("{other}"),
        }
        assert!(
            err.to_string().contains("newline or carriage return"),
            "{err}"
        );
        assert!(names(&s.base.join("out")).is_empty(), "nothing left behind");
    }
}

#[test]
fn table_and_tree_must_agree() {
    let s = Scratch::new();
    let mut l = Layer::new();
    l.dir("./", 0o755).file("a", b"a");
    let (table, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
    fs::write(s.p("intruder"), b"x").unwrap();
    let err = build(&s, &table).unwrap_err();
    assert!(
        matches!(&err, Ext4Error::Entry { path, problem: EntryProblem::NoRecord } if path == "/intruder"),
        "{err}"
    );
    fs::remove_file(s.p("intruder")).unwrap();
    fs::remove_file(s.p("a")).unwrap();
    let err = build(&s, &table).unwrap_err();
    assert!(
        matches!(&err, Ext4Error::Entry { path, problem: EntryProblem::NotStaged } if path == "/a"),
        "{err}"
    );
}

#[test]
fn sizing_fits_many_files() {
    let s = Scratch::new();
    let mut l = Layer::new();
    l.dir("./", 0o755).dir("many", 0o755);
    let names: Vec<String> = (0..3000)
        .map(|i| format!("many/file-with-a-longish-name-{i:05}"))
        .collect();
    for n in &names {
        l.file(n, b"tiny");
    }
    let big = vec![7u8; 5 << 20];
    l.file("big", &big);
    let (table, _) = s.unpack(&[(&l.finish(), TAR)]).unwrap();
    let dest = s.base.join("out/root.ext4");
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    let opts = RootfsOptions {
        min_size_bytes: 0,
        headroom_bytes: 0,
        ..Default::default()
    };
    let stats = build_rootfs_image(&s.root, &table, &dest, &opts).unwrap();
    eprintln!("{stats:?}");
    assert_eq!(stats.mkfs_attempts, 1, "{stats:?}");
    assert_eq!(stats.entries, 3003);
    assert!(stats.size_bytes < 40 << 20, "{stats:?}");
    assert_eq!(fs::metadata(&dest).unwrap().len(), stats.size_bytes);
    fsck(&dest);
    assert!(stat(&dest, b"/big").text.contains("Size: 5242880"));
    assert_eq!(
        debugfs(&dest, "cat /many/file-with-a-longish-name-02999"),
        "tiny"
    );
}

#[test]
fn cache_builds_once_under_the_lock() {
    let s = Scratch::new();
    let mut l = Layer::new();
    l.dir("./", 0o755).file("hello", b"hi");
    let layer = Arc::new(l.finish());
    let dest = s.base.join("cache/rootfs/sha256-abc.ext4");
    let calls = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (dest, calls, layer) = (dest.clone(), calls.clone(), layer.clone());
            std::thread::spawn(move || {
                cached_rootfs(&dest, &RootfsOptions::default(), |staging| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let mut u = locald_image::unpack::Unpacker::new(
                        staging,
                        locald_image::unpack::Limits::default(),
                    )?;
                    u.apply_layer(&layer[..], TAR)?;
                    u.finish().map(|(t, _)| t)
                })
                .unwrap()
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "staged once");
    assert_eq!(results.iter().filter(|r| r.built.is_some()).count(), 1);
    assert!(results.iter().all(|r| r.path == dest));
    assert_eq!(debugfs(&dest, "cat /hello"), "hi");
    assert_eq!(
        names(dest.parent().unwrap()),
        ["sha256-abc.ext4", "sha256-abc.ext4.lock"]
    );

    // A failed staging leaves only the lock file, and the error is the
    // caller's.
    let other = dest.with_file_name("sha256-def.ext4");
    // Leftovers of an interrupted build are cleaned up.
    fs::create_dir_all(dest.with_file_name(".sha256-def.ext4.staging-1-0/x")).unwrap();
    fs::write(dest.with_file_name(".sha256-def.ext4.tmp-1-0"), b"junk").unwrap();
    let err = cached_rootfs(&other, &RootfsOptions::default(), |_| {
        Err::<MetadataTable, _>(std::io::Error::other("registry said no"))
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "staging the image: registry said no");
    assert_eq!(
        names(dest.parent().unwrap()),
        [
            "sha256-abc.ext4",
            "sha256-abc.ext4.lock",
            "sha256-def.ext4.lock"
        ]
    );
}
