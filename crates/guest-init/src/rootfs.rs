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
//!    probed already, but nothing waits for it);
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

/// Mounts the root device on [`NEW_ROOT`], waiting up to [`DEVICE_WAIT`] for
/// the device node to appear.
fn mount_root(root: &RootSpec) -> io::Result<()> {
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
                NEW_ROOT.as_ptr(),
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
    mount_root(root).map_err(|e| {
        let fstype = String::from_utf8_lossy(&root.fstype);
        (format!("mounting root {device} ({fstype}) on /newroot"), e)
    })?;
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
