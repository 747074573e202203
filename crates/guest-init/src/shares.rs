//! virtio-fs shares: reads `/.locald/shares` (format and decoder in
//! `locald_guest_spec::shares`, written by
//! `locald_vmm::assets::command_archive`) and mounts each share at its guest
//! path, creating the mount point. Runs on init's only thread: the file is
//! read before the optional root switch (it lives in the initramfs) and the
//! shares are mounted after it, before the agent or command starts.

use std::ffi::CString;
use std::io;
use std::path::Path;

pub use locald_guest_spec::ShareSpec as Share;
use locald_guest_spec::{SharesError, SpecFile};

/// Why the shares could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// Reading the file failed.
    Io(io::Error),
    /// The file is malformed.
    Bad(SharesError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => e.fmt(f),
            Self::Bad(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReadError {}

/// Reads `dir/shares`; a missing file means no shares.
pub fn read(dir: &Path) -> Result<Vec<Share>, ReadError> {
    match locald_guest_spec::read_file(dir, SpecFile::Shares) {
        Ok(Some(d)) => locald_guest_spec::shares::decode(&d).map_err(ReadError::Bad),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(ReadError::Io(e)),
    }
}

/// Mounts one share (virtio-fs), creating its mount point.
pub fn mount(share: &Share) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(&share.path));
    std::fs::create_dir_all(path)?;
    // The decoder split on NUL: these cannot fail.
    let c = |b: &[u8]| CString::new(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (tag, target) = (c(&share.tag)?, c(&share.path)?);
    let mut flags = libc::MS_NODEV;
    if share.read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call; the data argument may be null.
    let rc = unsafe {
        libc::mount(
            tag.as_ptr(),
            target.as_ptr(),
            c"virtiofs".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_from_directory() {
        let dir = std::env::temp_dir().join(format!("locald-init-shares-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(read(&dir).unwrap().is_empty(), "absent: no shares");
        std::fs::write(dir.join("shares"), b"t0\0/mnt/src\0rw\0t1\0/data\0ro\0").unwrap();
        let s = read(&dir).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].tag, b"t0");
        assert_eq!(s[0].path, b"/mnt/src");
        assert!(!s[0].read_only && s[1].read_only);
        std::fs::write(dir.join("shares"), b"t\0rel\0rw\0").unwrap();
        assert_eq!(
            read(&dir).unwrap_err().to_string(),
            "mount point 'rel' is not absolute"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
