//! The raw-image backend of virtio-blk: opening and locking the image
//! ([`DiskFile::open`]) and the I/O primitives a request needs, behind the
//! small [`BlockBackend`] trait so request handling can be tested against
//! an in-memory disk or a backend that injects errors.
//!
//! Data moves directly between the image and guest memory: reads and
//! writes take vm-memory [`VolatileSlice`]s and hand their host addresses
//! to `pread`/`preadv`/`pwrite`/`pwritev`, with no bounce buffer.
//!
//! `open` runs on the thread that builds the VM; the I/O methods run on the
//! block device's worker thread (one request at a time); `Drop` runs
//! wherever the device is dropped and makes a writable image durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use crate::config::{CacheMode, DiskConfig};

/// Bytes per virtio-blk sector (fixed by the spec, whatever `blk_size` says).
pub const SECTOR_SIZE: u64 = 512;
/// log2([`SECTOR_SIZE`]).
pub const SECTOR_SHIFT: u32 = 9;

/// Why a disk image cannot be used. Every message names the image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// open(2) failed.
    #[error("cannot open disk image {}: {err}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        err: io::Error,
    },
    /// Another process (another VM) holds a conflicting lock.
    #[error(
        "disk image {} is in use by another VM (locked); \
         a writable image can be attached to one VM at a time",
        path.display()
    )]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// flock(2) failed for another reason.
    #[error("cannot lock disk image {}: {err}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// The OS error.
        err: io::Error,
    },
    /// The image is neither a regular file nor a block device.
    #[error("disk image {} is not a regular file or block device", path.display())]
    NotADisk {
        /// The image.
        path: PathBuf,
    },
    /// The size could not be determined.
    #[error("cannot get the size of disk image {}: {err}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The OS error.
        err: io::Error,
    },
    /// Smaller than one sector: the guest would see an empty disk.
    #[error(
        "disk image {} is {size} bytes; a disk image must be at least {SECTOR_SIZE} bytes",
        path.display()
    )]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

/// The storage operations a block request needs. Offsets and lengths are in
/// bytes and already validated against the disk's capacity by the caller.
/// Implementations retry `EINTR` and short transfers themselves.
pub trait BlockBackend: Send {
    /// Fills `bufs`, in order, with the bytes at `offset..`. Bytes past the
    /// end of the backing store read as zero.
    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;

    /// Writes the contents of `bufs`, in order, at `offset..`.
    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;

    /// Makes completed writes durable (per the disk's cache mode).
    fn flush(&mut self) -> io::Result<()>;

    /// Deallocates `len` bytes at `offset` (later reads return zeroes).
    /// Fails with [`io::ErrorKind::Unsupported`] if the host cannot.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;

    /// Zeroes `len` bytes at `offset`, deallocating them if `may_unmap`
    /// and the host can.
    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
}

/// Whether an I/O error means "the host cannot do this" (as opposed to a
/// failed attempt).
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    ) || e.kind() == io::ErrorKind::Unsupported
}

