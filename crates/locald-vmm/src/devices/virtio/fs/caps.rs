//! Capabilities of the threads that serve a share. A VMM running as root
//! keeps, on each fs server thread, only what serving a share needs:
//! `CAP_CHOWN`, `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH` (file-handle
//! inodes), `CAP_FOWNER`, `CAP_SETGID` and `CAP_SETUID` (per-request id
//! switches). Everything else — `CAP_SETFCAP`, `CAP_FSETID`,
//! `CAP_SYS_ADMIN`, `CAP_MKNOD`, `CAP_LINUX_IMMUTABLE`, … — leaves the
//! thread's permitted, effective and inheritable sets, so even a filtering
//! bug cannot write file capabilities or `trusted.*` xattrs, make a device
//! node or keep a set-id bit the kernel would clear for an unprivileged
//! writer. Defence in depth on top of the policy in `share.rs`/`xattr.rs`.
//!
//! Capabilities are per thread on Linux (`capset` with pid 0): only the
//! calling thread changes; the rest of the VMM keeps its own.

use std::io;

/// Capability numbers (`linux/capability.h`).
pub mod cap {
    /// Change file ownership.
    pub const CHOWN: u32 = 0;
    /// Bypass file permission checks.
    pub const DAC_OVERRIDE: u32 = 1;
    /// Bypass read/search checks; `open_by_handle_at`.
    pub const DAC_READ_SEARCH: u32 = 2;
    /// Bypass owner checks (chmod, utimes of others' files).
    pub const FOWNER: u32 = 3;
    /// Keep set-id bits the kernel would clear.
    pub const FSETID: u32 = 4;
    /// Switch gids.
    pub const SETGID: u32 = 6;
    /// Switch uids.
    pub const SETUID: u32 = 7;
    /// `mknod` of devices.
    pub const MKNOD: u32 = 27;
    /// Everything administrative, including `trusted.*` xattrs.
    pub const SYS_ADMIN: u32 = 21;
    /// Write `security.capability`.
    pub const SETFCAP: u32 = 31;
}

/// The capabilities an fs server thread keeps.
pub const KEPT: u64 = (1 << cap::CHOWN)
    | (1 << cap::DAC_OVERRIDE)
    | (1 << cap::DAC_READ_SEARCH)
    | (1 << cap::FOWNER)
    | (1 << cap::SETGID)
    | (1 << cap::SETUID);

/// Why the capabilities could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// `capget` failed.
    #[error("capget: {0}")]
    Get(#[source] io::Error),
    /// `capset` failed.
    #[error("capset: {0}")]
    Set(#[source] io::Error),
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops every capability but [`KEPT`] from the calling thread's permitted,
/// effective and inheritable sets (ambient ones go with the permitted).
/// A thread without capabilities is left as it is.
pub fn drop_unneeded() -> Result<(), CapsError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes a version-3 header and two CapData structs,
    // which is what we pass.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(CapsError::Get(io::Error::last_os_error()));
    }
    for (i, d) in data.iter_mut().enumerate() {
        // Truncation intended: each CapData holds 32 of the 64 bits.
        let keep = (KEPT >> (32 * i)) as u32;
        d.effective &= keep;
        d.permitted &= keep;
        d.inheritable &= keep;
    }
    hdr.version = LINUX_CAPABILITY_VERSION_3;
    hdr.pid = 0;
    // SAFETY: capset only reads the header and the two CapData structs.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(CapsError::Set(io::Error::last_os_error()));
    }
    Ok(())
}

/// The calling thread's (effective, permitted) capability sets, from
/// `/proc/thread-self/status`.
pub fn thread_caps() -> io::Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/thread-self/status")?;
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or_else(|| io::Error::other(format!("no {k} in /proc/thread-self/status")))
    };
    Ok((field("CapEff:")?, field("CapPrm:")?))
}

/// [`drop_unneeded`] for a server thread at start: logs a failure (the
/// share's own policy still applies) instead of failing the thread.
pub fn drop_for_server_thread(what: &str) {
    if let Err(e) = drop_unneeded() {
        tracing::warn!("{what}: could not drop capabilities: {e}");
    }
}

/// Clears one capability from the calling thread's effective set (tests:
/// what a VMM without it sees).
#[cfg(test)]
pub fn drop_effective_for_test(c: u32) -> Result<(), CapsError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: as in drop_unneeded.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(CapsError::Get(io::Error::last_os_error()));
    }
    data[(c / 32) as usize].effective &= !(1 << (c % 32));
    // SAFETY: as in drop_unneeded.
    if unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) } != 0 {
        return Err(CapsError::Set(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_all_but_the_kept_set_on_this_thread_only() {
        let before = thread_caps().unwrap();
        let (eff, prm) = std::thread::spawn(|| {
            drop_unneeded().unwrap();
            thread_caps().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(eff & !KEPT, 0, "effective after drop: {eff:#x}");
        assert_eq!(prm & !KEPT, 0, "permitted after drop: {prm:#x}");
        // What was kept is still there.
        assert_eq!(prm, before.1 & KEPT);
        assert_eq!(eff, before.0 & KEPT);
        // Other threads are unchanged.
        assert_eq!(thread_caps().unwrap(), before);
        if before.1 & (1 << cap::SETFCAP) == 0 {
            eprintln!("NOTE: not root: there was nothing to drop");
        }
    }
}
