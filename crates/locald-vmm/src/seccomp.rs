//! Seccomp filters, one allow-list per kind of thread (see docs/seccomp.md).
//!
//! Every thread the VM creates installs the filter of its kind on itself
//! before it touches guest-controlled data: vCPU threads before the first
//! `KVM_RUN`, device workers before their event loop, the console, publish
//! and agent threads before their first read. The thread that owns the
//! whole VMM (the CLI's main thread) installs the [`ThreadKind::Main`]
//! filter itself through [`install`]; the library never filters a thread it
//! did not create.
//!
//! A call outside the list raises `SIGSYS` (`SECCOMP_RET_TRAP`); the
//! handler, which runs on the offending thread, writes one line naming the
//! thread and the call to stderr and ends the process with [`EXIT_CODE`].
//!
//! Filters stack: a thread started by a filtered thread would be bound by
//! its parent's list too. So threads are started through [`spawn`]: from a
//! filtered thread the request goes to the *spawner*, a thread created
//! before the first filter is installed, whose only job is to start
//! threads (it never reads guest or client data). The spawner runs under
//! a filter of its own too ([`ThreadKind::Spawner`]): the union of every
//! other list (its threads inherit it, then narrow it to their own list)
//! plus what starting a thread takes — `clone` with `CLONE_THREAD` only,
//! `clone3` answered with `ENOSYS` (glibc then falls back to `clone`,
//! whose flags a filter can check), naming the new thread, and installing
//! that thread's filter.

mod bpf;
mod syscalls;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use bpf::{Action, Cond, Rule, Spec, Width};
use seccompiler::BpfProgram;

/// Exit status of a process one of whose filtered threads made a forbidden
/// system call (128 + SIGSYS, as if killed by that signal).
pub const EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// Environment variable of the self-test: when set to a thread kind
/// (`main`, `vcpu`, `worker`, `control`) or to a thread's name, that
/// thread makes a forbidden call right after installing its filter. Read
/// from the host environment only; nothing the guest does reaches it.
pub const SELFTEST_ENV: &str = "LOCALD_VMM_SECCOMP_SELFTEST";

/// Seccomp setup failures.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The kernel refused the filter (no seccomp support?).
    #[error("cannot install the seccomp filter on thread '{thread}': {err}")]
    Apply { thread: String, err: String },
    /// The kernel has no seccomp filter support.
    #[error("this kernel has no seccomp filter support ({0}); run with --no-seccomp")]
    Unsupported(std::io::Error),
}

/// The device behind a worker thread; each has its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// virtio-blk: positioned reads and writes, flushes on the image.
    Block,
    /// virtio-rng: getrandom.
    Rng,
    /// virtio-vsock: Unix sockets to host services, a timer.
    Vsock,
    /// virtio-fs: the passthrough file system (most file system calls).
    Fs,
    /// virtio-net: the TAP descriptor or passt's socket.
    Net,
    /// A device without a list of its own: the union of all of them.
    Other,
}

impl Device {
    /// The device of a worker named `name` (`virtio-blk vda`, `virtio-fs`…).
    pub fn from_worker_name(name: &str) -> Device {
        let kind = name.split_whitespace().next().unwrap_or("");
        match kind {
            "virtio-blk" => Device::Block,
            "virtio-rng" => Device::Rng,
            "virtio-vsock" => Device::Vsock,
            "virtio-fs" => Device::Fs,
            "virtio-net" => Device::Net,
            _ => Device::Other,
        }
    }
}

/// The kinds of thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The VMM's own thread: the CLI's main thread, and the library's `vm`
    /// thread behind [`crate::VirtualMachine::spawn`]. Waits for the guest,
    /// kicks and joins vCPUs, tears the VM down, talks to the agent and
    /// serves the control socket. No KVM calls, no process creation but
    /// the VM teardown's two helpers (see `kvm/teardown.rs`).
    Main,
    /// A vCPU thread: `KVM_RUN` and the few vCPU ioctls the exit handlers
    /// use, device emulation (eventfds), starting and stopping workers.
    Vcpu,
    /// A virtio device's worker thread.
    Worker(Device),
    /// Console input, published ports, agent stdin, signal handling:
    /// sockets and stdio, nothing else.
    Control,
    /// The seccomp spawner thread ([`spawn`]): starts threads for filtered
    /// threads. Its list is the union of all the others (the threads it
    /// starts inherit it) plus thread creation; no process creation but
    /// the `Main` list's teardown helpers.
    Spawner,
}

