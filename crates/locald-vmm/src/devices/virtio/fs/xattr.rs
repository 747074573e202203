//! Extended-attribute policy of a share: which names a guest may set, read
//! and list, and the caps on the sizes it may ask for (see
//! `docs/virtio-fs.md`, "Extended attributes").
//!
//! - `user.*`: read, listed, set and removed (with the guest caller's
//!   credentials on the host, fuse-backend-rs patch 0007);
//! - `security.*`: read and listed (a host file's capabilities or labels
//!   are what the guest kernel sees), never set — a guest-written
//!   `security.capability` would give a host user who runs the file those
//!   capabilities. Only `security.capability` may be removed (that only
//!   lowers privilege, and the guest kernel removes it on a write);
//! - `trusted.*`: as for an unprivileged host process: hidden, never set;
//! - `system.*` (POSIX ACLs) and unknown namespaces: not supported. An ACL
//!   names uids and gids the guest chooses, which on the host belong to
//!   whoever has those ids; the server has no id map to translate them.

use std::io;

use fuse_backend_rs::api::filesystem::{GetxattrReply, ListxattrReply};

/// Largest xattr value the kernel stores (`XATTR_SIZE_MAX`): a GETXATTR
/// asking for more gets at most this much buffer.
pub const XATTR_SIZE_MAX: u32 = 65_536;
/// Largest name list the kernel returns (`XATTR_LIST_MAX`).
pub const XATTR_LIST_MAX: u32 = 65_536;

/// What a guest may do with one xattr name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrAccess {
    /// `user.*`: everything.
    ReadWrite,
    /// `security.*`: read and list only.
    ReadOnly,
    /// `trusted.*`: invisible, as to an unprivileged host process.
    Hidden,
    /// `system.*` (POSIX ACLs) and unknown prefixes: not supported.
    Unsupported,
}

/// The access a guest has to xattr `name`.
pub fn classify(name: &[u8]) -> XattrAccess {
    let has = |p: &[u8]| name.len() > p.len() && name.starts_with(p);
    if has(b"user.") {
        XattrAccess::ReadWrite
    } else if has(b"security.") {
        XattrAccess::ReadOnly
    } else if has(b"trusted.") {
        XattrAccess::Hidden
    } else {
        XattrAccess::Unsupported
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Whether the guest may set `name`; the error it gets otherwise (what an
/// unprivileged host process would get: `EPERM` for `security.*` and
/// `trusted.*`, `EOPNOTSUPP` for ACLs and unknown namespaces).
pub fn check_set(name: &[u8]) -> io::Result<()> {
    match classify(name) {
        XattrAccess::ReadWrite => Ok(()),
        XattrAccess::ReadOnly | XattrAccess::Hidden => Err(err(libc::EPERM)),
        XattrAccess::Unsupported => Err(err(libc::EOPNOTSUPP)),
    }
}

/// Whether the guest may remove `name`: as [`check_set`], plus
/// `security.capability` (removing capabilities only lowers privilege).
pub fn check_remove(name: &[u8]) -> io::Result<()> {
    if name == b"security.capability" {
        return Ok(());
    }
    check_set(name)
}

/// Whether the guest may read `name` (`ENODATA` for `trusted.*`, as if it
/// were absent; `EOPNOTSUPP` for ACLs and unknown namespaces).
pub fn check_get(name: &[u8]) -> io::Result<()> {
    match classify(name) {
        XattrAccess::ReadWrite | XattrAccess::ReadOnly => Ok(()),
        XattrAccess::Hidden => Err(err(libc::ENODATA)),
        XattrAccess::Unsupported => Err(err(libc::EOPNOTSUPP)),
    }
}

/// The buffer size to ask the host for on a GETXATTR of `size` bytes.
pub fn get_size(size: u32) -> u32 {
    size.min(XATTR_SIZE_MAX)
}

/// The guest's LISTXATTR reply from the host's full name list (read with
/// a buffer of [`XATTR_LIST_MAX`]): only names the guest may read, sized
/// as the guest asked (`size` 0: the length; too small: `ERANGE`).
pub fn filter_list(host: ListxattrReply, size: u32) -> io::Result<ListxattrReply> {
    let ListxattrReply::Names(all) = host else {
        return Err(err(libc::EIO));
    };
    let mut out = Vec::with_capacity(all.len());
    for name in all.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if check_get(name).is_ok() {
            out.extend_from_slice(name);
            out.push(0);
        }
    }
    let len = u32::try_from(out.len()).map_err(|_| err(libc::E2BIG))?;
    if size == 0 {
        Ok(ListxattrReply::Count(len))
    } else if len > size {
        Err(err(libc::ERANGE))
    } else {
        Ok(ListxattrReply::Names(out))
    }
}

/// A GETXATTR reply checked against what the guest asked for.
pub fn check_reply(r: GetxattrReply, size: u32) -> io::Result<GetxattrReply> {
    match r {
        GetxattrReply::Value(v) if v.len() > size as usize => Err(err(libc::ERANGE)),
        r => Ok(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        assert_eq!(classify(b"user.x"), XattrAccess::ReadWrite);
        assert_eq!(classify(b"user."), XattrAccess::Unsupported);
        assert_eq!(classify(b"security.capability"), XattrAccess::ReadOnly);
        assert_eq!(classify(b"trusted.overlay.opaque"), XattrAccess::Hidden);
        assert_eq!(
            classify(b"system.posix_acl_access"),
            XattrAccess::Unsupported
        );
        assert_eq!(classify(b"bogus.x"), XattrAccess::Unsupported);
        assert!(check_remove(b"security.capability").is_ok());
        assert!(check_remove(b"security.selinux").is_err());
        assert!(check_set(b"security.capability").is_err());
    }

    #[test]
    fn list_is_filtered_and_sized() {
        let host = b"user.a\0security.capability\0trusted.t\0system.posix_acl_access\0".to_vec();
        let want = b"user.a\0security.capability\0".to_vec();
        match filter_list(ListxattrReply::Names(host.clone()), 0).unwrap() {
            ListxattrReply::Count(n) => assert_eq!(n as usize, want.len()),
            _ => panic!("count expected"),
        }
        match filter_list(ListxattrReply::Names(host.clone()), 4096).unwrap() {
            ListxattrReply::Names(v) => assert_eq!(v, want),
            _ => panic!("names expected"),
        }
        match filter_list(ListxattrReply::Names(host), 5) {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ERANGE)),
            Ok(_) => panic!("a 5-byte buffer held the list"),
        }
    }
}
