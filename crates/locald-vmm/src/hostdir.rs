//! Trusted host directories. The runtime directory holds the sockets that
//! `exec` sends commands and environment through, and the asset cache
//! holds the kernel build script and the kernel we boot: another local user
//! must not be able to plant or swap anything in either.
//!
//! Every level of a path is `lstat`ed from `/` down:
//! - levels above our own directory ("ancestors", e.g. `/tmp`,
//!   `/run/user/<uid>`, `$HOME`) must be owned by root or by us, and a
//!   directory writable by group or others must be sticky (`/tmp`, 1777).
//!   A symlink there is followed if root or we own it; the resolved path
//!   is what callers use from then on, so swapping the link later changes
//!   nothing;
//! - our own directory must be a real directory (never a symlink), owned
//!   by the effective uid and not writable by group or others. Missing
//!   levels are created one at a time with `mkdir(0700)`, never
//!   recursively, and what a racing `mkdir` left is checked like the rest.
//!
//! Files inside are opened with `O_NOFOLLOW` (and `O_EXCL` when created):
//! [`open_nofollow`]. Plain functions, run on the caller's thread.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Longest chain of symlinks followed among the ancestors (as ELOOP).
const MAX_LINKS: usize = 40;

/// Why a host directory or file is not used.
#[derive(Debug, thiserror::Error)]
pub enum HostDirError {
    /// Another user could control the path.
    #[error("refusing {}: {problem}", path.display())]
    Untrusted {
        /// The level that failed the check.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A filesystem call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
}

impl From<HostDirError> for crate::Error {
    fn from(e: HostDirError) -> Self {
        crate::Error::Io(io::Error::other(e))
    }
}

fn untrusted(path: &Path, problem: impl Into<String>) -> HostDirError {
    HostDirError::Untrusted {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> HostDirError + 'a {
    move |source| HostDirError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The effective uid: the owner our directories must have.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks a level above our own directory.
fn check_ancestor(path: &Path, m: &fs::Metadata, uid: u32) -> Result<(), HostDirError> {
    let kind = if m.file_type().is_symlink() {
        "a symlink"
    } else if m.is_dir() {
        "a directory"
    } else {
        return Err(untrusted(path, "not a directory"));
    };
    if m.uid() != 0 && m.uid() != uid {
        return Err(untrusted(
            path,
            format!(
                "{kind} owned by uid {}, neither root nor you (uid {uid})",
                m.uid()
            ),
        ));
    }
    let mode = m.mode() & 0o7777;
    // 0o1000: the sticky bit (S_ISVTX; its libc type differs by OS).
    if m.is_dir() && mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(untrusted(
            path,
            format!("writable by group or others and not sticky (mode {mode:04o})"),
        ));
    }
    Ok(())
}

/// Checks our own directory.
fn check_own(path: &Path, m: &fs::Metadata, uid: u32) -> Result<(), HostDirError> {
    if m.file_type().is_symlink() {
        return Err(untrusted(
            path,
            "a symlink (it must be a real directory of yours)",
        ));
    }
    if !m.is_dir() {
        return Err(untrusted(path, "not a directory"));
    }
    if m.uid() != uid {
        return Err(untrusted(
            path,
            format!("owned by uid {}, not by you (uid {uid})", m.uid()),
        ));
    }
    let mode = m.mode() & 0o7777;
    // 0o1000: the sticky bit (S_ISVTX; its libc type differs by OS).
    if mode & 0o022 != 0 {
        return Err(untrusted(
            path,
            format!("writable by group or others (mode {mode:04o}); it must be private to you"),
        ));
    }
    Ok(())
}

/// Where walking a path ended.
#[derive(Debug, PartialEq, Eq)]
enum Walk {
    /// Every level exists; the path with symlinks resolved.
    Found(PathBuf),
    /// `existing` (resolved) exists, the names in `rest` do not.
    Missing {
        existing: PathBuf,
        rest: Vec<OsString>,
    },
}

fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(s) => Some(s.to_owned()),
        Component::ParentDir => Some("..".into()),
        Component::CurDir => Some(".".into()),
        Component::RootDir | Component::Prefix(_) => None,
    })
}

