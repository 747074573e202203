//! Switching from the initramfs to a root filesystem on a disk
//! (`/.locald/root`), the classic `switch_root` sequence.
//!
//! Runs on PID 1's only thread, after [`crate::mounts::mount_all`] and after
//! the whole command spec has been read into memory (the initramfs, and
//! `/.locald/` with it, is out of reach afterwards). Steps:
//!
//! 1. mount `DEVICE` on [`NEW_ROOT`] (`MS_RDONLY` for mode `ro`), retrying
//!    for up to [`DEVICE_WAIT`] while the device node is missing
//!    (`ENOENT`/`ENXIO`: the virtio-blk driver is built in and has normally
//!    probed already, but nothing waits for it). With `+overlay` (an OCI
//!    image: a cached base disk shared by every VM, attached read-only)
//!    the disk goes to [`OVERLAY_LOWER`] instead, a tmpfs to
//!    [`OVERLAY_RW`] (upper and work directories; the upper root gets the
//!    lower root's mode and owner), and `overlay` on [`NEW_ROOT`]: every
//!    write of the VM lands in its own tmpfs and vanishes with it. Needs
//!    `CONFIG_OVERLAY_FS` (`ENODEV` otherwise, reported with a hint) and,
//!    for opaque directories, `CONFIG_TMPFS_XATTR`. The lower mount and
//!    the tmpfs stay under the old root, unreachable, like the initramfs;
//! 2. `MS_MOVE` each top-level pseudo filesystem of
//!    [`crate::mounts::MOUNTS`] (`/proc`, `/sys`, `/dev`, `/tmp`, `/run`)
//!    under the new root, creating missing mount points when the filesystem
//!    is writable; mounts below them (`/dev/pts`) move along with their
//!    parent. Best effort, like `mount_all`: a failure is printed and the
//!    switch goes on;
//! 3. `chdir(NEW_ROOT)`, `mount(".", "/", MS_MOVE)`, `chroot(".")`,
//!    `chdir("/")`.
//!
//! The initramfs contents are **not** freed: they are a few MiB of page
//! cache, while deleting the several hundred busybox links one `unlink` at a
//! time would cost emulated kernel time on every boot. They stay, unreachable,
//! under the new root until the VM ends.

use std::ffi::{CStr, CString};
use std::io;
use std::time::{Duration, Instant};

use crate::console;
use crate::mounts::{Mount, MOUNTS};
use crate::spec::RootSpec;

/// Where the root filesystem is mounted before it becomes `/`.
pub const NEW_ROOT: &CStr = c"/newroot";
/// Overlay mode: the parent of the directories below (in the initramfs).
pub const OVERLAY_DIR: &CStr = c"/.overlay";
/// Overlay mode: where the disk is mounted (the lower layer).
pub const OVERLAY_LOWER: &CStr = c"/.overlay/lower";
/// Overlay mode: the tmpfs holding the upper and work directories.
pub const OVERLAY_RW: &CStr = c"/.overlay/rw";
/// Overlay mode: the upper layer (the VM's writes).
pub const OVERLAY_UPPER: &CStr = c"/.overlay/rw/upper";
/// Overlay mode: overlayfs' work directory (same filesystem as the upper).
pub const OVERLAY_WORK: &CStr = c"/.overlay/rw/work";
/// How long to wait for a missing root device node.
pub const DEVICE_WAIT: Duration = Duration::from_secs(2);
/// Pause between mount attempts while waiting for the device.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// A failed switch: what was being done (naming the device) and the error.
pub type SwitchError = (String, io::Error);

fn errno_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Targets of `mounts` that are not below another target of `mounts`, in
/// order: moving those moves everything (`/dev/pts` travels with `/dev`).
pub fn top_level_targets(mounts: &[Mount]) -> Vec<&'static CStr> {
    let under = |inner: &[u8], outer: &[u8]| {
        inner.len() > outer.len() && inner.starts_with(outer) && inner[outer.len()] == b'/'
    };
    mounts
        .iter()
        .map(|m| m.target)
        .filter(|t| {
            !mounts
                .iter()
                .any(|o| under(t.to_bytes(), o.target.to_bytes()))
        })
        .collect()
}

