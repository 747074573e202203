//! Handing the VM's destruction to a helper process, so that it is off the
//! VMM's own exit path. Runs on the thread that drops the [`super::KvmVm`]
//! (the CLI's main thread, or the library's `vm` thread); the helper is a
//! short-lived process of its own.
//!
//! Closing the last descriptor of a KVM VM makes the host destroy it,
//! which takes about 17 ms on a software KVM (most of it waiting, not CPU).
//! A process that exits holding that descriptor pays it too: its parent
//! sees the exit only after every descriptor is closed, so closing it on
//! another thread does not help. Instead, [`hand_off`] starts two helper
//! processes that share the VMM's address space (`CLONE_VM`, so nothing is
//! copied) but have descriptor tables of their own:
//!
//! 1. child A (`CLONE_VM | CLONE_VFORK`, on a small stack of its own; the
//!    calling thread waits until A ends) closes every descriptor except
//!    the VM's and the read end of a fresh pipe, starts child B and exits;
//! 2. the caller reaps A, and swaps its own VM descriptor for the pipe's
//!    write end (`dup3`; cheap: B still holds the VM), which the owner's
//!    usual close then releases;
//! 3. B (`CLONE_VM`), orphaned at once and so reaped by init (or the
//!    nearest subreaper), waits for the pipe's end of file (the VMM's
//!    reference is gone, or the VMM died), closes the VM descriptor — the
//!    host destroys the VM on B's time — and exits. B is a few
//!    instructions of assembly that use registers only: it never touches
//!    a stack or memory the VMM may since have freed, but one static byte.
//!
//! Sharing the address space also takes the unmapping of the VMM's memory
//! (the guest's included) off the VMM's exit: the last of the processes
//! to end, B, pays it. B holds nothing but the VM and the pipe: stdio
//! pipes, disks, sockets and locks are closed before the caller goes on.
//! A makes raw system calls only, and every signal is blocked in both (a
//! Ctrl-C to the terminal's process group must not run the VMM's
//! handlers there, and B has no stack for a signal frame).
//!
//! If anything fails (no `close_range`, a refused `clone`), the caller
//! closes the VM itself, as before. `LOCALD_VMM_INLINE_TEARDOWN=1` forces
//! that (for measuring, and as a debugging aid).

use std::os::fd::{AsRawFd, RawFd};

/// Environment variable that turns the hand-off off.
pub const INLINE_ENV: &str = "LOCALD_VMM_INLINE_TEARDOWN";

/// Hands `vm` to a helper process that closes it once the caller has let
/// go of it, when possible. Returns whether the helper holds it.
///
/// On success the caller's descriptor number no longer refers to the VM:
/// it has been replaced (atomically, `dup3`) by the write end of a pipe
/// whose read end the helper waits on, so the owner's usual `close` of
/// that number is what releases the helper.
pub(crate) fn hand_off(vm: &impl AsRawFd) -> bool {
    if std::env::var_os(INLINE_ENV).is_some_and(|v| v == "1") {
        return false;
    }
    let fd = vm.as_raw_fd();
    let mut pipe = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the local array.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return false;
    }
    let [read_end, write_end] = pipe;
    let status = with_signals_blocked(|| start_helpers(fd, read_end));
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

/// The `clone` flags of child A: shares the address space, and the
/// calling thread sleeps until A has ended (no exit signal).
pub(crate) const HELPER_A_FLAGS: u64 = (libc::CLONE_VM | libc::CLONE_VFORK) as u64;
/// The `clone` flags of child B: shares the address space, no exit signal.
pub(crate) const HELPER_B_FLAGS: u64 = libc::CLONE_VM as u64;

/// Child A's stack: it runs a few raw system calls only.
const STACK_SIZE: usize = 64 * 1024;

/// What child A gets from the caller.
#[derive(Clone, Copy)]
struct HelperArgs {
    fd: RawFd,
    read_end: RawFd,
}

