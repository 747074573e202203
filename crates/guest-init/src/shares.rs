//! virtio-fs shares: parses `/.locald/shares` (written by
//! `locald_vmm::assets::command_archive`) and mounts each share at its guest
//! path, creating the mount point. Runs on init's only thread, after the
//! optional root switch and before the agent or command starts.
//!
//! Format: for each share, three NUL-terminated fields `TAG\0PATH\0MODE\0`
//! (MODE `rw` or `ro`); PATH is absolute. The file is read before the root
//! switch (it lives in the initramfs) and mounted after it.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// File name under the spec directory.
pub const FILE: &str = "shares";

/// One share to mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// virtio-fs mount tag (the `mount(2)` source).
    pub tag: CString,
    /// Absolute mount point.
    pub path: CString,
    /// Mount read-only.
    pub read_only: bool,
}

/// Parses the spec file's bytes.
pub fn parse(data: &[u8]) -> Result<Vec<Share>, String> {
    let mut fields: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    if fields.last().is_some_and(|f| f.is_empty()) {
        fields.pop();
    }
    if !fields.len().is_multiple_of(3) {
        return Err(format!(
            "expected TAG, PATH, MODE triples, found {} fields",
            fields.len()
        ));
    }
    let mut out = Vec::new();
    for f in fields.chunks(3) {
        let (tag, path, mode) = (f[0], f[1], f[2]);
        if tag.is_empty() {
            return Err("empty tag".into());
        }
        if !path.starts_with(b"/") {
            return Err(format!(
                "mount point '{}' is not absolute",
                String::from_utf8_lossy(path)
            ));
        }
        let read_only = match mode {
            b"ro" => true,
            b"rw" => false,
            m => return Err(format!("bad mode '{}'", String::from_utf8_lossy(m))),
        };
        out.push(Share {
            // No NUL inside: the input was split on NUL.
            tag: CString::new(tag).map_err(|e| e.to_string())?,
            path: CString::new(path).map_err(|e| e.to_string())?,
            read_only,
        });
    }
    Ok(out)
}

/// Reads `dir/shares`; a missing file means no shares.
pub fn read(dir: &Path) -> Result<Vec<Share>, String> {
    match std::fs::read(dir.join(FILE)) {
        Ok(d) => parse(&d),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// Mounts one share (virtio-fs), creating its mount point.
pub fn mount(share: &Share) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = Path::new(std::ffi::OsStr::from_bytes(share.path.to_bytes()));
    std::fs::create_dir_all(path)?;
    let mut flags = libc::MS_NODEV;
    if share.read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call; the data argument may be null.
    let rc = unsafe {
        libc::mount(
            share.tag.as_ptr(),
            share.path.as_ptr(),
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
    fn parses_triples() {
        let s = parse(b"locald-share0\0/mnt/src\0rw\0t1\0/data\0ro\0").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].tag.to_bytes(), b"locald-share0");
        assert_eq!(s[0].path.to_bytes(), b"/mnt/src");
        assert!(!s[0].read_only);
        assert!(s[1].read_only);
        assert_eq!(parse(b"").unwrap(), vec![]);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(parse(b"t\0/x\0").is_err());
        assert!(parse(b"t\0rel\0rw\0").unwrap_err().contains("not absolute"));
        assert!(parse(b"t\0/x\0rx\0").unwrap_err().contains("bad mode"));
        assert!(parse(b"\0/x\0rw\0").is_err());
    }
}