impl ThreadKind {
    /// Short label, as used by [`SELFTEST_ENV`] and in docs.
    pub fn label(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Worker(_) => "worker",
            ThreadKind::Control => "control",
            ThreadKind::Spawner => "spawner",
        }
    }

    const ALL: [ThreadKind; 10] = [
        ThreadKind::Spawner,
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Control,
        ThreadKind::Worker(Device::Block),
        ThreadKind::Worker(Device::Rng),
        ThreadKind::Worker(Device::Vsock),
        ThreadKind::Worker(Device::Fs),
        ThreadKind::Worker(Device::Net),
        ThreadKind::Worker(Device::Other),
    ];
}

// ---------------------------------------------------------------------------
// The allow-lists.

/// What every thread does: Rust's runtime and allocator (glibc malloc maps,
/// trims and protects arenas), locks and condition variables, sleeping,
/// clocks, logging to stderr, the vCPU kick signal's return, a HashMap's
/// random keys, closing descriptors, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_write,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// vCPU threads, besides `ioctl` (see [`vcpu_ioctls`]): eventfd reads and
/// writes (irqfds, queue notifications forwarded by the transport), and
/// what starting a device's worker takes (an eventfd, a duplicate of it, an
/// epoll instance). Resetting a device only signals and joins its worker,
/// which does the device's teardown itself
/// ([`crate::devices::virtio::worker::QueueHandler::on_stop`]).
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_eventfd2,
    libc::SYS_fcntl,
    libc::SYS_epoll_create1,
];

/// The spawner, besides the union of every other list: starting a thread
/// (`clone` restricted to `CLONE_THREAD` in [`spec`], glibc's stack
/// guard, robust futex list and restartable sequences), and what the new
/// thread does before its own filter is on: naming itself
/// (`prctl(PR_SET_NAME)`), `prctl(PR_SET_NO_NEW_PRIVS)` and
/// `seccomp(SECCOMP_SET_MODE_FILTER)` (restricted in [`spec`]).
const SPAWNER: &[i64] = &[libc::SYS_set_robust_list, libc::SYS_rseq];

/// Every worker: its event loop (epoll), queue eventfds (read), the
/// interrupt eventfd (write), duplicated descriptors.
const WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_fcntl,
];

/// virtio-blk: the image is read and written at offsets, flushed, and
/// punched or zeroed for DISCARD / WRITE_ZEROES.
const BLOCK: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
];

/// virtio-vsock: host Unix sockets (connect to `<uds>_<port>`, accept on
/// the hybrid socket), non-blocking I/O, a timer for retries.
const VSOCK: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// virtio-net: frames through the TAP descriptor or passt's socket.
const NET: &[i64] = &[
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// virtio-fs: fuse-backend-rs's passthrough file system, confined to the
/// shared directory by its own handles (`open_by_handle_at`), with
/// per-request credentials (`setres[ug]id`, `setfs[ug]id`).
const FS: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_getdents64,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_readv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_writev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_flistxattr,
    libc::SYS_fremovexattr,
    libc::SYS_getxattr,
    libc::SYS_lgetxattr,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_umask,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_flock,
    // Dropping the capabilities a share never needs, once at start
    // (devices/virtio/fs/caps.rs).
    libc::SYS_capget,
    libc::SYS_capset,
];

/// The VMM thread: stdio and the terminal, the agent and control sockets,
/// published-port listeners, kicking vCPUs (`tgkill`), tearing the VM
/// down (flushing disks, stopping passt, removing its socket directory),
/// and `--profile-guest`'s System.map; `kill` with SIGTERM only (see
/// [`spec`]). No KVM ioctl, no exec; `clone` only for the two teardown
/// helpers (see [`spec`]; threads come from the spawner).
const MAIN: &[i64] = &[
    // Snapshots: the private directory, the memory and state files.
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_flock,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_epoll_ctl,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_tgkill,
    libc::SYS_wait4,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_rt_sigtimedwait,
    // The VM teardown hand-off (kvm/teardown.rs): its first helper keeps
    // only the VM descriptor and a pipe (`close_range`: closing, as `close`
    // does); the pipe tells the second when the VMM let go of the VM.
    libc::SYS_close_range,
    libc::SYS_pipe2,
];

/// Console input, publish and agent-stdin threads, the CLI's signal
/// thread: stdio and sockets.
const CONTROL: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_connect,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_rt_sigtimedwait,
];

