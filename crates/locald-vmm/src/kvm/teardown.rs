//! Handing the VM's destruction to a helper process, so that it is off the
//! VMM's own exit path. Runs on the thread that drops the [`super::KvmVm`]
//! (the CLI's main thread, or the library's `vm` thread); the helper is a
//! short-lived process of its own.
//!
//! Closing the last descriptor of a KVM VM makes the host destroy it,
//! which takes about 17 ms on a software KVM (most of it waiting, not CPU).
//! A process that exits holding that descriptor pays it too: its parent
//! sees the exit only after every descriptor is closed, so closing it on
//! another thread does not help. Instead, [`hand_off`] forks twice:
//!
//! 1. child A (a plain `clone` with no flags: its own copy of the address
//!    space and descriptor table, no exit signal) closes every descriptor
//!    except the VM's and the read end of a fresh pipe, forks child B and
//!    exits;
//! 2. the caller reaps A (a few hundred microseconds), and swaps its own
//!    VM descriptor for the pipe's write end (`dup3`; cheap: B still holds
//!    the VM), which the owner's usual close then releases;
//! 3. B, orphaned at once and so reaped by init (or the nearest
//!    subreaper), waits for the pipe's end of file (the VMM's reference is
//!    gone, or the VMM died), closes the VM descriptor — the host destroys
//!    the VM on B's time — and exits.
//!
//! B holds nothing but the VM and the pipe: stdio pipes, disks, sockets
//! and locks are closed before the caller goes on. Neither child allocates or takes a
//! lock; they make raw system calls only (a fork of a threaded process).
//! Signals are blocked in both (a Ctrl-C to the terminal's process group
//! must not run the VMM's handlers in a copy). Guest memory is marked
//! `MADV_DONTFORK` first, so the copies cost page tables for the VMM's own
//! few megabytes only, whatever the guest's size.
//!
//! If anything fails (no `close_range`, a refused `clone`), the caller
//! closes the VM itself, as before. `LOCALD_VMM_INLINE_TEARDOWN=1` forces
//! that (for measuring, and as a debugging aid).

use std::os::fd::{AsRawFd, RawFd};

use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// Environment variable that turns the hand-off off.
pub const INLINE_ENV: &str = "LOCALD_VMM_INLINE_TEARDOWN";

/// Hands `vm` to a helper process that closes it once the caller has let
/// go of it, when possible. Returns whether the helper holds it.
///
/// On success the caller's descriptor number no longer refers to the VM:
/// it has been replaced (atomically, `dup3`) by the write end of a pipe
/// whose read end the helper waits on, so the owner's usual `close` of
/// that number is what releases the helper. `mem` is the guest memory,
/// kept out of the helpers' address spaces.
pub(crate) fn hand_off(vm: &impl AsRawFd, mem: &GuestMemoryMmap) -> bool {
    if std::env::var_os(INLINE_ENV).is_some_and(|v| v == "1") {
        return false;
    }
    for region in mem.iter() {
        // SAFETY: the range is a live mapping owned by `mem`; DONTFORK only
        // keeps it out of children, it changes nothing in this process.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTFORK,
            )
        };
    }
    let fd = vm.as_raw_fd();
    let mut pipe = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return false;
    }
    let [read_end, write_end] = pipe;
    let status = with_signals_blocked(|| fork_helpers(fd, read_end));
    let held = status == Some(0)
        // SAFETY: replaces this process's VM descriptor (the helper holds
        // the VM now) by the pipe's write end; the owner closes it later.
        && unsafe { libc::dup3(write_end, fd, libc::O_CLOEXEC) } == fd;
    // SAFETY: our own pipe descriptors, not used again. If the helper does
    // not hold the VM, this closing lets it go (it then holds nothing).
    unsafe {
        libc::close(read_end);
        libc::close(write_end);
    }
    if held {
        tracing::debug!("VM teardown handed to a helper process");
    } else {
        tracing::debug!("VM teardown hand-off failed (helper status {status:?}); closing here");
    }
    held
}

/// Runs `f` with every signal blocked on this thread (the children start
/// with this mask), then restores the mask.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: all-zero is a valid sigset_t to fill; both sets are locals.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigfillset and pthread_sigmask write only the given sets.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let r = f();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    r
}

/// Forks child A (see the module docs), reaps it and returns its exit
/// status: 0 when B holds the VM, `None` when A could not be started.
fn fork_helpers(fd: RawFd, read_end: RawFd) -> Option<i32> {
    // SAFETY: a fork without flags (x86_64 clone(flags, stack=0, ...)):
    // the child gets a copy of this thread on a copy of the address space
    // and runs only `helper_a`, which makes raw system calls and never
    // returns.
    let pid = unsafe { libc::syscall(libc::SYS_clone, 0u64, 0u64, 0u64, 0u64, 0u64) };
    if pid == 0 {
        helper_a(fd, read_end);
    }
    if pid < 0 {
        return None;
    }
    let pid = pid as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child A (no exit signal: __WCLONE);
        // `status` is a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WCLONE) };
        if r == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// Child A: keeps only `fd` and `read_end`, starts B, exits 0 if B runs.
fn helper_a(fd: RawFd, read_end: RawFd) -> ! {
    let ok = close_all_but(fd, read_end) && {
        // SAFETY: as in `fork_helpers`; B runs only `helper_b`.
        let pid = unsafe { libc::syscall(libc::SYS_clone, 0u64, 0u64, 0u64, 0u64, 0u64) };
        if pid == 0 {
            helper_b(fd, read_end);
        }
        pid > 0
    };
    exit(if ok { 0 } else { 1 })
}

/// Child B: waits until every write end of the pipe is closed (the VMM
/// has closed its own VM descriptor, or has ended), then closes the VM —
/// the host destroys it now — and exits.
fn helper_b(fd: RawFd, read_end: RawFd) -> ! {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads into a local byte from our own pipe.
        let n = unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) };
        if n <= 0 {
            break;
        }
    }
    // SAFETY: closes a descriptor this process owns.
    unsafe { libc::close(fd) };
    exit(0)
}

/// Closes every descriptor but `a` and `b` (`close_range` over the gaps).
fn close_all_but(a: RawFd, b: RawFd) -> bool {
    let (lo, hi) = (a.min(b) as libc::c_uint, a.max(b) as libc::c_uint);
    let range = |first: libc::c_uint, last: libc::c_uint| {
        // SAFETY: closes descriptors of this (child) process only.
        first > last || unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) == 0 }
    };
    (lo == 0 || range(0, lo - 1)) && range(lo + 1, hi - 1) && range(hi + 1, libc::c_uint::MAX)
}

fn exit(code: i32) -> ! {
    // SAFETY: ends this (child) process at once: no atexit handlers, no
    // destructors, nothing shared with the parent is touched.
    unsafe { libc::_exit(code) }
}
