//! Descriptor-relative filesystem primitives for the unpacker, and the
//! in-root path resolver.
//!
//! Every operation here takes a directory descriptor and ONE path component
//! (no `/`): nothing is ever looked up by a path that the kernel would walk
//! on its own, so no symlink is ever followed by the kernel. Symlinks met
//! while resolving a parent directory are read with `readlinkat` and
//! resolved by [`Root::resolve_dir`] itself, inside the root, with
//! chroot-like semantics (an absolute target restarts at the root, `..` at
//! the root stays at the root), within a bounded number of hops.
//!
//! Only POSIX calls (`openat`, `mkdirat`, `fstatat`, `readlinkat`,
//! `unlinkat`, `symlinkat`, `linkat`, `fchmod`, `futimens`, `utimensat`,
//! `fdopendir`) plus `fsetxattr` (whose signature differs on macOS): the
//! same code runs on Linux and macOS.
//!
//! Runs on the caller's thread (the unpacker is single-threaded); it
//! assumes nothing else modifies the staging tree while a layer is applied
//! (even then, the per-component `O_NOFOLLOW` opens keep every operation
//! inside the root).

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::rc::Rc;

/// What a directory entry is, as `fstatat(AT_SYMLINK_NOFOLLOW)` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostKind {
    Missing,
    Dir,
    Symlink,
    /// A regular file, or anything else that is neither a dir nor a symlink.
    Other,
}

/// An open directory inside the root, with its canonical path (components
/// joined by `/`, relative to the root, `""` for the root itself).
#[derive(Debug)]
pub(crate) struct Dir {
    pub fd: OwnedFd,
    pub canon: Vec<u8>,
}

impl Dir {
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The canonical path of `name` inside this directory.
    pub fn child(&self, name: &[u8]) -> Vec<u8> {
        join(&self.canon, name)
    }
}

/// `parent/name`, or `name` when `parent` is the root (`""`).
pub(crate) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// Why a parent directory could not be resolved.
#[derive(Debug)]
pub(crate) enum ResolveError {
    /// More symlinks than allowed were followed.
    Loop,
    /// A component (canonical path given) exists and is not a directory.
    NotDir(Vec<u8>),
    /// The canonical path became deeper than allowed.
    TooDeep,
    /// A symlink target is empty (it resolves to nothing).
    EmptyLink(Vec<u8>),
    Io(&'static str, io::Error),
}

/// The staging root: a directory descriptor everything is resolved from,
/// plus a one-entry cache of the last resolved parent directory.
pub(crate) struct Root {
    root: Rc<Dir>,
    /// (literal parent path as written in the layer, its resolution).
    cache: Option<(Vec<u8>, Rc<Dir>)>,
    pub max_hops: u32,
    pub max_depth: usize,
}

impl Root {
    pub fn open(path: &Path, max_hops: u32, max_depth: usize) -> io::Result<Root> {
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `c` is a valid NUL-terminated string; the result is checked
        // and owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        let fd = check_fd(fd)?;
        Ok(Root {
            root: Rc::new(Dir {
                fd,
                canon: Vec::new(),
            }),
            cache: None,
            max_hops,
            max_depth,
        })
    }

    pub fn root(&self) -> Rc<Dir> {
        self.root.clone()
    }

    /// Forgets the cached parent: call after removing or replacing a
    /// directory or a symlink (a cached resolution may go through it).
    pub fn invalidate(&mut self) {
        self.cache = None;
    }