/// KVM ioctl numbers (`_IO*(KVMIO = 0xAE, nr, type)`).
pub mod kvm_ioctl {
    const fn io(dir: u64, nr: u64, size: u64) -> u64 {
        (dir << 30) | (size << 16) | (0xae << 8) | nr
    }
    const R: u64 = 2;
    const W: u64 = 1;
    /// KVM_RUN.
    pub const RUN: u64 = io(0, 0x80, 0);
    /// KVM_GET_REGS.
    pub const GET_REGS: u64 = io(
        R,
        0x81,
        std::mem::size_of::<kvm_bindings::kvm_regs>() as u64,
    );
    /// KVM_SET_REGS.
    pub const SET_REGS: u64 = io(
        W,
        0x82,
        std::mem::size_of::<kvm_bindings::kvm_regs>() as u64,
    );
    /// KVM_GET_SREGS.
    pub const GET_SREGS: u64 = io(
        R,
        0x83,
        std::mem::size_of::<kvm_bindings::kvm_sregs>() as u64,
    );
    /// KVM_TRANSLATE.
    pub const TRANSLATE: u64 = io(
        R | W,
        0x85,
        std::mem::size_of::<kvm_bindings::kvm_translation>() as u64,
    );
    /// KVM_GET_VCPU_EVENTS.
    pub const GET_VCPU_EVENTS: u64 = io(
        R,
        0x9f,
        std::mem::size_of::<kvm_bindings::kvm_vcpu_events>() as u64,
    );
    /// KVM_SET_VCPU_EVENTS.
    pub const SET_VCPU_EVENTS: u64 = io(
        W,
        0xa0,
        std::mem::size_of::<kvm_bindings::kvm_vcpu_events>() as u64,
    );
    /// KVM_GET_MSRS (the header only; the entries follow it).
    pub const GET_MSRS: u64 = io(
        R | W,
        0x88,
        std::mem::size_of::<kvm_bindings::kvm_msrs>() as u64,
    );
    /// KVM_GET_LAPIC.
    pub const GET_LAPIC: u64 = io(
        R,
        0x8e,
        std::mem::size_of::<kvm_bindings::kvm_lapic_state>() as u64,
    );
    /// KVM_GET_MP_STATE.
    pub const GET_MP_STATE: u64 = io(
        R,
        0x98,
        std::mem::size_of::<kvm_bindings::kvm_mp_state>() as u64,
    );
    /// KVM_GET_DEBUGREGS.
    pub const GET_DEBUGREGS: u64 = io(
        R,
        0xa1,
        std::mem::size_of::<kvm_bindings::kvm_debugregs>() as u64,
    );
    /// KVM_GET_XSAVE.
    pub const GET_XSAVE: u64 = io(
        R,
        0xa4,
        std::mem::size_of::<kvm_bindings::kvm_xsave>() as u64,
    );
    /// KVM_GET_XCRS.
    pub const GET_XCRS: u64 = io(
        R,
        0xa6,
        std::mem::size_of::<kvm_bindings::kvm_xcrs>() as u64,
    );
    /// KVM_GET_IRQCHIP (VM).
    pub const GET_IRQCHIP: u64 = io(
        R | W,
        0x62,
        std::mem::size_of::<kvm_bindings::kvm_irqchip>() as u64,
    );
    /// KVM_GET_CLOCK (VM).
    pub const GET_CLOCK: u64 = io(
        R,
        0x7c,
        std::mem::size_of::<kvm_bindings::kvm_clock_data>() as u64,
    );
    /// KVM_GET_PIT2 (VM).
    pub const GET_PIT2: u64 = io(
        R,
        0x9f,
        std::mem::size_of::<kvm_bindings::kvm_pit_state2>() as u64,
    );
}

/// The ioctls a vCPU thread makes once running: `KVM_RUN`, and for
/// instruction completion and profiling the register, translation and
/// event calls. Nothing that creates or reconfigures the VM.
///
/// Plus `TUNSETOFFLOAD`: a guest driver's DRIVER_OK activates its device on
/// the vCPU thread that wrote it, and virtio-net then tells the TAP which
/// offloads the guest accepted.
fn vcpu_ioctls() -> Vec<u64> {
    use kvm_ioctl::*;
    vec![
        RUN,
        GET_REGS,
        SET_REGS,
        GET_SREGS,
        TRANSLATE,
        GET_VCPU_EVENTS,
        SET_VCPU_EVENTS,
        TUNSETOFFLOAD,
        // A parked vCPU reads its own state for a snapshot.
        GET_MSRS,
        GET_LAPIC,
        GET_MP_STATE,
        GET_DEBUGREGS,
        GET_XSAVE,
        GET_XCRS,
    ]
}

