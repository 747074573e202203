//! [`ShareFs`]: the FUSE file system behind one virtio-fs share — the
//! `fuse-backend-rs` [`PassthroughFs`] wrapped in the policy this project
//! adds on top of it (see `docs/virtio-fs.md`):
//!
//! - **confinement**: names are single components (no `/`, `..` at the
//!   share root is the root itself); every host lookup is one `openat` with
//!   `O_PATH | O_NOFOLLOW` relative to the parent's fd, so the server never
//!   follows a symlink on the host; regular files and directories are
//!   reopened through `/proc/self/fd` of an fd we already hold (never by
//!   path), and nothing else is opened; directories on another mount (a
//!   mount point under the share, including bind mounts of the same file
//!   system) are refused with `EXDEV`;
//! - **read-only shares** answer every request that would change the host
//!   tree with `EROFS`;
//! - **no device nodes, no set-id files**: `mknod` of a character or block
//!   device gives `EPERM`; set-user-id (and, on non-directories,
//!   set-group-id) bits are dropped from every mode the guest sets, the
//!   file type taken from the host inode (`fstat`), never from the mode
//!   bits of the request;
//! - **xattrs**: `user.*` only may be set; `security.*` is read-only,
//!   `trusted.*` hidden, ACLs unsupported (`xattr.rs`); sizes the guest
//!   asks for are capped;
//! - **open flags**: an allow-list; `O_PATH` and `O_TMPFILE` are `EINVAL`;
//! - **ids**: a VMM running as root creates files with the guest caller's
//!   uid/gid; any other host user serves every request as itself;
//! - **bounded host fds**: at most `max_inodes` inodes (one `O_PATH` fd
//!   each, or a kernel file handle each when the VMM holds
//!   `CAP_DAC_READ_SEARCH`) and `max_handles` open files; past that,
//!   requests fail with `ENFILE` (`READDIRPLUS` degrades to plain entries).
//!
//! Runs on the device's worker thread (or, in the host-side tests and the
//! benchmark, on the thread serving `/dev/fuse`); all state is behind
//! atomics and one mutex.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

use super::xattr;
pub use crate::config::ShareCache;

/// FUSE inode number of the share root.
pub const ROOT_INODE: u64 = 1;

/// How one share is served.
#[derive(Clone, Debug)]
pub struct ShareFsOptions {
    /// Host directory (made absolute and canonical by [`ShareFs::new`]).
    pub root: PathBuf,
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
    /// Guest caching.
    pub cache: ShareCache,
    /// Most inodes held at once (each an `O_PATH` fd, or a file handle
    /// with [`Self::inode_handles`]).
    pub max_inodes: usize,
    /// Most open files and directories at once.
    pub max_handles: usize,
    /// Keep looked-up inodes as kernel file handles (`name_to_handle_at`,
    /// reopened with `open_by_handle_at`) instead of one `O_PATH` fd each,
    /// so the inode count is not bounded by the fd limit. Needs
    /// `CAP_DAC_READ_SEARCH`; file systems without handles fall back to fds
    /// per inode.
    pub inode_handles: bool,
}

impl ShareFsOptions {
    /// Options with the default limits: a quarter of the fd limit for
    /// handles (at most 4096). Inodes are one fd each, bounded by the rest
    /// of the fd limit but 256 — unless that leaves fewer than
    /// [`FD_MODE_MIN_INODES`] and the VMM holds `CAP_DAC_READ_SEARCH`: then
    /// they are kept as file handles (no fd each; `stat` ~35 % and small
    /// reads ~12 % slower, measured through a host FUSE mount), bounded by
    /// memory at [`HANDLE_MODE_INODES`].
    pub fn new(root: impl Into<PathBuf>, read_only: bool, cache: ShareCache) -> Self {
        let fds = fd_limit();
        let max_handles = (fds / 4).clamp(16, 4096);
        let fd_inodes = fds.saturating_sub(max_handles + 256).max(64);
        let inode_handles = fd_inodes < FD_MODE_MIN_INODES && can_open_by_handle();
        let max_inodes = if inode_handles {
            HANDLE_MODE_INODES
        } else {
            fd_inodes
        };
        ShareFsOptions {
            root: root.into(),
            read_only,
            cache,
            max_inodes,
            max_handles,
            inode_handles,
        }
    }
}

/// Fewest inodes the fd limit must allow before file handles are preferred
/// (a 100 000-entry directory listed with `ls -l` plus a source tree).
pub const FD_MODE_MIN_INODES: usize = 1 << 18;