/// `lstat`s every level of `path` (made absolute) as an ancestor,
/// following trusted symlinks.
fn walk(path: &Path, uid: u32) -> Result<Walk, HostDirError> {
    let abs = std::path::absolute(path).map_err(io_err("resolving", path))?;
    let mut done = PathBuf::from("/");
    let root = fs::symlink_metadata(&done).map_err(io_err("examining", &done))?;
    check_ancestor(&done, &root, uid)?;
    let mut todo: VecDeque<OsString> = components(&abs).collect();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        if c == "." {
            continue;
        }
        if c == ".." {
            // `done` has no symlinks left, so `..` is its parent.
            done.pop();
            continue;
        }
        let cand = done.join(&c);
        let m = match fs::symlink_metadata(&cand) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let rest: Vec<OsString> = std::iter::once(c)
                    .chain(todo)
                    .filter(|c| c != ".")
                    .collect();
                if rest.iter().any(|c| c == "..") {
                    return Err(untrusted(&cand, "missing, and '..' follows it"));
                }
                return Ok(Walk::Missing {
                    existing: done,
                    rest,
                });
            }
            Err(e) => return Err(io_err("examining", &cand)(e)),
        };
        check_ancestor(&cand, &m, uid)?;
        if m.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(untrusted(&cand, "too many levels of symlinks"));
            }
            let target = fs::read_link(&cand).map_err(io_err("reading link", &cand))?;
            if target.is_absolute() {
                done = PathBuf::from("/");
            }
            for t in components(&target).collect::<Vec<_>>().into_iter().rev() {
                todo.push_front(t);
            }
        } else {
            done = cand;
        }
    }
    Ok(Walk::Found(done))
}

/// Creates one level with `mkdir(0700)` (not recursive) and checks what is
/// there afterwards (another process of ours may have won the race).
fn mkdir_private(path: &Path, uid: u32) -> Result<(), HostDirError> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("creating directory", path)(e)),
    }
    let m = fs::symlink_metadata(path).map_err(io_err("examining", path))?;
    check_own(path, &m, uid)
}

fn private_dir_as(path: &Path, create: bool, uid: u32) -> Result<Option<PathBuf>, HostDirError> {
    let abs = std::path::absolute(path).map_err(io_err("resolving", path))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(untrusted(&abs, "not a directory of its own"));
    };
    match walk(parent, uid)? {
        Walk::Found(parent) => {
            let own = parent.join(name);
            match fs::symlink_metadata(&own) {
                Ok(m) => check_own(&own, &m, uid)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    mkdir_private(&own, uid)?;
                }
                Err(e) => return Err(io_err("examining", &own)(e)),
            }
            Ok(Some(own))
        }
        Walk::Missing { existing, rest } => {
            if !create {
                return Ok(None);
            }
            let mut cur = existing;
            for c in rest.iter().map(OsString::as_os_str).chain([name]) {
                cur.push(c);
                mkdir_private(&cur, uid)?;
            }
            Ok(Some(cur))
        }
    }
}

/// Makes sure `path` is a private directory of ours (see the module docs),
/// creating missing levels one at a time with mode 0700. Returns the path
/// with its ancestors' symlinks resolved; use that one from then on.
pub fn ensure_private_dir(path: &Path) -> Result<PathBuf, HostDirError> {
    private_dir_as(path, true, euid()).map(|p| p.unwrap_or_else(|| path.to_path_buf()))
}

/// Like [`ensure_private_dir`] but creates nothing: `None` if `path` (or a
/// level above it) does not exist.
pub fn check_private_dir(path: &Path) -> Result<Option<PathBuf>, HostDirError> {
    private_dir_as(path, false, euid())
}

/// How [`open_nofollow`] treats a missing or existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// The file must exist.
    No,
    /// Create it; it must not exist yet (`O_EXCL`).
    New,
    /// Create it if missing.
    IfMissing,
}

/// Opens the regular file `path` for reading and appending with
/// `O_NOFOLLOW` (a symlink there is refused) and `O_CLOEXEC`. New files
/// get mode 0600.
pub fn open_nofollow(path: &Path, create: Create) -> Result<File, HostDirError> {
    let mut o = fs::OpenOptions::new();
    o.read(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
    match create {
        Create::No => {}
        Create::New => {
            o.create_new(true);
        }
        Create::IfMissing => {
            o.create(true);
        }
    }
    let is_link = || fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    let f = o.open(path).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => untrusted(path, "a symlink"),
        Some(libc::EEXIST) if is_link() => untrusted(path, "a symlink"),
        _ => io_err("opening", path)(e),
    })?;
    let m = f.metadata().map_err(io_err("examining", path))?;
    if !m.is_file() {
        return Err(untrusted(path, "not a regular file"));
    }
    if m.uid() != euid() {
        return Err(untrusted(
            path,
            format!("owned by uid {}, not by you (uid {})", m.uid(), euid()),
        ));
    }
    // O_NONBLOCK only kept a planted FIFO from blocking the open.
    // SAFETY: F_SETFL on a descriptor we own; no memory is involved.
    unsafe {
        use std::os::fd::AsRawFd;
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// The runtime directory ([`crate::runtime_base`]), checked; created
/// (mode 0700, level by level) when `create`. `None`: it does not exist.
pub fn runtime_dir(create: bool) -> Result<Option<PathBuf>, HostDirError> {
    private_dir_as(&crate::runtime_base(), create, euid())
}

#[cfg(test)]
mod tests;