    /// Opens the directory at `literal` (normalized components joined by
    /// `/`, `""` = the root), resolving symlinks inside the root. With
    /// `create`, missing directories are made (mode 0700 on the host) and
    /// their canonical paths pushed to `created`; without, a missing
    /// component gives `Ok(None)`.
    pub fn resolve_dir(
        &mut self,
        literal: &[u8],
        create: bool,
        created: &mut Vec<Vec<u8>>,
    ) -> Result<Option<Rc<Dir>>, ResolveError> {
        if literal.is_empty() {
            return Ok(Some(self.root.clone()));
        }
        if let Some((lit, dir)) = &self.cache {
            if lit == literal {
                return Ok(Some(dir.clone()));
            }
        }
        let mut queue: VecDeque<Vec<u8>> = literal
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
        // Directories from the root down to the current one.
        let mut stack: Vec<(OwnedFd, Vec<u8>)> = Vec::new();
        let mut hops = 0u32;
        while let Some(comp) = queue.pop_front() {
            match comp.as_slice() {
                b"." => continue,
                b".." => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            let cur = stack
                .last()
                .map_or(self.root.raw(), |(fd, _)| fd.as_raw_fd());
            let name = cstring(&comp).map_err(|e| ResolveError::Io("resolving", e))?;
            match open_dir_at(cur, &name) {
                Ok(fd) => {
                    if stack.len() >= self.max_depth {
                        return Err(ResolveError::TooDeep);
                    }
                    stack.push((fd, comp));
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if !create {
                        return Ok(None);
                    }
                    if stack.len() >= self.max_depth {
                        return Err(ResolveError::TooDeep);
                    }
                    mkdir_at(cur, &name, 0o700).map_err(|e| ResolveError::Io("mkdirat", e))?;
                    let fd = open_dir_at(cur, &name).map_err(|e| ResolveError::Io("openat", e))?;
                    stack.push((fd, comp));
                    created.push(canon_of(&stack));
                    continue;
                }
                Err(e)
                    if e.raw_os_error() == Some(libc::ELOOP)
                        || e.raw_os_error() == Some(libc::ENOTDIR)
                        || e.raw_os_error() == Some(libc::EMLINK) => {}
                Err(e) => return Err(ResolveError::Io("openat", e)),
            }
            // Not a directory we could open without following: a symlink
            // (resolve it here) or something else (an error).
            match lstat_at(cur, &name).map_err(|e| ResolveError::Io("fstatat", e))? {
                HostKind::Symlink => {}
                _ => {
                    let mut p = canon_of(&stack);
                    p = join(&p, &comp);
                    return Err(ResolveError::NotDir(p));
                }
            }
            hops += 1;
            if hops > self.max_hops {
                return Err(ResolveError::Loop);
            }
            let target = readlink_at(cur, &name).map_err(|e| ResolveError::Io("readlinkat", e))?;
            if target.is_empty() {
                return Err(ResolveError::EmptyLink(join(&canon_of(&stack), &comp)));
            }
            if target[0] == b'/' {
                stack.clear();
            }
            for c in target.split(|&b| b == b'/').rev().filter(|c| !c.is_empty()) {
                queue.push_front(c.to_vec());
            }
        }
        let dir = match stack.pop() {
            None => self.root.clone(),
            Some((fd, last)) => {
                let parent = canon_of(&stack);
                Rc::new(Dir {
                    fd,
                    canon: join(&parent, &last),
                })
            }
        };
        self.cache = Some((literal.to_vec(), dir.clone()));
        Ok(Some(dir))
    }
}

fn canon_of(stack: &[(OwnedFd, Vec<u8>)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (i, (_, c)) in stack.iter().enumerate() {
        if i > 0 {
            p.push(b'/');
        }
        p.extend_from_slice(c);
    }
    p
}

/// A C string of a path component or symlink target (NUL was rejected
/// before; this is the last line of defence).
pub(crate) fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_fd(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one
    // else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the directory `name` in `dir` without following a symlink.
pub(crate) fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is an open descriptor, `name` a valid C string; the
    // result is checked.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    check_fd(fd)
}

/// Creates a new regular file `name` in `dir`: fails if anything (even a
/// dangling symlink) is there.
pub(crate) fn create_file_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<File> {
    // SAFETY: as in `open_dir_at`; the mode is passed as the variadic
    // argument `openat` expects with O_CREAT.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    check_fd(fd).map(File::from)
}

#[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
pub(crate) fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<HostKind> {
    // SAFETY: `stat` is plain old data; fstatat fills it and we check the
    // result before reading it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out pointer.
    let r = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            return Ok(HostKind::Missing);
        }
        return Err(e);
    }
    let fmt = u32::from(st.st_mode) & (libc::S_IFMT as u32);
    Ok(if fmt == libc::S_IFDIR as u32 {
        HostKind::Dir
    } else if fmt == libc::S_IFLNK as u32 {
        HostKind::Symlink
    } else {
        HostKind::Other
    })
}

pub(crate) fn readlink_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: the buffer is ours and its length is passed.
    let n = unsafe {
        libc::readlinkat(
            dir,
            name.as_ptr(),
            buf.as_mut_ptr().cast::<libc::c_char>(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n >= buf.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    buf.truncate(n);
    Ok(buf)
}

pub(crate) fn mkdir_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) })
}

pub(crate) fn unlink_at(dir: RawFd, name: &CStr, is_dir: bool) -> io::Result<()> {
    let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: valid descriptor and C string; unlinkat never follows a
    // symlink in its last component.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) })
}

pub(crate) fn symlink_at(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C strings and descriptor.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) })
}