/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`).
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// Terminal and socket ioctls: raw mode (TCGETS/TCSETS*), the window
/// size, non-blocking sockets (FIONBIO), close-on-exec.
fn stdio_ioctls() -> Vec<u64> {
    [
        libc::TCGETS,
        libc::TCSETS,
        libc::TCSETSW,
        libc::TCSETSF,
        libc::TIOCGWINSZ,
        libc::FIONBIO,
        libc::FIOCLEX,
    ]
    .to_vec()
}

/// Socket families a kind may create (`socket` arg 0).
fn socket_domains(kind: ThreadKind) -> &'static [i32] {
    match kind {
        ThreadKind::Main => &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6],
        ThreadKind::Control => &[libc::AF_UNIX],
        ThreadKind::Worker(Device::Vsock | Device::Other) => &[libc::AF_UNIX],
        ThreadKind::Spawner => &[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6],
        _ => &[],
    }
}

/// `(syscalls allowed with any arguments, allowed ioctl requests)`.
fn allowed(kind: ThreadKind) -> (Vec<i64>, Vec<u64>) {
    let mut calls: Vec<i64> = COMMON.to_vec();
    let mut ioctls = Vec::new();
    match kind {
        ThreadKind::Main => {
            calls.extend_from_slice(MAIN);
            ioctls = stdio_ioctls();
            // A snapshot reads the VM-wide state it saves (never sets it).
            ioctls.extend([
                kvm_ioctl::GET_IRQCHIP,
                kvm_ioctl::GET_CLOCK,
                kvm_ioctl::GET_PIT2,
            ]);
        }
        ThreadKind::Control => {
            calls.extend_from_slice(CONTROL);
            ioctls = stdio_ioctls();
        }
        ThreadKind::Vcpu => {
            calls.extend_from_slice(VCPU);
            ioctls = vcpu_ioctls();
        }
        ThreadKind::Spawner => {
            for kind in ThreadKind::ALL {
                if kind != ThreadKind::Spawner {
                    let (c, i) = allowed(kind);
                    calls.extend(c);
                    ioctls.extend(i);
                }
            }
            calls.extend_from_slice(SPAWNER);
        }
        ThreadKind::Worker(dev) => {
            calls.extend_from_slice(WORKER);
            let lists: &[&[i64]] = match dev {
                Device::Block => &[BLOCK],
                Device::Rng => &[],
                Device::Vsock => &[VSOCK],
                Device::Fs => &[FS],
                Device::Net => &[NET],
                Device::Other => &[BLOCK, VSOCK, FS, NET],
            };
            for l in lists {
                calls.extend_from_slice(l);
            }
            if matches!(dev, Device::Vsock | Device::Other) {
                ioctls.push(libc::FIONBIO);
            }
        }
    }
    calls.sort_unstable();
    calls.dedup();
    ioctls.sort_unstable();
    ioctls.dedup();
    (calls, ioctls)
}

/// The filter of `kind`: its syscalls, with the argument rules of some.
fn spec(kind: ThreadKind) -> Spec {
    let (calls, ioctls) = allowed(kind);
    let mut rules: BTreeMap<i64, Vec<Rule>> = calls.into_iter().map(|c| (c, Vec::new())).collect();
    // One rule per allowed value of a 32-bit argument.
    let any_of = |arg: u8, values: &mut dyn Iterator<Item = u64>| -> Vec<Rule> {
        values
            .map(|v| vec![Cond::eq(arg, Width::Dword, v)])
            .collect()
    };
    if !ioctls.is_empty() {
        rules.insert(libc::SYS_ioctl, any_of(1, &mut ioctls.into_iter()));
    }
    if matches!(kind, ThreadKind::Main | ThreadKind::Spawner) {
        // Stopping passt when the VM is dropped: SIGTERM and nothing else.
        rules.insert(
            libc::SYS_kill,
            any_of(1, &mut [libc::SIGTERM as u64].into_iter()),
        );
        // Reading (never setting) this process's limits: glibc's
        // `getrlimit` is `prlimit64(0, resource, NULL, old)`. The error
        // line names the descriptor limit when a setup step ran out.
        rules.insert(
            libc::SYS_prlimit64,
            vec![vec![
                Cond::eq(0, Width::Qword, 0),
                Cond::eq(2, Width::Qword, 0),
            ]],
        );
        // The VM teardown hand-off (kvm/teardown.rs): its two helper
        // processes, which share the address space but nothing else (no
        // exit signal). They run under this same filter (no exec), close
        // descriptors and exit; the Spawner's own `clone` rule below adds
        // the threads.
        rules.insert(libc::SYS_clone, teardown_helpers());
    }
    if kind == ThreadKind::Spawner {
        // Threads only: glibc's pthread_create passes CLONE_THREAD (and
        // CLONE_VM, CLONE_SIGHAND); a fork-like clone lacks it.
        let thread = libc::CLONE_THREAD as u64;
        // The `vm` thread (a Main thread started here) stays under this
        // filter too: it needs the teardown's helpers as well.
        let mut clone = teardown_helpers();
        clone.push(vec![Cond::masked_eq(0, Width::Qword, thread, thread)]);
        rules.insert(libc::SYS_clone, clone);
        // Allowed here, answered with ENOSYS by [`clone3_enosys`]'s
        // filter (a stricter action wins): its flags are behind a pointer.
        rules.insert(libc::SYS_clone3, Vec::new());
        rules.insert(
            libc::SYS_prctl,
            any_of(
                0,
                &mut [libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64].into_iter(),
            ),
        );
        rules.insert(
            libc::SYS_seccomp,
            any_of(0, &mut [libc::SECCOMP_SET_MODE_FILTER as u64].into_iter()),
        );
    }
    let domains = socket_domains(kind);
    if !domains.is_empty() {
        rules.insert(
            libc::SYS_socket,
            any_of(0, &mut domains.iter().map(|&d| d as u64)),
        );
    }
    Spec {
        calls: rules,
        on_match: Action::Allow,
        otherwise: Action::Trap,
    }
}

/// `clone` with exactly the flags of the teardown hand-off's two helpers
/// (arg 0, all 64 bits compared), see kvm/teardown.rs.
fn teardown_helpers() -> Vec<Rule> {
    [
        crate::kvm::teardown::HELPER_A_FLAGS,
        crate::kvm::teardown::HELPER_B_FLAGS,
    ]
    .into_iter()
    .map(|flags| vec![Cond::eq(0, Width::Qword, flags)])
    .collect()
}

/// The spawner's second filter: `clone3` fails with `ENOSYS`, everything
/// else passes (to the union filter). glibc then starts threads with
/// `clone`, whose flags [`spec`] checks.
fn clone3_enosys_spec() -> Spec {
    Spec {
        calls: BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        on_match: Action::Errno(libc::ENOSYS as u32),
        otherwise: Action::Allow,
    }
}

/// [`clone3_enosys_spec`]'s program, built once per process.
fn clone3_enosys() -> &'static BpfProgram {
    static PROG: OnceLock<BpfProgram> = OnceLock::new();
    PROG.get_or_init(|| clone3_enosys_spec().compile())
}

/// The compiled filter of `kind`, built once per process.
fn program(kind: ThreadKind) -> &'static BpfProgram {
    type Cache = Mutex<BTreeMap<ThreadKind, &'static BpfProgram>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = map.get(&kind) {
        return p;
    }
    // Leaked on purpose: a handful of small programs, kept for the process.
    let p: &'static BpfProgram = Box::leak(Box::new(spec(kind).compile()));
    map.insert(kind, p);
    p
}

/// Checks that the kernel supports seccomp filters; called when a VM with
/// seccomp on is created. Each thread kind's filter is compiled when a
/// thread of that kind first installs it (most VMs use a few of the ten):
/// the lists are constants, and the unit test `every_filter_compiles`
/// compiles every one of them, so that compilation cannot fail later.
pub fn check() -> Result<(), SeccompError> {
    // SAFETY: PR_GET_SECCOMP takes no pointer and only reports the mode.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
        return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Installing, and the SIGSYS handler.

const NAME_MAX: usize = 48;

thread_local! {
    /// This thread's name for the SIGSYS message (NUL-padded), set before
    /// its filter is installed; empty on threads we did not filter.
    static THREAD_NAME: Cell<[u8; NAME_MAX]> = const { Cell::new([0; NAME_MAX]) };
    /// Whether this thread runs under one of our filters.
    static FILTERED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread runs under one of our filters.
pub fn is_filtered() -> bool {
    FILTERED.with(Cell::get)
}

/// Installs the filter of `kind` on the calling thread, named `name` in
/// violation messages. Creates the spawner first (from this still
/// unfiltered thread) and installs the SIGSYS handler. Irreversible: the
/// thread stays filtered until it ends.
pub fn install(kind: ThreadKind, name: &str) -> Result<(), SeccompError> {
    let prog = program(kind);
    install_sigsys_handler();
    spawner();
    apply(kind, name, &[prog])
}

/// Names the calling thread for the SIGSYS message and installs `progs`
/// on it, then runs the self-test.
fn apply(kind: ThreadKind, name: &str, progs: &[&BpfProgram]) -> Result<(), SeccompError> {
    let mut buf = [0u8; NAME_MAX];
    let n = name.len().min(NAME_MAX);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
    for prog in progs {
        seccompiler::apply_filter(prog).map_err(|e| SeccompError::Apply {
            thread: name.to_string(),
            err: e.to_string(),
        })?;
    }
    FILTERED.with(|c| c.set(true));
    tracing::debug!(
        "seccomp: {} filter installed on thread '{name}'",
        kind.label()
    );
    selftest(kind, name);
    Ok(())
}

/// With [`SELFTEST_ENV`] naming this thread's kind or name, makes a call no
/// list allows (`ptrace` with an invalid request, harmless if it ran).
fn selftest(kind: ThreadKind, name: &str) {
    let Some(want) = std::env::var_os(SELFTEST_ENV) else {
        return;
    };
    if selftest_selects(want.as_encoded_bytes(), kind, name) {
        // SAFETY: ptrace with an invalid request and no pointers; the
        // filter traps it before the kernel looks at the arguments.
        unsafe { libc::syscall(libc::SYS_ptrace, -1i64, 0, 0, 0) };
    }
}

/// Whether the self-test value `want` selects the thread `name` of `kind`:
/// its name, or its kind's label. The `vcpu` label selects `vcpu 0` only:
/// the vCPU threads start together, and whichever installed its filter
/// first would otherwise report, so the reported name would vary.
fn selftest_selects(want: &[u8], kind: ThreadKind, name: &str) -> bool {
    if want == name.as_bytes() {
        return true;
    }
    want == kind.label().as_bytes() && (kind != ThreadKind::Vcpu || name == "vcpu 0")
}

fn install_sigsys_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; we fill in the handler and flags before using it.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler that only uses async-signal-safe
        // calls (write, _exit) on valid data; the old action is not needed.
        unsafe {
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut());
        }
    });
}

/// A fixed buffer the SIGSYS handler formats its line into.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn push_dec(&mut self, mut n: u64) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&d[i..]);
    }
    fn push_hex(&mut self, n: u64) {
        self.push(b"0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let nib = ((n >> (shift * 4)) & 0xf) as u8;
            if nib != 0 || started || shift == 0 {
                started = true;
                self.push(&[b"0123456789abcdef"[nib as usize]]);
            }
        }
    }
}

/// Formats the violation line (no allocation; used by the handler).
fn violation_line(thread: &[u8], nr: i64, arg1: u64) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.push(b"seccomp: thread '");
    let name_len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    if name_len == 0 {
        l.push(b"?");
    } else {
        l.push(&thread[..name_len]);
    }
    l.push(b"' made forbidden syscall ");
    l.push_dec(nr as u64);
    if let Some(name) = syscalls::name(nr) {
        l.push(b" (");
        l.push(name.as_bytes());
        if nr == libc::SYS_ioctl {
            l.push(b" request ");
            l.push_hex(arg1);
        }
        l.push(b")");
    }
    l.push(b"; the VMM stops (debug with --no-seccomp, see docs/seccomp.md)\n");
    l
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for
    // SYS_SECCOMP its `_sigsys` member holds the call number as the int at
    // byte offset 24 (after signo, errno, code, padding and call_addr).
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() } as i64;
    // SAFETY: with SA_SIGINFO the third argument is the interrupted
    // thread's ucontext; RSI holds the call's second argument.
    let arg1 = unsafe {
        let uc = &*(ctx as *const libc::ucontext_t);
        uc.uc_mcontext.gregs[libc::REG_RSI as usize] as u64
    };
    let name = THREAD_NAME.with(Cell::get);
    let line = violation_line(&name, nr, arg1);
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_CODE);
    }
}

// ---------------------------------------------------------------------------
// Starting threads.

type Job = Box<dyn FnOnce() + Send>;

/// Name of the spawner thread (also its name in violation messages).
pub const SPAWNER_NAME: &str = "seccomp spawner";

/// The spawner's queue, created (with its thread) on first use, from the
/// first thread that installs a filter, just before it does. The spawner
/// filters itself ([`ThreadKind::Spawner`]) before it starts any thread.
fn spawner() -> &'static Mutex<mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        // If this fails the process cannot start threads at all; filtered
        // threads then get an error from `spawn`.
        let _ = std::thread::Builder::new()
            .name(SPAWNER_NAME.into())
            .spawn(move || {
                let filtered = apply(
                    ThreadKind::Spawner,
                    SPAWNER_NAME,
                    &[clone3_enosys(), program(ThreadKind::Spawner)],
                );
                if let Err(e) = filtered {
                    // Never start threads from an unfiltered spawner.
                    eprintln!("locald-vmm: {e}");
                    std::process::exit(EXIT_CODE);
                }
                for job in rx {
                    job();
                }
            });
        Mutex::new(tx)
    })
}

/// Starts a thread named `name` running `f`. With `kind`, the new thread
/// first installs that kind's filter (and ends the process, as a violation
/// would, if it cannot). From a filtered thread the thread is started by
/// the spawner, so it does not inherit the caller's filter.
pub fn spawn<F, T>(name: String, kind: Option<ThreadKind>, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let tname = name.clone();
    let body = move || {
        if let Some(kind) = kind {
            if let Err(e) = install(kind, &tname) {
                // Never run unfiltered when a filter was asked for.
                eprintln!("locald-vmm: {e}");
                std::process::exit(EXIT_CODE);
            }
        }
        f()
    };
    if !is_filtered() {
        return std::thread::Builder::new().name(name).spawn(body);
    }
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(std::thread::Builder::new().name(name).spawn(body));
    });
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| std::io::Error::other("the seccomp spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the seccomp spawner thread is gone"))?
}

/// Like [`spawn`], filtering the new thread with `kind` only when the
/// calling thread is filtered itself: threads that serve a filtered VMM
/// are filtered, library callers that opted out are left alone.
pub fn spawn_inherit<F, T>(name: String, kind: ThreadKind, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn(name, is_filtered().then_some(kind), f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in ThreadKind::ALL {
            let p = program(kind);
            assert!(!p.is_empty(), "{kind:?}");
        }
        assert!(!clone3_enosys().is_empty());
        check().unwrap();
    }

    /// Every kind's program decides every syscall as seccompiler's
    /// program for the same list does, and is a fraction of its size.
    #[test]
    fn every_filter_matches_seccompilers() {
        for (i, kind) in ThreadKind::ALL.into_iter().enumerate() {
            bpf::tests::assert_same(&spec(kind), i as u64 + 1);
        }
        bpf::tests::assert_same(&clone3_enosys_spec(), 99);
        // seccompiler: 833 instructions for the union, 490 for `main`.
        let union = program(ThreadKind::Spawner).len();
        assert!(union < 300, "the union filter has {union} instructions");
        let main = program(ThreadKind::Main).len();
        assert!(main < 200, "the main filter has {main} instructions");
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(kvm_ioctl::RUN, 0xae80);
        assert_eq!(kvm_ioctl::GET_REGS, 0x8090_ae81);
        assert_eq!(kvm_ioctl::SET_REGS, 0x4090_ae82);
        assert_eq!(kvm_ioctl::GET_SREGS, 0x8138_ae83);
        assert_eq!(kvm_ioctl::TRANSLATE, 0xc018_ae85);
        assert_eq!(kvm_ioctl::GET_VCPU_EVENTS, 0x8040_ae9f);
        assert_eq!(kvm_ioctl::GET_MSRS, 0xc008_ae88);
        assert_eq!(kvm_ioctl::GET_LAPIC, 0x8400_ae8e);
        assert_eq!(kvm_ioctl::GET_MP_STATE, 0x8004_ae98);
        assert_eq!(kvm_ioctl::GET_DEBUGREGS, 0x8080_aea1);
        assert_eq!(kvm_ioctl::GET_XSAVE, 0x9000_aea4);
        assert_eq!(kvm_ioctl::GET_XCRS, 0x8188_aea6);
        assert_eq!(kvm_ioctl::GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(kvm_ioctl::GET_CLOCK, 0x8030_ae7c);
        assert_eq!(kvm_ioctl::GET_PIT2, 0x8070_ae9f);
        assert_eq!(kvm_ioctl::SET_VCPU_EVENTS, 0x4040_aea0);
    }

    #[test]
    fn lists_keep_dangerous_calls_out() {
        for kind in ThreadKind::ALL {
            let (calls, _) = allowed(kind);
            for bad in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_kill,
                libc::SYS_setns,
                libc::SYS_unshare,
                libc::SYS_process_vm_writev,
            ] {
                assert!(!calls.contains(&bad), "{kind:?} allows {bad}");
            }
        }
        // Only vCPUs may call KVM, and only their run-time ioctls.
        let (_, main_ioctls) = allowed(ThreadKind::Main);
        assert!(!main_ioctls.contains(&kvm_ioctl::RUN));
        let (vcpu_calls, _) = allowed(ThreadKind::Vcpu);
        assert!(!vcpu_calls.contains(&libc::SYS_openat));
    }

    #[test]
    fn worker_names_map_to_devices() {
        assert_eq!(Device::from_worker_name("virtio-blk vdb"), Device::Block);
        assert_eq!(Device::from_worker_name("virtio-fs"), Device::Fs);
        assert_eq!(Device::from_worker_name("virtio-net"), Device::Net);
        assert_eq!(Device::from_worker_name("virtio-vsock"), Device::Vsock);
        assert_eq!(Device::from_worker_name("virtio-rng"), Device::Rng);
        assert_eq!(Device::from_worker_name("test worker"), Device::Other);
    }

    #[test]
    fn violation_line_names_thread_and_call() {
        let mut name = [0u8; NAME_MAX];
        name[..6].copy_from_slice(b"vcpu 0");
        let l = violation_line(&name, libc::SYS_ptrace, 0);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            s.starts_with("seccomp: thread 'vcpu 0' made forbidden syscall 101 (ptrace)"),
            "{s}"
        );
        let l = violation_line(&[0; NAME_MAX], libc::SYS_ioctl, 0xae01);
        let s = std::str::from_utf8(&l.buf[..l.len]).unwrap();
        assert!(
            s.contains("thread '?'") && s.contains("(ioctl request 0xae01)"),
            "{s}"
        );
    }

    #[test]
    fn the_vcpu_selftest_label_selects_vcpu_0_only() {
        assert!(selftest_selects(b"vcpu", ThreadKind::Vcpu, "vcpu 0"));
        assert!(!selftest_selects(b"vcpu", ThreadKind::Vcpu, "vcpu 1"));
        assert!(selftest_selects(b"vcpu 1", ThreadKind::Vcpu, "vcpu 1"));
        assert!(selftest_selects(b"main", ThreadKind::Main, "vm"));
        let rng = ThreadKind::Worker(Device::Rng);
        assert!(selftest_selects(b"worker", rng, "virtio-rng"));
        assert!(selftest_selects(
            b"spawner",
            ThreadKind::Spawner,
            SPAWNER_NAME
        ));
        assert!(!selftest_selects(b"control", ThreadKind::Main, "main"));
    }

    /// The spawner's list is a superset of every other (its threads
    /// inherit it) and still has nothing dangerous unconditionally.
    #[test]
    fn the_spawner_list_covers_every_other_list() {
        let (spawner, spawner_ioctls) = allowed(ThreadKind::Spawner);
        for kind in ThreadKind::ALL {
            let (calls, ioctls) = allowed(kind);
            for c in calls {
                assert!(spawner.contains(&c), "{kind:?}: {c} missing");
            }
            for i in ioctls {
                assert!(
                    spawner_ioctls.contains(&i),
                    "{kind:?}: ioctl {i:#x} missing"
                );
            }
            let d = socket_domains(kind);
            assert!(d
                .iter()
                .all(|x| socket_domains(ThreadKind::Spawner).contains(x)));
        }
    }

    /// Under the spawner's two filters (installed in a forked child): a
    /// thread-creating `clone` passes the filter, `clone3` fails with
    /// ENOSYS, and a fork-like `clone` is trapped (SIGSYS, no handler in
    /// the child).
    #[test]
    fn the_spawner_filter_refuses_processes_and_clone3() {
        let union = program(ThreadKind::Spawner);
        let enosys = clone3_enosys();
        // SAFETY: the child only makes raw system calls (no allocation, no
        // locks) and leaves with _exit; the parent waits for it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: see above; the programs were built before the fork.
            unsafe {
                let apply = |p: &BpfProgram| {
                    let prog = libc::sock_fprog {
                        len: p.len() as u16,
                        filter: p.as_ptr() as *mut libc::sock_filter,
                    };
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                        && libc::syscall(
                            libc::SYS_seccomp,
                            libc::SECCOMP_SET_MODE_FILTER,
                            0,
                            &prog as *const libc::sock_fprog,
                        ) == 0
                };
                if !apply(enosys) || !apply(union) {
                    libc::_exit(10);
                }
                // clone3 with a null argument: ENOSYS from the filter
                // (EFAULT/EINVAL would mean the kernel saw it).
                let r = libc::syscall(libc::SYS_clone3, 0usize, 0usize);
                if r != -1 || *libc::__errno_location() != libc::ENOSYS {
                    libc::_exit(11);
                }
                // A fork: trapped before it runs.
                libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
                libc::_exit(12);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        // Killed by SIGSYS, or our handler's exit status if another test
        // of this process installed it before the fork.
        let trapped = (libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS)
            || (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == EXIT_CODE);
        assert!(
            trapped,
            "child status {status:#x} (exit {})",
            libc::WEXITSTATUS(status)
        );
    }
}