/// `prefix` + `path` as a C string (`path` is absolute).
fn join(prefix: &CStr, path: &CStr) -> CString {
    let mut v = prefix.to_bytes().to_vec();
    v.extend_from_slice(path.to_bytes());
    // Both parts come from C strings, so there is no interior NUL.
    CString::new(v).unwrap_or_default()
}

/// True for the errors a not-yet-present device node gives.
pub fn device_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO))
}

/// `mkdir`, treating "already there" and "read-only filesystem" as success
/// (on a read-only root a missing mount point then shows up as a failed move).
fn mkdir_quiet(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string.
    match errno_result(unsafe { libc::mkdir(path.as_ptr(), 0o755) }) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::EROFS)) => Ok(()),
        other => other,
    }
}

/// The `overlay` mount options for the given directories.
pub fn overlay_options(lower: &CStr, upper: &CStr, work: &CStr) -> CString {
    let mut v = b"lowerdir=".to_vec();
    v.extend_from_slice(lower.to_bytes());
    v.extend_from_slice(b",upperdir=");
    v.extend_from_slice(upper.to_bytes());
    v.extend_from_slice(b",workdir=");
    v.extend_from_slice(work.to_bytes());
    // All parts are C strings: no interior NUL.
    CString::new(v).unwrap_or_default()
}

/// A hint for a failed mount of `fstype`: `ENODEV` means the kernel lacks it.
pub fn mount_hint(fstype: &str, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENODEV) {
        format!(" (the kernel has no {fstype} support: CONFIG_OVERLAY_FS)")
    } else {
        String::new()
    }
}

/// `mount(source, target, fstype, flags, data)`.
fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    // SAFETY: all strings are valid and NUL-terminated; data is a C string
    // or null.
    errno_result(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
}

/// Overlay mode: the disk is already on [`OVERLAY_LOWER`]; mounts the
/// tmpfs, makes upper and work, and mounts the overlay on [`NEW_ROOT`].
fn mount_overlay() -> Result<(), (String, io::Error)> {
    let fail = |what: &str, e: io::Error| (what.to_string(), e);
    mount(c"tmpfs", OVERLAY_RW, c"tmpfs", 0, Some(c"mode=0755"))
        .map_err(|e| fail("mounting tmpfs on /.overlay/rw", e))?;
    for d in [OVERLAY_UPPER, OVERLAY_WORK] {
        mkdir_quiet(d).map_err(|e| (format!("mkdir {}", d.to_string_lossy()), e))?;
    }
    // The merged root shows the upper root's attributes: copy the image's.
    // SAFETY: stat is plain data, filled by a successful stat(2).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    errno_result(unsafe { libc::stat(OVERLAY_LOWER.as_ptr(), &mut st) })
        .map_err(|e| fail("stat /.overlay/lower", e))?;
    // SAFETY: valid path; chown/chmod change only the new directory.
    errno_result(unsafe { libc::chown(OVERLAY_UPPER.as_ptr(), st.st_uid, st.st_gid) })
        .map_err(|e| fail("chown /.overlay/rw/upper", e))?;
    // SAFETY: as above.
    errno_result(unsafe { libc::chmod(OVERLAY_UPPER.as_ptr(), st.st_mode & 0o7777) })
        .map_err(|e| fail("chmod /.overlay/rw/upper", e))?;
    let opts = overlay_options(OVERLAY_LOWER, OVERLAY_UPPER, OVERLAY_WORK);
    mount(c"overlay", NEW_ROOT, c"overlay", 0, Some(&opts)).map_err(|e| {
        let hint = mount_hint("overlay", &e);
        (format!("mounting overlay on /newroot{hint}"), e)
    })
}