/// Hard-links `oldname` in `olddir` (not following a symlink there) as
/// `newname` in `newdir`.
pub(crate) fn link_at(
    olddir: RawFd,
    oldname: &CStr,
    newdir: RawFd,
    newname: &CStr,
) -> io::Result<()> {
    // SAFETY: valid descriptors and C strings; flags 0 = do not follow.
    check(unsafe { libc::linkat(olddir, oldname.as_ptr(), newdir, newname.as_ptr(), 0) })
}

pub(crate) fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::fchmod(fd, mode as libc::mode_t) })
}

fn times(mtime: u64) -> [libc::timespec; 2] {
    let secs = i64::try_from(mtime).unwrap_or(i64::MAX);
    // SAFETY: timespec is plain old data; all-zero is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    ts.tv_sec = secs as libc::time_t;
    [ts, ts]
}

/// Sets atime and mtime of an open file or directory.
pub(crate) fn futimens(fd: RawFd, mtime: u64) -> io::Result<()> {
    let t = times(mtime);
    // SAFETY: `t` holds two valid timespecs.
    check(unsafe { libc::futimens(fd, t.as_ptr()) })
}

/// Sets atime and mtime of `name` in `dir` itself (a symlink is not
/// followed).
pub(crate) fn utimens_nofollow(dir: RawFd, name: &CStr, mtime: u64) -> io::Result<()> {
    let t = times(mtime);
    // SAFETY: valid descriptor, C string and two timespecs.
    check(unsafe { libc::utimensat(dir, name.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// Sets an extended attribute on an open file or directory.
pub(crate) fn fsetxattr(fd: RawFd, name: &CStr, value: &[u8]) -> io::Result<()> {
    let v = value.as_ptr().cast::<libc::c_void>();
    // SAFETY: valid descriptor, C string, and a value buffer of the given
    // length.
    #[cfg(target_os = "macos")]
    let r = unsafe { libc::fsetxattr(fd, name.as_ptr(), v, value.len(), 0, 0) };
    // SAFETY: as above.
    #[cfg(not(target_os = "macos"))]
    let r = unsafe { libc::fsetxattr(fd, name.as_ptr(), v, value.len(), 0) };
    check(r)
}

#[cfg(target_os = "linux")]
fn set_errno(v: libc::c_int) {
    // SAFETY: the thread's errno location is always valid.
    unsafe { *libc::__errno_location() = v }
}

#[cfg(target_os = "macos")]
fn set_errno(v: libc::c_int) {
    // SAFETY: the thread's errno location is always valid.
    unsafe { *libc::__error() = v }
}

/// The names in an open directory (without `.` and `..`).
pub(crate) fn list_dir(dir: RawFd) -> io::Result<Vec<Vec<u8>>> {
    // SAFETY: duplicates an open descriptor; the result is checked.
    let dup = unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) };
    let dup = check_fd(dup)?;
    // SAFETY: `dup` is an open directory descriptor; on success the DIR
    // stream owns it (closedir below closes it).
    let d = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    // The stream starts where the descriptor's offset is: rewind.
    // SAFETY: `d` is a valid DIR stream.
    unsafe { libc::rewinddir(d) };
    let mut names = Vec::new();
    let result = loop {
        set_errno(0);
        // SAFETY: `d` is a valid DIR stream.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break match e.raw_os_error() {
                Some(0) | None => Ok(()),
                _ => Err(e),
            };
        }
        // SAFETY: readdir returned a valid entry whose d_name is
        // NUL-terminated; it stays valid until the next readdir.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: closes the stream (and `dup`) exactly once.
    unsafe { libc::closedir(d) };
    result.map(|()| names)
}

/// Removes `name` in `dir` and, if it is a directory, everything under it,
/// never following a symlink. Missing is not an error. Returns whether the
/// removed thing was a directory or a symlink (callers invalidate caches).
pub(crate) fn remove_all_at(dir: RawFd, name: &CStr, depth_left: usize) -> io::Result<HostKind> {
    let kind = lstat_at(dir, name)?;
    match kind {
        HostKind::Missing => {}
        HostKind::Dir => {
            if depth_left == 0 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let sub = open_dir_at(dir, name)?;
            for child in list_dir(sub.as_raw_fd())? {
                let c = cstring(&child)?;
                remove_all_at(sub.as_raw_fd(), &c, depth_left - 1)?;
            }
            unlink_at(dir, name, true)?;
        }
        HostKind::Symlink | HostKind::Other => unlink_at(dir, name, false)?,
    }
    Ok(kind)
}
