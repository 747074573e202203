//! Early system setup: pseudo filesystems, hostname and the loopback
//! interface. Runs on init's only thread, before anything is spawned.
//!
//! Everything here is best effort: a failure is printed on the console and
//! boot continues (a kernel built without, say, devpts can still run a
//! command). `EBUSY` (already mounted) is silently ignored.

use std::ffi::CStr;
use std::io;

use crate::console;

/// One mount to perform.
#[derive(Debug, Clone, Copy)]
pub struct Mount {
    /// Filesystem type (also used as the source name).
    pub fstype: &'static CStr,
    /// Mount point.
    pub target: &'static CStr,
    /// `MS_*` flags.
    pub flags: libc::c_ulong,
    /// Filesystem-specific options.
    pub data: Option<&'static CStr>,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Mounts in the order they must happen (`/dev/pts` lives on `/dev`).
pub const MOUNTS: &[Mount] = &[
    Mount {
        fstype: c"proc",
        target: c"/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: c"sysfs",
        target: c"/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: c"devtmpfs",
        target: c"/dev",
        flags: libc::MS_NOSUID,
        data: Some(c"mode=0755"),
    },
    Mount {
        fstype: c"devpts",
        target: c"/dev/pts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: Some(c"gid=5,mode=0620,ptmxmode=0666"),
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/tmp",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(c"mode=1777"),
    },
    Mount {
        fstype: c"tmpfs",
        target: c"/run",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(c"mode=0755"),
    },
];

/// Convenience symlinks created in `/dev` after devtmpfs is mounted.
pub const DEV_LINKS: &[(&CStr, &CStr)] = &[
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
];

/// Guest hostname.
pub const HOSTNAME: &[u8] = b"locald";

fn errno_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mount_one(m: &Mount) -> io::Result<()> {
    let data = m.data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: all pointers are valid NUL-terminated strings (or null data).
    let rc = unsafe {
        libc::mount(
            m.fstype.as_ptr(),
            m.target.as_ptr(),
            m.fstype.as_ptr(),
            m.flags,
            data,
        )
    };
    errno_result(rc)
}

fn mkdir(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string.
    errno_result(unsafe { libc::mkdir(path.as_ptr(), mode) })
}

/// Mounts [`MOUNTS`], creating a missing mount point on demand, then creates
/// [`DEV_LINKS`].
pub fn mount_all() {
    for m in MOUNTS {
        let mut res = mount_one(m);
        if matches!(&res, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
            // Mount point missing (e.g. /dev/pts on a fresh devtmpfs).
            res = mkdir(m.target, 0o755).and_then(|()| mount_one(m));
        }
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => console::error(format_args!("mount {}", m.target.to_string_lossy()), e),
        }
    }
    for (target, link) in DEV_LINKS {
        // SAFETY: both are valid NUL-terminated strings.
        let rc = unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) };
        // EEXIST: devtmpfs or a previous boot stage already made it; any other
        // failure only loses a convenience link, so stay quiet.
        let _ = rc;
    }
}

/// Sets the hostname to [`HOSTNAME`].
pub fn set_hostname() {
    // SAFETY: the pointer/length pair describes a valid byte slice.
    let rc = unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) };
    if let Err(e) = errno_result(rc) {
        console::error("sethostname", e);
    }
}

/// Brings the loopback interface up (the kernel then assigns 127.0.0.1/8).
/// A kernel without IPv4 (`EAFNOSUPPORT`) is not an error.
pub fn loopback_up() {
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAFNOSUPPORT) {
            console::error("socket for lo", e);
        }
        return;
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills
    // ifru_flags, which we then read back (a c_short in every variant).
    let res =
        errno_result(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) }).and_then(|()| {
            // SAFETY: SIOCGIFFLAGS initialised ifru_flags.
            unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
            // SAFETY: `ifr` is a valid ifreq with the new flags.
            errno_result(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) })
        });
    if let Err(e) = res {
        console::error("bringing up lo", e);
    }
    // SAFETY: `fd` is our own open socket.
    unsafe { libc::close(fd) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devpts_after_dev() {
        let pos = |t: &CStr| MOUNTS.iter().position(|m| m.target == t).unwrap();
        assert!(pos(c"/dev") < pos(c"/dev/pts"));
        assert_eq!(MOUNTS.len(), 6);
    }
}