/// Inode bound when inodes are file handles (no fd each): about 300 bytes
/// of server memory per inode, so at most ~150 MiB per share.
pub const HANDLE_MODE_INODES: usize = 1 << 19;

/// Whether this process may `open_by_handle_at` (`CAP_DAC_READ_SEARCH` in
/// its effective capability set).
pub fn can_open_by_handle() -> bool {
    const CAP_DAC_READ_SEARCH: u32 = 2;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_DAC_READ_SEARCH) != 0)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (once) and returns it.
pub fn fd_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the rlimit we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: setrlimit reads only the rlimit we pass.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        usize::try_from(lim.rlim_cur)
            .unwrap_or(usize::MAX)
            .min(1 << 20)
    })
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Mount id and device of `path` (not following a final symlink).
fn mount_of(path: &CStr) -> io::Result<(u64, u64)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stx` is a valid out buffer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(err(libc::ENOSYS));
    }
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    Ok((stx.stx_mnt_id, dev))
}

/// Drops set-id bits the guest may not plant on the host: set-user-id
/// always, set-group-id unless the host inode is a directory. `is_dir` is
/// the host inode's real type (from `fstat`, or the kind of object being
/// made), never the type bits of a guest-supplied mode.
fn safe_mode(mode: u32, is_dir: bool) -> u32 {
    let mut m = mode & !libc::S_ISUID;
    if !is_dir {
        m &= !libc::S_ISGID;
    }
    m
}

/// Open flags a guest may pass to OPEN and CREATE; anything else (the
/// guest kernel's internal `__FMODE_EXEC`, unknown bits) is cleared.
const GUEST_OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_CLOEXEC
    | libc::O_ASYNC;

/// The open flags the server uses for `flags` from the guest: `O_PATH`
/// (which makes the kernel ignore `O_CREAT|O_EXCL` and follow a final
/// symlink) and `O_TMPFILE` are `EINVAL`; the rest is masked to
/// [`GUEST_OPEN_FLAGS`].
pub fn guest_open_flags(flags: u32) -> io::Result<u32> {
    let f = flags as i32;
    if f & libc::O_PATH != 0 || f & libc::O_TMPFILE == libc::O_TMPFILE {
        return Err(err(libc::EINVAL));
    }
    Ok((f & GUEST_OPEN_FLAGS) as u32)
}

/// Largest READDIR/READDIRPLUS buffer the server fills at once (the
/// guest's 256-page requests): a guest asking for more gets at most this.
pub const MAX_READDIR_SIZE: u32 = 1 << 20;

/// Open flags that can change a file.
const WRITE_OPEN_FLAGS: u32 =
    (libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) as u32;

/// The file system of one share.
pub struct ShareFs {
    inner: PassthroughFs,
    opts: ShareFsOptions,
    root_mnt: u64,
    root_dev: u64,
    host_root: bool,
    /// Inode → lookup count, as handed to the kernel.
    inodes: Mutex<HashMap<u64, u64>>,
    handles: AtomicUsize,
    /// The guest has mounted the share (FUSE_INIT, until FUSE_DESTROY or
    /// a device reset): its inode numbers live in the guest's kernel.
    session: std::sync::atomic::AtomicBool,
}

impl ShareFs {
    /// Serves `opts.root`, which must be an existing directory.
    pub fn new(mut opts: ShareFsOptions) -> io::Result<Self> {
        let root = std::fs::canonicalize(&opts.root)?;
        if !root.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        opts.root = root;
        let croot =
            CString::new(opts.root.as_os_str().as_bytes()).map_err(|_| err(libc::EINVAL))?;
        let (root_mnt, root_dev) = mount_of(&croot)?;
        let t = timeout(opts.cache);
        let cfg = Config {
            root_dir: opts.root.to_string_lossy().into_owned(),
            cache_policy: policy(opts.cache),
            attr_timeout: t,
            entry_timeout: t,
            xattr: true,
            do_import: true,
            writeback: false,
            no_open: false,
            no_opendir: false,
            killpriv_v2: false,
            inode_file_handles: opts.inode_handles,
            ..Default::default()
        };
        let inner = PassthroughFs::new(cfg)?;
        // Loads the root inode (also done again by `init`).
        inner.import()?;
        // SAFETY: geteuid has no preconditions.
        let host_root = unsafe { libc::geteuid() } == 0;
        let mut inodes = HashMap::new();
        inodes.insert(ROOT_INODE, 1);
        Ok(ShareFs {
            inner,
            opts,
            root_mnt,
            root_dev,
            host_root,
            inodes: Mutex::new(inodes),
            handles: AtomicUsize::new(0),
            session: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the guest has the share mounted (a FUSE session is open).
    pub fn in_session(&self) -> bool {
        self.session.load(Ordering::SeqCst)
    }

    /// The options in force (canonical root).
    pub fn options(&self) -> &ShareFsOptions {
        &self.opts
    }

    /// Inodes currently held (root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Open files and directories currently held.
    pub fn handle_count(&self) -> usize {
        self.handles.load(Ordering::Relaxed)
    }

    fn writable(&self) -> io::Result<()> {
        if self.opts.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Checks a directory the inner fs just returned is on the share's own
    /// mount (a mount point under the share is not crossed).
    fn same_mount(&self, e: &Entry) -> bool {
        if e.attr.st_dev != self.root_dev {
            return false;
        }
        if e.attr.st_mode & libc::S_IFMT != libc::S_IFDIR || e.inode == ROOT_INODE {
            return true;
        }
        // From the inode's own fd (fuse-backend-rs patch 0003), never from
        // a path the guest could change between the check and the use.
        matches!(self.inner.inode_mount_id(e.inode), Ok(mnt) if mnt == self.root_mnt)
    }

    /// Accounts for an entry the inner fs returned (its lookup count went
    /// up by one): refuses it when it is on another mount or when a new
    /// inode would pass the limit. The caller gives the inner reference
    /// back on refusal.
    fn check(&self, e: &Entry) -> Result<(), i32> {
        if e.inode == 0 {
            return Ok(());
        }
        if !self.same_mount(e) {
            return Err(libc::EXDEV);
        }
        let mut map = self.inodes.lock().map_err(|_| libc::EIO)?;
        if !map.contains_key(&e.inode) && map.len() >= self.opts.max_inodes {
            return Err(libc::ENFILE);
        }
        *map.entry(e.inode).or_insert(0) += 1;
        Ok(())
    }

    /// [`Self::check`], giving the inner reference back on refusal.
    fn admit(&self, ctx: &Context, e: Entry) -> io::Result<Entry> {
        match self.check(&e) {
            Ok(()) => Ok(e),
            Err(code) => {
                self.inner.forget(ctx, e.inode, 1);
                Err(err(code))
            }
        }
    }

    fn forget_counted(&self, inode: u64, count: u64) {
        if let Ok(mut map) = self.inodes.lock() {
            if let Some(n) = map.get_mut(&inode) {
                *n = n.saturating_sub(count);
                if *n == 0 && inode != ROOT_INODE {
                    map.remove(&inode);
                }
            }
        }
    }

    fn take_handle(&self) -> io::Result<()> {
        let n = self.handles.fetch_add(1, Ordering::AcqRel);
        if n >= self.opts.max_handles {
            self.handles.fetch_sub(1, Ordering::AcqRel);
            return Err(err(libc::ENFILE));
        }
        Ok(())
    }

    fn put_handle(&self) {
        let _ = self
            .handles
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// Whether `p` is the share root or below it (for tests and docs).
pub fn is_within(root: &Path, p: &Path) -> bool {
    p.starts_with(root)
}

impl FileSystem for ShareFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut opts = self.inner.init(capable)?;
        // Locks stay in the guest kernel (local to the VM): we never block
        // the worker on a host lock.
        opts.remove(FsOptions::POSIX_LOCKS | FsOptions::FLOCK_LOCKS);
        // Requests of up to 1 MiB (256 pages) instead of 4 KiB writes and
        // 128 KiB reads: the server copies straight between guest memory
        // and the file either way, so bigger requests cost less per byte.
        opts |= FsOptions::BIG_WRITES | FsOptions::MAX_PAGES;
        self.session.store(true, Ordering::SeqCst);
        Ok(opts)
    }

    fn destroy(&self) {
        self.session.store(false, Ordering::SeqCst);
        self.inner.destroy();
        if let Ok(mut m) = self.inodes.lock() {
            m.retain(|&k, _| k == ROOT_INODE);
        }
        self.handles.store(0, Ordering::Relaxed);
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        if !self.host_root {
            // An ordinary host user cannot switch ids: serve as ourselves
            // (uid/gid 0 means "no switch" to the inner fs).
            ctx.uid = 0;
            ctx.gid = 0;
        }
        Ok(())
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let e = self.inner.lookup(ctx, parent, name)?;
        self.admit(ctx, e)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.forget_counted(inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for &(i, c) in &requests {
            self.forget_counted(i, c);
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        mut attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        if valid.contains(SetattrValid::MODE) {
            // The host inode's real type, not the guest's S_IFMT bits.
            let real = self.inner.inode_stat(inode)?;
            let is_dir = real.st_mode & libc::S_IFMT == libc::S_IFDIR;
            attr.st_mode = safe_mode(attr.st_mode, is_dir);
        }
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        let e = self.inner.symlink(ctx, linkname, parent, name)?;
        self.admit(ctx, e)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR || kind == libc::S_IFBLK {
            return Err(err(libc::EPERM));
        }
        // mknod never makes a directory.
        let e = self
            .inner
            .mknod(ctx, inode, name, safe_mode(mode, false), rdev, umask)?;
        self.admit(ctx, e)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        let e = self.inner.mkdir(
            ctx,
            parent,
            name,
            (mode & !libc::S_ISUID) | libc::S_IFDIR,
            umask,
        )?;
        self.admit(ctx, e)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        let e = self.inner.link(ctx, inode, newparent, newname)?;
        self.admit(ctx, e)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let flags = guest_open_flags(flags)?;
        if flags & WRITE_OPEN_FLAGS != 0 {
            self.writable()?;
        }
        self.take_handle()?;
        let r = self.inner.open(ctx, inode, flags, fuse_flags);
        if !matches!(r, Ok((Some(_), _, _))) {
            self.put_handle();
        }
        r
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        args.flags = guest_open_flags(args.flags)?;
        self.take_handle()?;
        // CREATE makes a regular file, whatever S_IFMT the request says.
        args.mode = safe_mode(args.mode, false);
        let (e, h, o, x) = match self.inner.create(ctx, parent, name, args) {
            Ok(r) => r,
            Err(e) => {
                self.put_handle();
                return Err(e);
            }
        };
        if h.is_none() {
            self.put_handle();
        }
        match self.admit(ctx, e) {
            Ok(e) => Ok((e, h, o, x)),
            Err(er) => {
                if let Some(h) = h {
                    let _ = self.release(ctx, e.inode, 0, h, false, false, None);
                }
                Err(er)
            }
        }
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let r = self
            .inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner);
        if r.is_ok() {
            self.put_handle();
        }
        r
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        let mut s = self.inner.statfs(ctx, inode)?;
        if self.opts.read_only {
            s.f_flag |= libc::ST_RDONLY;
        }
        Ok(s)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        xattr::check_set(name.to_bytes())?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        xattr::check_get(name.to_bytes())?;
        let r = self
            .inner
            .getxattr(ctx, inode, name, xattr::get_size(size))?;
        xattr::check_reply(r, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        // The whole list (the kernel's own bound), then only the names the
        // guest may read, sized as it asked.
        let all = self.inner.listxattr(ctx, inode, xattr::XATTR_LIST_MAX)?;
        xattr::filter_list(all, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        xattr::check_remove(name.to_bytes())?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        self.take_handle()?;
        let r = self.inner.opendir(ctx, inode, flags);
        if !matches!(r, Ok((Some(_), _))) {
            self.put_handle();
        }
        r
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let size = size.min(MAX_READDIR_SIZE);
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let size = size.min(MAX_READDIR_SIZE);
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |d, e| {
                let ino = e.inode;
                let admitted = self.check(&e).is_ok();
                // Refused (over the limit, or another mount): a plain entry;
                // inode 0 carries no lookup reference.
                let sent = if admitted { e } else { Entry { inode: 0, ..e } };
                let n = add_entry(d, sent)?;
                if n == 0 {
                    // Not sent (buffer full): the inner fs gives its
                    // reference back itself.
                    if admitted {
                        self.forget_counted(ino, 1);
                    }
                } else if !admitted {
                    self.inner.forget(ctx, ino, 1);
                }
                Ok(n)
            })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let r = self.inner.releasedir(ctx, inode, flags, handle);
        if r.is_ok() {
            self.put_handle();
        }
        r
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _owner: u64,
        _lock: FileLock,
        _flags: u32,
    ) -> io::Result<FileLock> {
        Err(err(libc::ENOSYS))
    }

    fn ioctl(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _flags: u32,
        _cmd: u32,
        _data: IoctlData,
        _out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        Err(err(libc::ENOTTY))
    }
}

/// Entry and attribute timeout the guest gets for a cache mode.
fn timeout(cache: ShareCache) -> Duration {
    match cache {
        ShareCache::Never => Duration::ZERO,
        ShareCache::Auto => Duration::from_secs(1),
        ShareCache::Always => Duration::from_secs(86_400),
    }
}

/// The passthrough server's cache policy for a cache mode.
fn policy(cache: ShareCache) -> CachePolicy {
    match cache {
        ShareCache::Never => CachePolicy::Never,
        ShareCache::Auto => CachePolicy::Auto,
        ShareCache::Always => CachePolicy::Always,
    }
}