/// An open, locked raw disk image.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    read_only: bool,
    cache: CacheMode,
    size: u64,
    /// fallocate(PUNCH_HOLE) works on this image.
    punch_hole: bool,
    /// fallocate(ZERO_RANGE) has not failed as unsupported yet.
    zero_range: bool,
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl DiskFile {
    /// Opens and locks the image `disk.path`: read-only or read-write
    /// (`O_DSYNC` for [`CacheMode::Writethrough`]), close-on-exec, with a
    /// non-blocking `flock` (exclusive when writable, shared when
    /// read-only) so two VMs cannot write one image.
    pub fn open(disk: &DiskConfig) -> Result<DiskFile, BlockError> {
        let path = disk.path.clone();
        let mut flags = libc::O_CLOEXEC;
        if !disk.read_only && disk.cache == CacheMode::Writethrough {
            flags |= libc::O_DSYNC;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .custom_flags(flags)
            .open(&path)
            .map_err(|err| BlockError::Open {
                path: path.clone(),
                err,
            })?;
        lock(&file, &path, disk.read_only)?;
        let meta = file.metadata().map_err(|err| BlockError::Size {
            path: path.clone(),
            err,
        })?;
        let size = if meta.file_type().is_block_device() {
            block_device_size(&file).map_err(|err| BlockError::Size {
                path: path.clone(),
                err,
            })?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(BlockError::NotADisk { path });
        };
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall { path, size });
        }
        let tail = size % SECTOR_SIZE;
        if tail != 0 {
            tracing::warn!(
                "disk image {}: size {size} is not a multiple of {SECTOR_SIZE}; \
                 the last {tail} bytes are not visible to the guest",
                path.display()
            );
        }
        let punch_hole = !disk.read_only && probe_punch_hole(&file, size, meta.is_file());
        Ok(DiskFile {
            file,
            path,
            read_only: disk.read_only,
            cache: disk.cache,
            size,
            punch_hole,
            zero_range: true,
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the image in bytes (may include a tail that is not a whole
    /// sector).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whole 512-byte sectors: what the guest sees.
    pub fn capacity_sectors(&self) -> u64 {
        self.size >> SECTOR_SHIFT
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The cache mode the image was opened with.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// Whether the host can deallocate ranges (DISCARD, unmapping
    /// WRITE_ZEROES).
    pub fn supports_discard(&self) -> bool {
        self.punch_hole
    }

    /// `fdatasync` unless the disk is read-only or [`CacheMode::Unsafe`].
    pub fn sync(&self) -> io::Result<()> {
        if self.read_only || self.cache == CacheMode::Unsafe {
            return Ok(());
        }
        retry_eintr(|| {
            // SAFETY: fdatasync on a descriptor we own; no memory is passed.
            let r = unsafe { libc::fdatasync(self.file.as_raw_fd()) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
    }

    /// fallocate with KEEP_SIZE: punch a hole, or zero the range.
    fn fallocate(&self, punch: bool, offset: u64, len: u64) -> io::Result<()> {
        retry_eintr(|| {
            let mode = if punch {
                FallocateMode::PunchHole
            } else {
                FallocateMode::ZeroRange
            };
            fallocate(&self.file, mode, true, offset, len)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        })?;
        // O_DSYNC does not cover fallocate: keep write-through durable.
        if self.cache == CacheMode::Writethrough {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes real zeroes (the fallback when fallocate cannot).
    fn write_zeroes_slowly(&self, mut offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROES.len() as u64) as usize;
            // Loops over short writes and EINTR.
            self.file.write_all_at(&ZEROES[..n], offset)?;
            offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}

impl Drop for DiskFile {
    /// A clean VMM shutdown leaves a writable image durable (except in
    /// [`CacheMode::Unsafe`]).
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(
                "disk image {}: final fdatasync failed: {e}",
                self.path.display()
            );
        }
    }
}

fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(BlockError::Locked {
                    path: path.to_path_buf(),
                })
            }
            _ => {
                return Err(BlockError::Lock {
                    path: path.to_path_buf(),
                    err,
                })
            }
        }
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live, writable u64; the descriptor is ours.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

/// Whether hole punching works, tested harmlessly: on a regular file, punch
/// a page past the end of the image (no data there; KEEP_SIZE keeps the
/// size). Block devices support it in the kernel's blkdev_fallocate; a
/// device that cannot discard fails the real request with EOPNOTSUPP,
/// which is answered UNSUPP.
fn probe_punch_hole(file: &File, size: u64, regular: bool) -> bool {
    if !regular {
        return true;
    }
    let at = size.next_multiple_of(4096);
    match fallocate(file, FallocateMode::PunchHole, true, at, 4096) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("fallocate(PUNCH_HOLE) unsupported: {e}");
            false
        }
    }
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Most iovecs one preadv/pwritev call takes (well under IOV_MAX).
const IOV_CHUNK: usize = 64;

/// One positioned, vectored transfer between the image and `bufs`,
/// starting `skip` bytes into `bufs[0]`. Returns the bytes moved.
fn transfer_once(
    fd: i32,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
    skip: usize,
    write: bool,
) -> io::Result<usize> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    if bufs.len() == 1 {
        let b = &bufs[0];
        let len = b.len() - skip;
        let r = if write {
            let g = b.ptr_guard();
            // SAFETY: the guard keeps the slice's memory mapped; its pointer
            // is valid for reads of `b.len()` bytes, so `skip..` is in
            // bounds. pwrite only reads the buffer.
            unsafe { libc::pwrite(fd, g.as_ptr().add(skip).cast(), len, offset) }
        } else {
            let g = b.ptr_guard_mut();
            // SAFETY: as above, and the guard is the mutable one: pread
            // writes at most `len` bytes into guest memory, which the guest
            // handed us for this purpose (volatile memory; no Rust
            // references to it exist).
            unsafe { libc::pread(fd, g.as_ptr().add(skip).cast(), len, offset) }
        };
        return if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        };
    }
    let n = bufs.len().min(IOV_CHUNK);
    let mut guards: [Option<vm_memory::volatile_memory::PtrGuardMut>; IOV_CHUNK] =
        [const { None }; IOV_CHUNK];
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; IOV_CHUNK];
    for (i, b) in bufs[..n].iter().enumerate() {
        let start = if i == 0 { skip } else { 0 };
        let g = guards[i].insert(b.ptr_guard_mut());
        iov[i] = libc::iovec {
            // SAFETY: `start <= b.len()`, so the pointer stays within (or
            // one past) the slice's mapping, which the guard keeps alive.
            iov_base: unsafe { g.as_ptr().add(start) }.cast(),
            iov_len: b.len() - start,
        };
    }
    let r = if write {
        // SAFETY: each iovec describes live guest memory kept mapped by
        // `guards` until after the call; pwritev only reads it.
        unsafe { libc::pwritev(fd, iov.as_ptr(), n as i32, offset) }
    } else {
        // SAFETY: as above; preadv writes at most `iov_len` bytes into each
        // buffer, all guest memory the guest gave us to fill.
        unsafe { libc::preadv(fd, iov.as_ptr(), n as i32, offset) }
    };
    // `guards` lives to the end of the function, past the syscall.
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Moves every byte of `bufs` to or from the image at `offset`, looping
/// over short transfers and `EINTR`. A read that hits end-of-file
/// zero-fills the rest; a write that makes no progress fails.
pub(crate) fn transfer_all(
    fd: i32,
    mut offset: u64,
    bufs: &[VolatileSlice<'_>],
    write: bool,
) -> io::Result<()> {
    let mut idx = 0;
    let mut skip = 0;
    while idx < bufs.len() {
        if skip >= bufs[idx].len() {
            idx += 1;
            skip = 0;
            continue;
        }
        let n = match transfer_once(fd, offset, &bufs[idx..], skip, write) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if write {
                return Err(io::ErrorKind::WriteZero.into());
            }
            zero_fill(&bufs[idx..], skip);
            return Ok(());
        }
        offset += n as u64;
        let mut left = n;
        while left > 0 && idx < bufs.len() {
            let avail = bufs[idx].len() - skip;
            if left < avail {
                skip += left;
                left = 0;
            } else {
                left -= avail;
                idx += 1;
                skip = 0;
            }
        }
    }
    Ok(())
}

/// Zeroes `bufs` from `skip` bytes into the first one.
fn zero_fill(bufs: &[VolatileSlice<'_>], skip: usize) {
    static ZEROES: [u8; 4096] = [0; 4096];
    for (i, b) in bufs.iter().enumerate() {
        let mut at = if i == 0 { skip } else { 0 };
        while at < b.len() {
            let n = (b.len() - at).min(ZEROES.len());
            if let Ok(s) = b.subslice(at, n) {
                s.copy_from(&ZEROES[..n]);
            }
            at += n;
        }
    }
}

impl BlockBackend for DiskFile {
    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        transfer_all(self.file.as_raw_fd(), offset, bufs, false)
    }

    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        transfer_all(self.file.as_raw_fd(), offset, bufs, true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sync()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if !self.punch_hole {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if len == 0 {
            return Ok(());
        }
        let r = self.fallocate(true, offset, len);
        if let Err(e) = &r {
            if is_unsupported(e) {
                self.punch_hole = false;
            }
        }
        r
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if len == 0 {
            return Ok(());
        }
        if self.zero_range {
            match self.fallocate(false, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => self.zero_range = false,
                Err(e) => return Err(e),
            }
        }
        if may_unmap && self.punch_hole {
            match self.fallocate(true, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => self.punch_hole = false,
                Err(e) => return Err(e),
            }
        }
        // Plain writes; O_DSYNC covers them in write-through mode.
        self.write_zeroes_slowly(offset, len)
    }
}
