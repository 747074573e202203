//! Unit tests of the virtio-fs server: the confinement policy through the
//! `FileSystem` API (what a hostile guest can ask for), and the device's
//! queue function with a mock queue.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use fuse_backend_rs::abi::fuse_abi::CreateIn;
use fuse_backend_rs::api::filesystem::{Context, FileSystem};

use super::share::ROOT_INODE;
use super::*;
use crate::test_support::{skip, Why};

struct Tmp(PathBuf);
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// base/{outside, share/{file, dir/inner, up -> ../outside, abs -> base/outside, fd -> /proc/self/fd/0}}
fn setup(name: &str) -> (Tmp, PathBuf) {
    let base = std::env::temp_dir().join(format!("locald-fs-unit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let share = base.join("share");
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::write(base.join("outside"), b"secret").unwrap();
    std::fs::write(share.join("file"), b"inside").unwrap();
    std::fs::write(share.join("dir/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("../outside", share.join("up")).unwrap();
    std::os::unix::fs::symlink(base.join("outside"), share.join("abs")).unwrap();
    std::os::unix::fs::symlink("/proc/self/fd/0", share.join("fd")).unwrap();
    (Tmp(base), share)
}

thread_local! {
    /// Inode mode for [`fs`]: file handles (true) or one `O_PATH` fd each.
    static HANDLES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a confinement test with inodes as fds, then as file handles (when
/// this process may use them).
fn in_both_inode_modes(body: fn()) {
    for handles in [false, true] {
        if handles && !share::can_open_by_handle() {
            skip(Why::NotRoot("CAP_DAC_READ_SEARCH: file-handle inode mode"));
            continue;
        }
        HANDLES.with(|h| h.set(handles));
        body();
    }
}

fn fs(share: &std::path::Path, ro: bool) -> ShareFs {
    let mut o = ShareFsOptions::new(share, ro, ShareCache::Auto);
    o.inode_handles = HANDLES.with(|h| h.get());
    let fs = ShareFs::new(o).unwrap();
    fs.init(fuse_backend_rs::abi::fuse_abi::FsOptions::empty())
        .unwrap();
    fs
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn errno<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error, got success"),
        Err(e) => e.raw_os_error().unwrap(),
    }
}

fn read_all(fs: &ShareFs, inode: u64) -> std::io::Result<Vec<u8>> {
    let ctx = Context::new();
    let (h, _, _) = fs.open(&ctx, inode, libc::O_RDONLY as u32, 0)?;
    let h = h.unwrap();
    // Read through the handle's fd via /proc (ZeroCopyWriter needs a transport).
    let path = std::fs::read_link(format!("/proc/self/fd/{}", find_fd_for(fs, inode)?))?;
    let data = std::fs::read(path);
    fs.release(&ctx, inode, 0, h, false, false, None)?;
    data
}

/// The host path the server holds for `inode` (through its O_PATH fd).
fn find_fd_for(_fs: &ShareFs, _inode: u64) -> std::io::Result<i32> {
    Err(std::io::Error::other("unused"))
}

#[test]
fn dotdot_at_root_is_the_root() {
    in_both_inode_modes(dotdot_at_root_is_the_root_body);
}

fn dotdot_at_root_is_the_root_body() {
    let (_t, share) = setup("dotdot");
    let fs = fs(&share, false);
    let ctx = Context::new();
    let e = fs.lookup(&ctx, ROOT_INODE, &c("..")).unwrap();
    let root_ino = std::fs::metadata(&share).unwrap().ino();
    assert_eq!(e.attr.st_ino, root_ino);
    assert_eq!(
        errno(fs.lookup(&ctx, ROOT_INODE, &c("../outside"))),
        libc::EINVAL
    );
    assert_eq!(errno(fs.lookup(&ctx, ROOT_INODE, &c("/etc"))), libc::EINVAL);
    // `..` of a subdirectory stays inside too (its parent is the root).
    let d = fs.lookup(&ctx, ROOT_INODE, &c("dir")).unwrap();
    let p = fs.lookup(&ctx, d.inode, &c("..")).unwrap();
    assert_eq!(p.attr.st_ino, root_ino);
    let pp = fs.lookup(&ctx, p.inode, &c("..")).unwrap();
    assert_eq!(pp.attr.st_ino, root_ino);
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    in_both_inode_modes(symlinks_are_never_followed_on_the_host_body);
}

fn symlinks_are_never_followed_on_the_host_body() {
    let (_t, share) = setup("symlink");
    let fs = fs(&share, false);
    let ctx = Context::new();
    for (name, target) in [
        ("up", "../outside".to_string()),
        ("fd", "/proc/self/fd/0".to_string()),
    ] {
        let e = fs.lookup(&ctx, ROOT_INODE, &c(name)).unwrap();
        assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK, "{name}");
        assert_eq!(fs.readlink(&ctx, e.inode).unwrap(), target.as_bytes());
        // Opening the link itself is refused, never the target.
        let r = fs.open(&ctx, e.inode, libc::O_RDONLY as u32, 0);
        assert!(r.is_err(), "{name}: open of a symlink inode succeeded");
        assert_eq!(errno(fs.lookup(&ctx, e.inode, &c("x"))), libc::ENOTDIR);
    }
    let e = fs.lookup(&ctx, ROOT_INODE, &c("abs")).unwrap();
    assert_eq!(e.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    // setattr on a symlink does not chmod its target.
    let before = std::fs::metadata(share.parent().unwrap().join("outside"))
        .unwrap()
        .mode();
    let mut a = e.attr;
    a.st_mode = 0o777;
    let _ = fs.setattr(
        &ctx,
        e.inode,
        a,
        None,
        fuse_backend_rs::abi::fuse_abi::SetattrValid::MODE,
    );
    let after = std::fs::metadata(share.parent().unwrap().join("outside"))
        .unwrap()
        .mode();
    assert_eq!(before, after);
}

#[test]
fn lookup_then_swap_races_stay_inside() {
    in_both_inode_modes(lookup_then_swap_races_stay_inside_body);
}

fn lookup_then_swap_races_stay_inside_body() {
    let (_t, share) = setup("race");
    let fs = fs(&share, false);
    let ctx = Context::new();
    let base = share.parent().unwrap().to_path_buf();
    // A directory looked up, then replaced on the host by a symlink out.
    let d = fs.lookup(&ctx, ROOT_INODE, &c("dir")).unwrap();
    std::fs::rename(share.join("dir"), share.join("dir.old")).unwrap();
    std::os::unix::fs::symlink(&base, share.join("dir")).unwrap();
    assert_eq!(errno(fs.lookup(&ctx, d.inode, &c("outside"))), libc::ENOENT);
    assert!(fs.lookup(&ctx, d.inode, &c("inner")).is_ok());
    // A fresh lookup of the name now finds the symlink, not the target.
    let d2 = fs.lookup(&ctx, ROOT_INODE, &c("dir")).unwrap();
    assert_eq!(d2.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        errno(fs.lookup(&ctx, d2.inode, &c("outside"))),
        libc::ENOTDIR
    );
    // A file looked up, then replaced by a symlink to the outside file:
    // open reaches the original inode.
    let f = fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap();
    std::fs::rename(share.join("file"), share.join("file.old")).unwrap();
    std::os::unix::fs::symlink(base.join("outside"), share.join("file")).unwrap();
    let (h, _, _) = fs.open(&ctx, f.inode, libc::O_RDONLY as u32, 0).unwrap();
    let ga = fs.getattr(&ctx, f.inode, h).unwrap().0;
    assert_eq!(
        ga.st_ino,
        std::fs::metadata(share.join("file.old")).unwrap().ino()
    );
    fs.release(&ctx, f.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
}

#[test]
fn no_devices_no_setid() {
    in_both_inode_modes(no_devices_no_setid_body);
}

fn no_devices_no_setid_body() {
    let (_t, share) = setup("mknod");
    let fs = fs(&share, false);
    let ctx = Context::new();
    assert_eq!(
        errno(fs.mknod(
            &ctx,
            ROOT_INODE,
            &c("null"),
            libc::S_IFCHR | 0o666,
            0x103,
            0
        )),
        libc::EPERM
    );
    assert_eq!(
        errno(fs.mknod(&ctx, ROOT_INODE, &c("sda"), libc::S_IFBLK | 0o666, 0x800, 0)),
        libc::EPERM
    );
    fs.mknod(&ctx, ROOT_INODE, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0)
        .unwrap();
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o4755,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, _, _) = fs.create(&ctx, ROOT_INODE, &c("suid"), args).unwrap();
    assert_eq!(
        std::fs::metadata(share.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    fs.release(&ctx, e.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    let mut a = e.attr;
    a.st_mode = libc::S_IFREG | 0o6755;
    fs.setattr(
        &ctx,
        e.inode,
        a,
        None,
        fuse_backend_rs::abi::fuse_abi::SetattrValid::MODE,
    )
    .unwrap();
    assert_eq!(
        std::fs::metadata(share.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
}

#[test]
fn read_only_share_rejects_every_write() {
    in_both_inode_modes(read_only_share_rejects_every_write_body);
}

fn read_only_share_rejects_every_write_body() {
    let (_t, share) = setup("ro");
    let fs = fs(&share, true);
    let ctx = Context::new();
    let f = fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap();
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    use fuse_backend_rs::abi::fuse_abi::SetattrValid;
    let erofs = libc::EROFS;
    assert_eq!(errno(fs.create(&ctx, ROOT_INODE, &c("new"), args)), erofs);
    assert_eq!(errno(fs.mkdir(&ctx, ROOT_INODE, &c("d2"), 0o755, 0)), erofs);
    assert_eq!(
        errno(fs.mknod(&ctx, ROOT_INODE, &c("p"), libc::S_IFIFO | 0o644, 0, 0)),
        erofs
    );
    assert_eq!(errno(fs.symlink(&ctx, &c("x"), ROOT_INODE, &c("s"))), erofs);
    assert_eq!(errno(fs.link(&ctx, f.inode, ROOT_INODE, &c("h"))), erofs);
    assert_eq!(errno(fs.unlink(&ctx, ROOT_INODE, &c("file"))), erofs);
    assert_eq!(errno(fs.rmdir(&ctx, ROOT_INODE, &c("dir"))), erofs);
    assert_eq!(
        errno(fs.rename(&ctx, ROOT_INODE, &c("file"), ROOT_INODE, &c("f2"), 0)),
        erofs
    );
    assert_eq!(
        errno(fs.setattr(&ctx, f.inode, f.attr, None, SetattrValid::SIZE)),
        erofs
    );
    assert_eq!(
        errno(fs.setxattr(&ctx, f.inode, &c("user.a"), b"1", 0)),
        erofs
    );
    assert_eq!(errno(fs.removexattr(&ctx, f.inode, &c("user.a"))), erofs);
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_WRONLY | libc::O_APPEND,
    ] {
        assert_eq!(
            errno(fs.open(&ctx, f.inode, flags as u32, 0)),
            erofs,
            "flags {flags:#x}"
        );
    }
    assert_eq!(errno(fs.access(&ctx, f.inode, libc::W_OK as u32)), erofs);
    // Reading still works, and the tree is unchanged.
    let (h, _, _) = fs.open(&ctx, f.inode, libc::O_RDONLY as u32, 0).unwrap();
    fs.release(&ctx, f.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    assert_eq!(std::fs::read(share.join("file")).unwrap(), b"inside");
    assert!(fs.statfs(&ctx, ROOT_INODE).unwrap().f_flag & libc::ST_RDONLY != 0);
}

#[test]
fn inode_and_handle_limits() {
    let (_t, share) = setup("limits");
    for i in 0..20 {
        std::fs::write(share.join(format!("n{i}")), b"x").unwrap();
    }
    let mut o = ShareFsOptions::new(&share, false, ShareCache::Auto);
    o.max_inodes = 8;
    o.max_handles = 2;
    let fs = ShareFs::new(o).unwrap();
    let ctx = Context::new();
    let mut got = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        match fs.lookup(&ctx, ROOT_INODE, &c(&format!("n{i}"))) {
            Ok(e) => got.push(e.inode),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENFILE));
                refused += 1;
            }
        }
    }
    assert_eq!(got.len(), 7, "root + 7");
    assert_eq!(refused, 13);
    assert_eq!(fs.inode_count(), 8);
    // Forgetting frees room.
    fs.forget(&ctx, got[0], 1);
    assert_eq!(fs.inode_count(), 7);
    assert!(fs.lookup(&ctx, ROOT_INODE, &c("n19")).is_ok());
    // Handles.
    let h1 = fs
        .open(&ctx, got[1], libc::O_RDONLY as u32, 0)
        .unwrap()
        .0
        .unwrap();
    let _h2 = fs
        .open(&ctx, got[2], libc::O_RDONLY as u32, 0)
        .unwrap()
        .0
        .unwrap();
    assert_eq!(
        errno(fs.open(&ctx, got[3], libc::O_RDONLY as u32, 0)),
        libc::ENFILE
    );
    fs.release(&ctx, got[1], 0, h1, false, false, None).unwrap();
    assert!(fs.open(&ctx, got[3], libc::O_RDONLY as u32, 0).is_ok());
}

#[test]
fn mount_points_under_the_share_are_not_crossed() {
    in_both_inode_modes(mount_points_under_the_share_are_not_crossed_body);
}

fn mount_points_under_the_share_are_not_crossed_body() {
    if !is_root() {
        skip(Why::NotRoot("bind mounts"));
        return;
    }
    let (_t, share) = setup("mnt");
    let target = share.join("bind");
    std::fs::create_dir(&target).unwrap();
    let src = share.parent().unwrap().join("elsewhere");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("x"), b"x").unwrap();
    let s = c(src.to_str().unwrap());
    let t = c(target.to_str().unwrap());
    // SAFETY: valid NUL-terminated paths; a bind mount of our own temp dir.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("bind mount failed: {e}");
        skip(Why::NotRoot("CAP_SYS_ADMIN for bind mounts"));
        return;
    }
    let fs = fs(&share, false);
    let ctx = Context::new();
    let r = fs.lookup(&ctx, ROOT_INODE, &c("bind"));
    // Refused lookups hold no fd afterwards (fuse-backend-rs patch 0001:
    // in file-handle mode each one used to leak the mount point's fd).
    let before = open_fds();
    for _ in 0..300 {
        assert_eq!(errno(fs.lookup(&ctx, ROOT_INODE, &c("bind"))), libc::EXDEV);
    }
    let grown = open_fds().saturating_sub(before);
    // SAFETY: unmounting the bind mount made above.
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(errno(r), libc::EXDEV);
    assert_eq!(fs.inode_count(), 1);
    assert!(grown < 100, "300 refused lookups: fds +{grown}");
}

/// Open fds of this process (other tests run alongside: compare with slack).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn session_restarts_leak_no_fd() {
    in_both_inode_modes(session_restarts_leak_no_fd_body);
}

/// What a guest resetting the device in a loop does: destroy + INIT.
fn session_restarts_leak_no_fd_body() {
    let (_t, share) = setup("restart");
    let fs = fs(&share, false);
    let ctx = Context::new();
    let before = open_fds();
    for _ in 0..300 {
        fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap();
        fs.destroy();
        fs.init(fuse_backend_rs::abi::fuse_abi::FsOptions::empty())
            .unwrap();
    }
    let grown = open_fds().saturating_sub(before);
    assert!(grown < 100, "300 session restarts: fds +{grown}");
    assert_eq!(std::fs::read(share.join("file")).unwrap(), b"inside");
}

#[test]
fn config_space_has_tag_and_queue_count() {
    let (_t, share) = setup("cfg");
    let dev = Fs::new("locald-share0", fs(&share, false));
    let mut b = [0u8; 40];
    dev.read_config(0, &mut b);
    assert_eq!(&b[..13], b"locald-share0");
    assert!(b[13..36].iter().all(|&x| x == 0));
    assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 1);
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    let _ = read_all;
}

#[test]
fn queue_serves_init_and_lookup() {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    let (_t, share) = setup("queue");
    let dev = Fs::new("t", fs(&share, false));
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    let vq = MockSplitQueue::new(&m, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let hdr = |len: u32, op: u32, unique: u64, node: u64| {
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&op.to_le_bytes());
        v.extend_from_slice(&unique.to_le_bytes());
        v.extend_from_slice(&node.to_le_bytes());
        v.extend_from_slice(&[0u8; 16]);
        v
    };
    let mut init = hdr(56, 26, 1, 0);
    // Flags: BIG_WRITES (1 << 5) | MAX_PAGES (1 << 22), as Linux offers.
    for x in [7u32, 31, 0x2_0000, (1 << 5) | (1 << 22)] {
        init.extend_from_slice(&x.to_le_bytes());
    }
    let mut lookup = hdr(40 + 5, 1, 2, 1);
    lookup.extend_from_slice(b"file\0");
    let mut bad = hdr(40, 9999, 3, 1);
    bad.truncate(20); // shorter than a header
    let mut addr = 0x10_0000u64;
    let mut d = Vec::new();
    for msg in [&init, &lookup, &bad] {
        m.write_slice(msg, GuestAddress(addr)).unwrap();
        let next = d.len() as u16 + 1;
        d.push(RawDescriptor::from(SplitDescriptor::new(
            addr,
            msg.len() as u32,
            VRING_DESC_F_NEXT as u16,
            next,
        )));
        d.push(RawDescriptor::from(SplitDescriptor::new(
            addr + 0x1000,
            0x1000,
            VRING_DESC_F_WRITE as u16,
            0,
        )));
        addr += 0x2000;
    }
    vq.build_multiple_desc_chains(&d).unwrap();
    let mut w = Warned::default();
    let pass = process_queue(&mut q, &m, &dev.server, &mut w);
    eprintln!("{w:?}");
    assert_eq!(pass.completed, 3);
    assert!(!pass.broken);
    let used = |i: usize| vq.used().ring().ref_at(i).unwrap().load().len();
    assert!(used(0) >= 16, "init reply");
    assert!(used(1) >= 16, "lookup reply");
    assert_eq!(used(2), 0, "undecodable request gets no reply");
    // The INIT reply allows 1 MiB requests: max_write and max_pages.
    let max_write: u32 = m.read_obj(GuestAddress(0x10_1000 + 16 + 20)).unwrap();
    let max_pages: u16 = m.read_obj(GuestAddress(0x10_1000 + 16 + 28)).unwrap();
    assert_eq!((max_write, max_pages), (1 << 20, 256));
    // The lookup reply: out header error 0, then an entry with the file's ino.
    let err: i32 = m.read_obj(GuestAddress(0x10_2000 + 0x1000 + 4)).unwrap();
    assert_eq!(err, 0);
    let ino: u64 = m
        .read_obj(GuestAddress(0x10_2000 + 0x1000 + 16 + 40))
        .unwrap();
    assert_eq!(ino, std::fs::metadata(share.join("file")).unwrap().ino());
}

#[test]
fn readdir_reports_host_inode_numbers_without_lookups() {
    let (_t, share) = setup("readdir");
    for i in 0..50 {
        std::fs::write(share.join(format!("e{i}")), b"x").unwrap();
    }
    let fs = fs(&share, false);
    let ctx = Context::new();
    let (h, _) = fs.opendir(&ctx, ROOT_INODE, 0).unwrap();
    let h = h.unwrap();
    let mut seen = Vec::new();
    fs.readdir(&ctx, ROOT_INODE, h, 64 * 1024, 0, &mut |d| {
        seen.push((String::from_utf8_lossy(d.name).into_owned(), d.ino));
        Ok(1)
    })
    .unwrap();
    fs.releasedir(&ctx, ROOT_INODE, 0, h).unwrap();
    // Every name, with the inode number the guest's stat will show.
    let mut names: Vec<_> = std::fs::read_dir(&share)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut got: Vec<_> = seen.iter().map(|(n, _)| n.clone()).collect();
    got.sort();
    assert_eq!(got, names);
    for (name, ino) in &seen {
        let host = std::fs::symlink_metadata(share.join(name)).unwrap().ino();
        assert_eq!(*ino, host, "{name}");
    }
    // A plain listing takes no inode references.
    assert_eq!(fs.inode_count(), 1);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The host's value of xattr `name` on `path` (None: absent).
fn host_xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    let p = c(path.to_str().unwrap());
    let n = c(name);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid NUL-terminated strings; `buf` is writable for its length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn host_setxattr(path: &std::path::Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = c(path.to_str().unwrap());
    let n = c(name);
    // SAFETY: valid NUL-terminated strings; `value` is readable for its length.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A `security.capability` value (VFS_CAP_REVISION_2) granting CAP_SETUID.
fn cap_setuid_xattr() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2, effective
    v.extend_from_slice(&(1u32 << 7).to_le_bytes()); // permitted[0]: CAP_SETUID
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[0]
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted[1]
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable[1]
    v
}

#[test]
fn xattrs_only_user_namespace_is_writable() {
    in_both_inode_modes(xattrs_only_user_namespace_is_writable_body);
}

fn xattrs_only_user_namespace_is_writable_body() {
    let (_t, share) = setup("xattr");
    let fs = fs(&share, false);
    let ctx = Context::new(); // guest root
    let f = fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap();
    let host = share.join("file");
    // Guest root cannot plant file capabilities, trusted.* or ACLs.
    assert_eq!(
        errno(fs.setxattr(
            &ctx,
            f.inode,
            &c("security.capability"),
            &cap_setuid_xattr(),
            0
        )),
        libc::EPERM
    );
    assert_eq!(host_xattr(&host, "security.capability"), None);
    assert_eq!(
        errno(fs.setxattr(&ctx, f.inode, &c("security.selinux"), b"x\0", 0)),
        libc::EPERM
    );
    assert_eq!(
        errno(fs.setxattr(&ctx, f.inode, &c("trusted.overlay.opaque"), b"y", 0)),
        libc::EPERM
    );
    assert_eq!(host_xattr(&host, "trusted.overlay.opaque"), None);
    // A minimal valid ACL (version 2, no entries) is still refused.
    assert_eq!(
        errno(fs.setxattr(
            &ctx,
            f.inode,
            &c("system.posix_acl_access"),
            &2u32.to_le_bytes(),
            0
        )),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno(fs.setxattr(&ctx, f.inode, &c("bogus.x"), b"1", 0)),
        libc::EOPNOTSUPP
    );
    // user.* works both ways.
    fs.setxattr(&ctx, f.inode, &c("user.k"), b"v1", 0).unwrap();
    assert_eq!(host_xattr(&host, "user.k").as_deref(), Some(&b"v1"[..]));
    match fs.getxattr(&ctx, f.inode, &c("user.k"), 64).unwrap() {
        fuse_backend_rs::api::filesystem::GetxattrReply::Value(v) => assert_eq!(v, b"v1"),
        _ => panic!("value expected"),
    }
    // A host-set trusted.* (root only) is neither listed nor readable.
    if is_root() {
        host_setxattr(&host, "trusted.t", b"hidden").unwrap();
        assert_eq!(
            errno(fs.getxattr(&ctx, f.inode, &c("trusted.t"), 64)),
            libc::ENODATA
        );
        match fs.listxattr(&ctx, f.inode, 4096).unwrap() {
            fuse_backend_rs::api::filesystem::ListxattrReply::Names(v) => {
                assert_eq!(v, b"user.k\0", "listed: {:?}", String::from_utf8_lossy(&v))
            }
            _ => panic!("names expected"),
        }
        // A host file's capabilities may be removed (lowers privilege).
        host_setxattr(&host, "security.capability", &cap_setuid_xattr()).unwrap();
        fs.removexattr(&ctx, f.inode, &c("security.capability"))
            .unwrap();
        assert_eq!(host_xattr(&host, "security.capability"), None);
        assert_eq!(
            errno(fs.removexattr(&ctx, f.inode, &c("trusted.t"))),
            libc::EPERM
        );
        assert!(host_xattr(&host, "trusted.t").is_some());
        // A guest user is checked by the host as itself: no user.* on a
        // root-owned 0644 file (fuse-backend-rs patch 0007). (Explicit
        // mode: the server clears the process umask.)
        std::fs::set_permissions(&host, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let user = Context {
            uid: 1000,
            gid: 1000,
            pid: 1,
        };
        assert_eq!(
            errno(fs.setxattr(&user, f.inode, &c("user.k"), b"v2", 0)),
            libc::EACCES
        );
        assert_eq!(host_xattr(&host, "user.k").as_deref(), Some(&b"v1"[..]));
    }
    fs.removexattr(&ctx, f.inode, &c("user.k")).unwrap();
    assert_eq!(host_xattr(&host, "user.k"), None);
}

#[test]
fn setid_policy_uses_the_host_inode_type() {
    in_both_inode_modes(setid_policy_uses_the_host_inode_type_body);
}

fn setid_policy_uses_the_host_inode_type_body() {
    use fuse_backend_rs::abi::fuse_abi::SetattrValid;
    let (_t, share) = setup("setid-type");
    let fs = fs(&share, false);
    let ctx = Context::new();
    let mode = |p: &str| std::fs::metadata(share.join(p)).unwrap().mode();
    // CREATE whose mode claims a directory: still a regular file, no setgid.
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFDIR | 0o2755,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, _, _) = fs.create(&ctx, ROOT_INODE, &c("liar"), args).unwrap();
    fs.release(&ctx, e.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    assert_eq!(mode("liar") & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(mode("liar") & 0o7777, 0o755);
    // SETATTR of a regular file with a directory's type bits.
    let mut a = e.attr;
    a.st_mode = libc::S_IFDIR | 0o2755;
    fs.setattr(&ctx, e.inode, a, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(mode("liar") & 0o7777, 0o755);
    // The same on the existing file, through an open handle.
    let f = fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap();
    let (h, _, _) = fs.open(&ctx, f.inode, libc::O_RDWR as u32, 0).unwrap();
    let mut a = f.attr;
    a.st_mode = libc::S_IFDIR | 0o2755;
    fs.setattr(&ctx, f.inode, a, h, SetattrValid::MODE).unwrap();
    fs.release(&ctx, f.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    assert_eq!(mode("file") & 0o7777, 0o755);
    // A real directory keeps setgid (new entries inherit its group), and a
    // regular-file type in the request does not take it away.
    let d = fs.lookup(&ctx, ROOT_INODE, &c("dir")).unwrap();
    let mut a = d.attr;
    a.st_mode = libc::S_IFREG | 0o2755;
    fs.setattr(&ctx, d.inode, a, None, SetattrValid::MODE)
        .unwrap();
    assert_eq!(mode("dir") & 0o7777, 0o2755);
    // mknod never keeps set-id bits, whatever the type says.
    fs.mknod(&ctx, ROOT_INODE, &c("p"), libc::S_IFIFO | 0o6755, 0, 0)
        .unwrap();
    assert_eq!(mode("p") & 0o7777, 0o755);
}

#[test]
fn share_root_is_the_fd_opened_at_start() {
    in_both_inode_modes(share_root_is_the_fd_opened_at_start_body);
}

/// Nested shares: the guest of the outer share swaps a directory on the
/// inner share's path for a symlink, then restarts the inner share's
/// session (what a remount or device reset does).
fn share_root_is_the_fd_opened_at_start_body() {
    let (_t, share) = setup("rootfd");
    let base = share.parent().unwrap().to_path_buf();
    let outer = base.join("outer");
    std::fs::create_dir_all(outer.join("inner")).unwrap();
    std::fs::write(outer.join("inner/mine"), b"mine").unwrap();
    std::fs::create_dir_all(base.join("evil/inner")).unwrap();
    std::fs::write(base.join("evil/inner/secret"), b"secret").unwrap();
    let fs = fs(&outer.join("inner"), false);
    let ctx = Context::new();
    std::fs::rename(&outer, base.join("outer.old")).unwrap();
    std::os::unix::fs::symlink(base.join("evil"), &outer).unwrap();
    for round in 0..3 {
        fs.destroy();
        fs.init(fuse_backend_rs::abi::fuse_abi::FsOptions::empty())
            .unwrap();
        assert_eq!(
            errno(fs.lookup(&ctx, ROOT_INODE, &c("secret"))),
            libc::ENOENT,
            "round {round}: served the swapped-in directory"
        );
        let e = fs.lookup(&ctx, ROOT_INODE, &c("mine")).unwrap();
        assert_eq!(
            e.attr.st_ino,
            std::fs::metadata(base.join("outer.old/inner/mine"))
                .unwrap()
                .ino()
        );
    }
}

#[test]
fn open_flags_are_allow_listed() {
    in_both_inode_modes(open_flags_are_allow_listed_body);
}

fn open_flags_are_allow_listed_body() {
    let (_t, share) = setup("oflags");
    let fs = fs(&share, false);
    let ctx = Context::new();
    let outside = share.parent().unwrap().join("outside");
    let mk = |flags: i32| CreateIn {
        flags: flags as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    // O_PATH makes the kernel drop O_CREAT|O_EXCL and follow `abs` out of
    // the share: refused, for an existing link and for a new name.
    for name in ["abs", "up", "nonexistent"] {
        for extra in [0, libc::O_CREAT | libc::O_EXCL] {
            assert_eq!(
                errno(fs.create(&ctx, ROOT_INODE, &c(name), mk(libc::O_PATH | extra))),
                libc::EINVAL,
                "create({name}, O_PATH|{extra:#x})"
            );
        }
    }
    assert_eq!(
        errno(fs.create(
            &ctx,
            ROOT_INODE,
            &c("t"),
            mk(libc::O_TMPFILE | libc::O_RDWR)
        )),
        libc::EINVAL
    );
    // Without O_PATH a symlink is never followed either.
    assert!(fs
        .create(
            &ctx,
            ROOT_INODE,
            &c("abs"),
            mk(libc::O_RDWR | libc::O_TRUNC)
        )
        .is_err());
    assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
    assert!(!share.join("nonexistent").exists());
    assert_eq!(fs.handle_count(), 0);
    // OPEN: O_PATH refused; unknown bits (e.g. the guest's __FMODE_EXEC,
    // 0x20) are cleared instead of reaching the host.
    let f = fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap();
    assert_eq!(
        errno(fs.open(&ctx, f.inode, libc::O_PATH as u32, 0)),
        libc::EINVAL
    );
    let (h, _, _) = fs
        .open(&ctx, f.inode, (libc::O_RDONLY | 0x20) as u32, 0)
        .unwrap();
    fs.release(&ctx, f.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    assert_eq!(fs.handle_count(), 0);
}

/// Runs `test` (a test of this binary) alone in a child process with its
/// address space limited to what it has now plus 1 GiB: a 4 GiB allocation
/// there aborts the child.
fn in_memory_limited_child(test: &str) -> Option<std::process::ExitStatus> {
    if std::env::var_os("LOCALD_FS_MEMLIMIT_CHILD").is_some() {
        return None;
    }
    let st = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("LOCALD_FS_MEMLIMIT_CHILD", "1")
        .status()
        .unwrap();
    Some(st)
}

fn limit_address_space() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let lim = libc::rlimit {
        rlim_cur: vm_kib * 1024 + (1 << 30),
        rlim_max: vm_kib * 1024 + (1 << 30),
    };
    // SAFETY: setrlimit reads only the rlimit we pass.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
}

#[test]
fn guest_sized_buffers_are_capped() {
    let name = "devices::virtio::fs::tests::guest_sized_buffers_are_capped";
    if let Some(st) = in_memory_limited_child(name) {
        assert!(st.success(), "child under a memory limit: {st}");
        return;
    }
    limit_address_space();
    let (_t, share) = setup("caps-size");
    let fs = fs(&share, false);
    let ctx = Context::new();
    let f = fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap();
    fs.setxattr(&ctx, f.inode, &c("user.a"), b"1234", 0)
        .unwrap();
    match fs.getxattr(&ctx, f.inode, &c("user.a"), u32::MAX).unwrap() {
        fuse_backend_rs::api::filesystem::GetxattrReply::Value(v) => assert_eq!(v, b"1234"),
        _ => panic!("value expected"),
    }
    match fs.listxattr(&ctx, f.inode, u32::MAX).unwrap() {
        fuse_backend_rs::api::filesystem::ListxattrReply::Names(v) => {
            assert!(v.windows(7).any(|w| w == b"user.a\0"))
        }
        _ => panic!("names expected"),
    }
    let (h, _) = fs.opendir(&ctx, ROOT_INODE, 0).unwrap();
    let mut n = 0;
    fs.readdir(&ctx, ROOT_INODE, h.unwrap(), u32::MAX, 0, &mut |_| {
        n += 1;
        Ok(1)
    })
    .unwrap();
    // file, dir, up, abs, fd (the server leaves out `.` and `..`).
    assert_eq!(n, 5, "{n} entries");
    let mut n = 0;
    fs.readdirplus(&ctx, ROOT_INODE, h.unwrap(), u32::MAX, 0, &mut |_, _| {
        n += 1;
        Ok(1)
    })
    .unwrap();
    assert_eq!(n, 5, "{n} entries");
    fs.releasedir(&ctx, ROOT_INODE, 0, h.unwrap()).unwrap();
}

#[test]
fn guest_user_creates_every_kind_in_both_inode_modes() {
    if !is_root() {
        skip(Why::NotRoot("serving a guest uid"));
        return;
    }
    in_both_inode_modes(guest_user_creates_every_kind_body);
}

/// A non-root guest user (uid 1000) in a world-writable directory:
/// mkdir, symlink, create (new and existing), mknod, link, rename all
/// work, owned by that user (fuse-backend-rs patch 0005: in file-handle
/// mode mkdir and symlink used to fail with EPERM).
fn guest_user_creates_every_kind_body() {
    let (_t, share) = setup("guest-user");
    std::fs::create_dir(share.join("pub")).unwrap();
    std::fs::set_permissions(
        share.join("pub"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let fs = fs(&share, false);
    let root = Context::new();
    let u = Context {
        uid: 1000,
        gid: 1000,
        pid: 1,
    };
    let d = fs.lookup(&root, ROOT_INODE, &c("pub")).unwrap().inode;
    fs.mkdir(&u, d, &c("sub"), 0o755, 0).unwrap();
    fs.symlink(&u, &c("target"), d, &c("ln")).unwrap();
    fs.mknod(&u, d, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0)
        .unwrap();
    let args = |flags: i32| CreateIn {
        flags: flags as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, _, _) = fs
        .create(&u, d, &c("f"), args(libc::O_RDWR | libc::O_CREAT))
        .unwrap();
    fs.release(&u, e.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    // CREATE of a name that exists (no O_EXCL) opens it as the user.
    let (e2, h2, _, _) = fs
        .create(&u, d, &c("f"), args(libc::O_RDWR | libc::O_CREAT))
        .unwrap();
    assert_eq!(e2.attr.st_ino, e.attr.st_ino);
    fs.release(&u, e2.inode, 0, h2.unwrap(), false, false, None)
        .unwrap();
    // ... and is refused where the host refuses that user.
    std::fs::write(share.join("pub/rootonly"), b"r").unwrap();
    std::fs::set_permissions(
        share.join("pub/rootonly"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert_eq!(
        errno(fs.create(&u, d, &c("rootonly"), args(libc::O_RDWR | libc::O_CREAT))),
        libc::EACCES
    );
    fs.link(&u, e.inode, d, &c("f2")).unwrap();
    fs.rename(&u, d, &c("f2"), d, &c("f3"), 0).unwrap();
    for name in ["sub", "ln", "fifo", "f", "f3"] {
        let m = std::fs::symlink_metadata(share.join("pub").join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000), "{name}");
    }
}

#[test]
fn rename_then_link_without_dac_read_search() {
    // fd inode mode only: file handles need CAP_DAC_READ_SEARCH anyway.
    let (_t, share) = setup("link-nocap");
    let fs = fs(&share, false);
    std::thread::spawn(move || {
        let ctx = Context::new();
        let mut fails = Vec::new();
        let dir = fs.lookup(&ctx, ROOT_INODE, &c("dir")).unwrap().inode;
        let f = fs.lookup(&ctx, ROOT_INODE, &c("file")).unwrap().inode;
        // From here on this thread has another credentials object and no
        // CAP_DAC_READ_SEARCH (what a non-root VMM, or one in a container
        // without it, has).
        super::caps::drop_effective_for_test(super::caps::cap::DAC_READ_SEARCH).unwrap();
        for i in 0..300 {
            fs.rename(&ctx, ROOT_INODE, &c("file"), dir, &c("moved"), 0)
                .unwrap();
            if let Err(e) = fs.link(&ctx, f, ROOT_INODE, &c("hard")) {
                fails.push((i, e.raw_os_error()));
            } else {
                fs.unlink(&ctx, ROOT_INODE, &c("hard")).unwrap();
            }
            fs.rename(&ctx, dir, &c("moved"), ROOT_INODE, &c("file"), 0)
                .unwrap();
        }
        assert!(
            fails.is_empty(),
            "{} of 300 links failed: {:?}",
            fails.len(),
            &fails[..fails.len().min(5)]
        );
    })
    .join()
    .unwrap();
    assert_eq!(std::fs::read(share.join("file")).unwrap(), b"inside");
}

/// A mounted share holds inode numbers in the guest's kernel: its device
/// refuses to be saved in a snapshot until the guest unmounts it (or the
/// device is reset).
#[test]
fn a_mounted_share_blocks_a_snapshot() {
    use crate::devices::virtio::VirtioDevice;
    let dir = std::env::temp_dir().join(format!("locald-fs-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let share = Arc::new(ShareFs::new(ShareFsOptions::new(&dir, false, ShareCache::Auto)).unwrap());
    assert!(!share.in_session());
    let dev = Fs::new(
        "share0",
        ShareFs::new(ShareFsOptions::new(&dir, false, ShareCache::Auto)).unwrap(),
    );
    assert_eq!(dev.snapshot_blocker(), None);
    share
        .init(fuse_backend_rs::abi::fuse_abi::FsOptions::empty())
        .unwrap();
    assert!(share.in_session());
    share.destroy();
    assert!(!share.in_session());
    std::fs::remove_dir_all(&dir).unwrap();
}