/// Starts child A (see the module docs), reaps it and returns its exit
/// status: 0 when B holds the VM, `None` when A could not be started.
fn start_helpers(fd: RawFd, read_end: RawFd) -> Option<i32> {
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return None;
    }
    let mut args = HelperArgs { fd, read_end };
    // SAFETY: glibc's clone runs `helper_a` on the new stack (its top, 16-
    // byte aligned) in a child that shares our memory; with CLONE_VFORK
    // this thread sleeps until the child has ended, so `args` and the
    // stack outlive it. The child makes raw system calls only.
    let pid = unsafe {
        libc::clone(
            helper_a,
            stack.cast::<u8>().add(STACK_SIZE).cast(),
            HELPER_A_FLAGS as libc::c_int,
            (&mut args as *mut HelperArgs).cast(),
        )
    };
    let status = (pid > 0).then(|| reap(pid)).flatten();
    // SAFETY: A has ended (or never started): nothing runs on the stack.
    unsafe { libc::munmap(stack, STACK_SIZE) };
    status
}

/// Waits for child A (no exit signal: `__WCLONE`); its exit status.
fn reap(pid: libc::pid_t) -> Option<i32> {
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child A; `status` is a local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WCLONE) };
        if r == pid {
            return libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return None;
        }
    }
}

/// Child A: keeps only the VM and the pipe's read end, starts B; returns
/// (ends with) 0 if B runs. On the caller's memory and its thread's TLS,
/// with the caller asleep: raw system calls only, no allocation, no lock.
extern "C" fn helper_a(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the caller's `HelperArgs`, alive while it sleeps.
    let HelperArgs { fd, read_end } = unsafe { *(arg as *const HelperArgs) };
    // Block every signal, glibc's own two (32, 33) included, which
    // `pthread_sigmask` leaves out: B inherits this mask, and a signal
    // delivered to B would write its frame below B's stack pointer, in
    // this stack, which the caller unmaps once A has ended.
    let all: u64 = !0;
    // SAFETY: rt_sigprocmask reads the 8-byte set from a local; changes
    // this process's (A's) mask only.
    let blocked = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_BLOCK,
            &all as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
    if blocked != 0 {
        return 1;
    }
    if !close_all_but(fd, read_end) {
        return 1;
    }
    if start_b(fd, read_end) > 0 {
        0
    } else {
        1
    }
}

/// Somewhere for B's one-byte reads to land (their value is never used).
static B_SINK: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Starts child B: `clone(CLONE_VM)` with no stack of its own; in the
/// child, reads the pipe until end of file or an error, closes the VM and
/// exits, all in registers. Returns B's pid (or a negative errno) in A.
fn start_b(fd: RawFd, read_end: RawFd) -> i64 {
    let ret: i64;
    // SAFETY: the parent path is one `clone` system call (rax, rcx, r11
    // clobbered, as declared). The child path never returns to Rust: it
    // uses no stack, and no memory but B_SINK; it only makes the read,
    // close and exit system calls on the descriptors in r12/r13, which
    // syscall preserves, and ends with `exit`.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 3f",
            "2:",
            "mov eax, {read}",
            "mov rdi, r12",
            "mov rsi, r14",
            "mov edx, 1",
            "syscall",
            "test rax, rax",
            "jg 2b",
            "mov eax, {close}",
            "mov rdi, r13",
            "syscall",
            "mov eax, {exit}",
            "xor edi, edi",
            "syscall",
            "ud2",
            "3:",
            read = const libc::SYS_read,
            close = const libc::SYS_close,
            exit = const libc::SYS_exit,
            inlateout("rax") libc::SYS_clone => ret,
            in("rdi") HELPER_B_FLAGS,
            in("rsi") 0u64,
            in("rdx") 0u64,
            in("r10") 0u64,
            in("r8") 0u64,
            in("r12") read_end as i64,
            in("r13") fd as i64,
            in("r14") B_SINK.as_ptr(),
            out("rcx") _,
            out("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Closes every descriptor but `a` and `b` (`close_range` over the gaps).
fn close_all_but(a: RawFd, b: RawFd) -> bool {
    let (lo, hi) = (a.min(b) as libc::c_uint, a.max(b) as libc::c_uint);
    let range = |first: libc::c_uint, last: libc::c_uint| {
        // SAFETY: closes descriptors of this (child) process only: it has
        // a descriptor table of its own (no CLONE_FILES).
        first > last || unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) == 0 }
    };
    (lo == 0 || range(0, lo - 1)) && range(lo + 1, hi - 1) && range(hi + 1, libc::c_uint::MAX)
}
