//! SIGINT and SIGTERM for `run` and `serve`: the first asks the guest to
//! power off cleanly (the agent's Shutdown when the VM has an agent,
//! otherwise the VM is stopped), and stops it by force if it has not ended
//! within [`GRACE`]; a second signal stops it at once. The process then
//! exits as usual (disks flushed, sockets and state removed) with status
//! 128 + the signal's number (130 for SIGINT, 143 for SIGTERM); if that
//! teardown is still not done [`FORCED_EXIT`] after the forced stop, the
//! process exits anyway with the same status.
//!
//! The handler only writes the signal's number to a pipe (async-signal
//! safe); a thread named `signals` reads the pipe and does the work. It is
//! installed with SA_RESTART, so interrupted system calls resume; signal
//! masks are left alone, since child processes (passt) inherit them.
//! The `signals` thread runs under the `control` seccomp filter when
//! seccomp is on.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use locald_vmm::seccomp::{self, ThreadKind};
use locald_vmm::VmStopper;

/// How long the guest gets to power off after the first signal.
pub(crate) const GRACE: Duration = Duration::from_secs(10);
/// How long teardown may take once the VM was stopped by force before the
/// process exits anyway: a signal must end the VMM, whatever it waits on.
pub(crate) const FORCED_EXIT: Duration = Duration::from_secs(10);

/// The first signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);
/// The VM the signals stop, once there is one.
static TARGET: Mutex<Option<VmStopper>> = Mutex::new(None);

/// The pipe's write end, for the handler (-1 before [`setup`]).
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write is async-signal-safe; one byte from our stack. A full
    // pipe (many signals at once) loses nothing that matters.
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

/// Installs the SIGINT/SIGTERM handlers and starts the `signals` thread
/// (filtered with the `control` list when `filtered`).
pub(crate) fn setup(filtered: bool) -> std::io::Result<()> {
    // A socket pair rather than pipe2 (not on macOS): close-on-exec by
    // default on every platform, and non-blocking on both ends.
    let (read_end, write_end) = std::os::unix::net::UnixStream::pair()?;
    read_end.set_nonblocking(true)?;
    write_end.set_nonblocking(true)?;
    let read_end = OwnedFd::from(read_end);
    // The write end stays open for the process's life (the handler uses it).
    PIPE_WRITE.store(write_end.into_raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
        // handler only calls write on a descriptor that stays open.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    let kind = filtered.then_some(ThreadKind::Control);
    seccomp::spawn("signals".into(), kind, move || watch(read_end))?;
    Ok(())
}

/// The next signal from the pipe, waiting at most 200 ms.
fn next_signal(pipe: &OwnedFd) -> Option<i32> {
    let mut p = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut p, 1, 200) } <= 0 {
        return None;
    }
    let mut b = 0u8;
    // SAFETY: reads one byte into `b`.
    let n = unsafe { libc::read(pipe.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
    (n == 1).then_some(i32::from(b))
}

/// Sets the VM the signals stop. A signal that came before it existed
/// stops it at once.
pub(crate) fn set_target(stopper: VmStopper) {
    if RECEIVED.load(Ordering::SeqCst) != 0 {
        stopper.force_stop();
    }
    *TARGET.lock().unwrap_or_else(|e| e.into_inner()) = Some(stopper);
}

/// The first signal received, if any.
pub(crate) fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit status for a run ended by signal `sig`.
pub(crate) fn exit_code(sig: i32) -> u8 {
    (128 + sig).clamp(0, 255) as u8
}

fn target() -> Option<VmStopper> {
    TARGET.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// The `signals` thread.
fn watch(pipe: OwnedFd) {
    let mut count = 0u32;
    let mut deadline: Option<Instant> = None;
    // When the VM was stopped by force (None: not yet).
    let mut forced_at: Option<Instant> = None;
    loop {
        if let Some(sig) = next_signal(&pipe) {
            count += 1;
            if count == 1 {
                RECEIVED.store(sig, Ordering::SeqCst);
                deadline = Some(Instant::now() + GRACE);
                eprintln!(
                    "locald-vmm: {}: stopping the VM (send it again to stop at once)",
                    name(sig)
                );
                // No VM yet: `set_target` stops it as soon as there is one.
                if let Some(t) = target() {
                    // The agent call can take a while: not on this thread,
                    // which must stay ready for a second signal.
                    let r =
                        seccomp::spawn_inherit("shutdown".into(), ThreadKind::Control, move || {
                            t.request_shutdown();
                        });
                    if r.is_err() {
                        forced_at = Some(force("cannot start the shutdown request"));
                    }
                }
            } else if forced_at.is_none() {
                eprintln!("locald-vmm: {}: stopping the VM now", name(sig));
                if target().is_none() {
                    // Still setting up: nothing to tear down yet.
                    exit_now();
                }
                forced_at = Some(force("second signal"));
            }
        }
        if forced_at.is_none() && deadline.is_some_and(|d| Instant::now() >= d) {
            eprintln!(
                "locald-vmm: the guest did not power off within {}s; stopping it",
                GRACE.as_secs()
            );
            forced_at = Some(force("grace period over"));
        }
        if forced_at.is_some_and(|t| t.elapsed() >= FORCED_EXIT) {
            eprintln!(
                "locald-vmm: still not done {}s after stopping the VM; exiting",
                FORCED_EXIT.as_secs()
            );
            exit_now();
        }
    }
}

/// Stops the VM by force; returns when, for the [`FORCED_EXIT`] deadline.
fn force(why: &str) -> Instant {
    tracing::info!("stopping the VM by force: {why}");
    if let Some(t) = target() {
        t.force_stop();
    }
    Instant::now()
}

/// Ends the process now with the status of the first signal.
fn exit_now() -> ! {
    std::process::exit(i32::from(exit_code(RECEIVED.load(Ordering::SeqCst))))
}