/// Mounts the root device on `target`, waiting up to [`DEVICE_WAIT`] for
/// the device node to appear.
fn mount_root(root: &RootSpec, target: &CStr) -> io::Result<()> {
    // The decoder split on NUL: these cannot fail.
    let c = |b: &[u8]| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (device, fstype) = (c(&root.device)?, c(&root.fstype)?);
    let flags = if root.read_only { libc::MS_RDONLY } else { 0 };
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        // SAFETY: all strings are valid and NUL-terminated; no data options.
        let rc = unsafe {
            libc::mount(
                device.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        match errno_result(rc) {
            Err(e) if device_missing(&e) && Instant::now() < deadline => {
                std::thread::sleep(RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// Moves one of init's mounts from `target` to the same path under
/// [`NEW_ROOT`]. `EINVAL` means `target` is not a mount point: its mount
/// already failed in `mount_all`, which printed why, so it is skipped quietly.
fn move_mount(target: &CStr) {
    let dest = join(NEW_ROOT, target);
    let res = mkdir_quiet(&dest).and_then(|()| {
        // SAFETY: both paths are valid NUL-terminated strings; MS_MOVE ignores
        // the fstype and data arguments.
        errno_result(unsafe {
            libc::mount(
                target.as_ptr(),
                dest.as_ptr(),
                std::ptr::null(),
                libc::MS_MOVE,
                std::ptr::null(),
            )
        })
    });
    match res {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => console::error(
            format_args!(
                "moving {} to {}",
                target.to_string_lossy(),
                dest.to_string_lossy()
            ),
            e,
        ),
    }
}

/// Makes `root` the root filesystem (see the module documentation). On
/// failure nothing is undone: the caller reports exit code 125 and powers
/// off, and the shutdown sequence unmounts whatever was mounted.
pub fn switch_root(root: &RootSpec) -> Result<(), SwitchError> {
    let device = String::from_utf8_lossy(&root.device);
    let fail = |what: &str, e: io::Error| (format!("switching root to {device}: {what}"), e);
    mkdir_quiet(NEW_ROOT).map_err(|e| fail("mkdir /newroot", e))?;
    let target = if root.overlay {
        for d in [OVERLAY_DIR, OVERLAY_LOWER, OVERLAY_RW] {
            mkdir_quiet(d).map_err(|e| fail(&format!("mkdir {}", d.to_string_lossy()), e))?;
        }
        OVERLAY_LOWER
    } else {
        NEW_ROOT
    };
    mount_root(root, target).map_err(|e| {
        let fstype = String::from_utf8_lossy(&root.fstype);
        (
            format!(
                "mounting root {device} ({fstype}) on {}",
                target.to_string_lossy()
            ),
            e,
        )
    })?;
    if root.overlay {
        mount_overlay().map_err(|(what, e)| (format!("switching root to {device}: {what}"), e))?;
    }
    for target in top_level_targets(MOUNTS) {
        move_mount(target);
    }
    // SAFETY: valid NUL-terminated path; chdir only changes this process' cwd.
    errno_result(unsafe { libc::chdir(NEW_ROOT.as_ptr()) })
        .map_err(|e| fail("chdir /newroot", e))?;
    // SAFETY: valid NUL-terminated paths; MS_MOVE ignores the fstype and
    // data arguments.
    errno_result(unsafe {
        libc::mount(
            c".".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })
    .map_err(|e| fail("moving /newroot to /", e))?;
    // SAFETY: valid NUL-terminated path; chroot only changes this process'
    // root directory.
    errno_result(unsafe { libc::chroot(c".".as_ptr()) }).map_err(|e| fail("chroot", e))?;
    // SAFETY: valid NUL-terminated path; chdir only changes this process' cwd.
    errno_result(unsafe { libc::chdir(c"/".as_ptr()) }).map_err(|e| fail("chdir /", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_top_level_mounts_only() {
        assert_eq!(
            top_level_targets(MOUNTS),
            [c"/proc", c"/sys", c"/dev", c"/tmp", c"/run"]
        );
    }

    #[test]
    fn nesting_is_by_path_component() {
        let m = |target| Mount {
            fstype: c"tmpfs",
            target,
            flags: 0,
            data: None,
        };
        let mounts = [m(c"/dev/pts"), m(c"/devx"), m(c"/dev"), m(c"/dev/shm/a")];
        assert_eq!(top_level_targets(&mounts), [c"/devx", c"/dev"]);
    }

    #[test]
    fn overlay_mount_options() {
        assert_eq!(
            overlay_options(OVERLAY_LOWER, OVERLAY_UPPER, OVERLAY_WORK).as_bytes(),
            b"lowerdir=/.overlay/lower,upperdir=/.overlay/rw/upper,workdir=/.overlay/rw/work"
        );
        // Upper and work on the same filesystem (the tmpfs), as overlayfs
        // requires; none of them under the new root.
        for d in [OVERLAY_UPPER, OVERLAY_WORK] {
            assert!(d.to_bytes().starts_with(OVERLAY_RW.to_bytes()));
        }
        for d in [OVERLAY_LOWER, OVERLAY_RW] {
            assert!(!d.to_bytes().starts_with(NEW_ROOT.to_bytes()));
        }
        let e = io::Error::from_raw_os_error(libc::ENODEV);
        assert!(mount_hint("overlay", &e).contains("CONFIG_OVERLAY_FS"));
        assert_eq!(
            mount_hint("overlay", &io::Error::from_raw_os_error(libc::EINVAL)),
            ""
        );
    }

    /// Set in the child process of [`overlay_on_the_host`].
    const CHILD_ENV: &str = "LOCALD_INIT_OVERLAY_CHILD";

    /// [`mount_overlay`] for real on the host kernel: root, `unshare -m`
    /// and overlayfs needed. The work happens in [`overlay_child`], run
    /// by this test in a private mount namespace, chrooted into a tmpfs
    /// (so the fixed `/.overlay/…` paths are not the host's).
    #[test]
    fn overlay_on_the_host() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::test_support::skip(crate::test_support::Why::NotRoot("mount"));
            return;
        }
        let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !fs
            .lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
        {
            crate::test_support::skip(crate::test_support::Why::HostLacks("overlayfs"));
            return;
        }
        let dir = std::env::temp_dir().join(format!("locald-init-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "rootfs::tests::overlay_child",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &dir)
            .output()
            .expect("unshare (util-linux)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }

    /// The child of [`overlay_on_the_host`] (a no-op on its own).
    #[test]
    fn overlay_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let c = |p: &std::ffi::OsStr| CString::new(p.as_encoded_bytes()).unwrap();
        let dir = c(&dir);
        mount(c"tmpfs", &dir, c"tmpfs", 0, None).unwrap();
        // SAFETY: valid paths; this process runs in its own mount namespace.
        unsafe {
            assert_eq!(libc::chroot(dir.as_ptr()), 0);
            assert_eq!(libc::chdir(c"/".as_ptr()), 0);
        }
        for d in [NEW_ROOT, OVERLAY_DIR, OVERLAY_LOWER, OVERLAY_RW] {
            mkdir_quiet(d).unwrap();
        }
        // The "disk": a tmpfs with a file, root mode 0751 owned by 5:6.
        mount(
            c"tmpfs",
            OVERLAY_LOWER,
            c"tmpfs",
            0,
            Some(c"mode=0751,uid=5,gid=6"),
        )
        .unwrap();
        std::fs::write("/.overlay/lower/base", b"base").unwrap();
        // Read-only, as the disk of `ro+overlay` is.
        mount(
            c"none",
            OVERLAY_LOWER,
            c"tmpfs",
            libc::MS_REMOUNT | libc::MS_RDONLY,
            None,
        )
        .unwrap();
        mount_overlay().unwrap();
        assert_eq!(std::fs::read("/newroot/base").unwrap(), b"base");
        std::fs::write("/newroot/new", b"new").unwrap();
        std::fs::write("/newroot/base", b"changed").unwrap();
        assert_eq!(std::fs::read("/.overlay/lower/base").unwrap(), b"base");
        assert!(!std::path::Path::new("/.overlay/lower/new").exists());
        assert_eq!(std::fs::read("/.overlay/rw/upper/new").unwrap(), b"new");
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata("/newroot").unwrap();
        assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o751, 5, 6));
    }

    #[test]
    fn paths_under_new_root() {
        assert_eq!(join(NEW_ROOT, c"/dev").as_bytes(), b"/newroot/dev");
    }

    #[test]
    fn retried_errors() {
        let e = io::Error::from_raw_os_error;
        assert!(device_missing(&e(libc::ENOENT)));
        assert!(device_missing(&e(libc::ENXIO)));
        assert!(!device_missing(&e(libc::ENODEV))); // unknown fstype
        assert!(!device_missing(&e(libc::EINVAL))); // bad superblock
        assert!(!device_missing(&e(libc::EACCES))); // read-only device, rw mount
    }
}
