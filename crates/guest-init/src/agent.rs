//! Agent mode (`/.locald/agent`): instead of one command from
//! `/.locald/argv`, serve commands from the host over vsock (protocol:
//! `locald_agent_proto`) until the host or the guest powers off.
//!
//! Processes:
//! - **PID 1** ([`run`]) forks the listener and then does only what it does
//!   in command mode: reap every child (orphans included) and wait for the
//!   power signals with `sigwaitinfo`. `SIGUSR1`/`SIGUSR2` (`halt`,
//!   `poweroff`, a `Shutdown` frame) → shutdown sequence, exit code 0;
//!   `SIGTERM` (`reboot`) → shutdown sequence, reboot. If the listener dies
//!   it is started again (it then binds and reports ready again); if it
//!   cannot listen at all, or dies within [`FAST_FAILURE`] of its start
//!   [`MAX_FAST_FAILURES`] times in a row, init powers off with 125.
//! - **Listener** ([`listener_main`], a child of PID 1): drops the I/O-port
//!   permission (commands must not write the exit port), listens on vsock
//!   port [`AGENT_PORT`], tells the host it is ready ([`notify_ready`]) and
//!   accepts connections forever ([`accept_loop`]).
//! - **One handler per connection** (a child of the listener, which reaps
//!   it automatically through `SIGCHLD` = `SIG_IGN`): runs
//!   [`session::serve`], which forks the command. Several commands run at
//!   once; a handler that crashes takes only its own connection down.
//!
//! Why a separate listener process rather than PID 1's own loop: PID 1
//! stays the small, synchronous-signal loop it is in command mode (no
//! `signalfd`/`poll` mixing, no allocation-heavy protocol code in the
//! process whose crash ends the VM), and a listener killed by anything
//! (`kill -9 -1` from a root command, a bug) is simply restarted.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use locald_agent_proto::{Frame, AGENT_PORT, READY_LINE, READY_PORT};

use crate::session::{self, Context};
use crate::spawn::{self, Event};
use crate::spec::Spec;
use crate::{console, sys, Ending, CODE_INIT_FAILURE};

/// The host's vsock CID.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;
/// `listen(2)` backlog.
pub const BACKLOG: libc::c_int = 64;
/// Readiness connection attempts before giving up (logged once).
pub const READY_ATTEMPTS: u32 = 5;
/// Pause between readiness attempts.
pub const READY_PAUSE: Duration = Duration::from_millis(50);
/// Time limit of one readiness attempt (connect + write).
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// Exit status of a listener that cannot listen (init then powers off
/// with 125).
pub const CODE_CANNOT_LISTEN: u8 = 2;
/// A listener that dies sooner than this after its start failed "fast".
pub const FAST_FAILURE: Duration = Duration::from_secs(1);
/// Consecutive fast failures after which init gives up.
pub const MAX_FAST_FAILURES: u32 = 5;

/// PID 1 in agent mode: start the listener, reap, restart it if it dies,
/// until a power signal. [`spawn::block_signals`] must have been called.
/// `user`: the default `(uid, gid)` of sessions (an OCI image's `User`).
pub fn run(spec: &Spec, user: Option<(u32, u32)>) -> Ending {
    let ctx = Context {
        env: spec.env.clone(),
        power_pid: Some(1),
        user,
    };
    let mut fast_failures = 0;
    loop {
        let started = Instant::now();
        // SAFETY: PID 1 is single-threaded, so the child may do anything;
        // it never returns from `listener_main`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            listener_main(&ctx);
        }
        if pid < 0 {
            console::error("agent: fork", io::Error::last_os_error());
            return Ending::Exit(CODE_INIT_FAILURE);
        }
        match spawn::wait_for(pid) {
            Event::PowerOff => return Ending::Exit(0),
            Event::Reboot => return Ending::Reboot,
            // The listener printed why.
            Event::Exited(CODE_CANNOT_LISTEN) => return Ending::Exit(CODE_INIT_FAILURE),
            Event::Exited(code) => {
                if started.elapsed() < FAST_FAILURE {
                    fast_failures += 1;
                } else {
                    fast_failures = 0;
                }
                if fast_failures >= MAX_FAST_FAILURES {
                    console::error("agent", "listener keeps failing, giving up");
                    return Ending::Exit(CODE_INIT_FAILURE);
                }
                console::error(
                    "agent",
                    format_args!("listener ended (status {code}), restarting it"),
                );
            }
        }
    }
}

/// Body of the listener process; never returns.
fn listener_main(ctx: &Context) -> ! {
    crate::port::drop_access();
    // SAFETY: sigprocmask gets an initialised empty set.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    let listener = match listen_vsock(AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            console::error(
                format_args!("agent: listening on vsock port {AGENT_PORT}"),
                e,
            );
            // SAFETY: _exit has no preconditions.
            unsafe { libc::_exit(CODE_CANNOT_LISTEN.into()) }
        }
    };
    if silent_requested() {
        console::error(
            "agent",
            format_args!(
                "{SILENT_WORD} on the kernel command line: not telling the host it is ready"
            ),
        );
    } else {
        notify_ready();
    }
    accept_loop(&listener, ctx)
}

/// Kernel command-line word that keeps the agent from announcing itself
/// (it listens and serves as usual, but never sends `READY`): lets a test
/// see the host's readiness timeout whatever the boot time. A word with a
/// dot is a module option to the kernel, so it reaches no environment.
pub const SILENT_WORD: &str = "locald.agent=silent";

/// Whether [`SILENT_WORD`] is on the kernel command line.
fn silent_requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .map(|c| cmdline_has(&c, SILENT_WORD))
        .unwrap_or(false)
}

/// Whether `word` is one of the blank-separated words of `cmdline`.
pub fn cmdline_has(cmdline: &str, word: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == word)
}

/// Whether a connection from `peer` may be served: only the host
/// (`HOST_CID`) talks to the agent; another VM or a local socket on a
/// kernel with vsock loopback gets closed unread.
pub fn peer_allowed(peer: &libc::sockaddr_vm, len: libc::socklen_t) -> bool {
    len as usize >= std::mem::size_of::<libc::sockaddr_vm>()
        && peer.svm_family == libc::AF_VSOCK as libc::sa_family_t
        && peer.svm_cid == HOST_CID
}

/// A vsock address.
pub fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// A close-on-exec vsock stream socket listening on `port` (any CID).
pub fn listen_vsock(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the new descriptor is ours.
    let fd = unsafe {
        sys::owned(sys::cvt(libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?)
    };
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `addr` is a valid sockaddr_vm of the given length.
    unsafe {
        sys::cvt(libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ))?;
        sys::cvt(libc::listen(fd.as_raw_fd(), BACKLOG))?;
    }
    Ok(fd)
}

/// Connects a socket of `domain` to `addr` and sends `data`, all within
/// `timeout`; closes it afterwards.
///
/// # Safety
/// `addr` must point to a valid socket address of `len` bytes for `domain`.
unsafe fn connect_and_send(
    domain: libc::c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
    data: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    // SAFETY: socket(2); the new descriptor is ours.
    let fd = unsafe {
        sys::owned(sys::cvt(libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        ))?)
    };
    // SAFETY: upheld by the caller.
    if let Err(e) = sys::cvt(unsafe { libc::connect(fd.as_raw_fd(), addr, len) }) {
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
        if sys::poll_one(fd.as_raw_fd(), libc::POLLOUT, sys::remaining(deadline))? == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_ERROR writes one int.
        sys::cvt(unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
    }
    sys::send_all_until(fd.as_raw_fd(), data, deadline)
}

/// Tells the host the agent listens: connect to `HOST_CID`:[`READY_PORT`],
/// write [`READY_LINE`], close. Retried [`READY_ATTEMPTS`] times; a final
/// failure is printed once and otherwise ignored (the host may still
/// connect to [`AGENT_PORT`] on its own).
pub fn notify_ready() {
    let addr = vsock_addr(HOST_CID, READY_PORT);
    let mut last = io::Error::from(io::ErrorKind::TimedOut);
    for attempt in 0..READY_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(READY_PAUSE);
        }
        // SAFETY: `addr` is a valid sockaddr_vm.
        let res = unsafe {
            connect_and_send(
                libc::AF_VSOCK,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                READY_LINE,
                READY_TIMEOUT,
            )
        };
        match res {
            Ok(()) => return,
            Err(e) => last = e,
        }
    }
    console::error(
        format_args!("agent: telling the host it is ready (vsock port {READY_PORT})"),
        last,
    );
}

/// Accepts connections from the host on `listener` forever, serving each in a forked
/// handler process. Must run in a process of its own: it sets `SIGCHLD` to
/// `SIG_IGN` (handlers are reaped by the kernel) and `SIGPIPE` to `SIG_IGN`.
/// Connections from any other peer ([`peer_allowed`]) are closed unread.
pub fn accept_loop(listener: &OwnedFd, ctx: &Context) -> ! {
    serve_peers(listener, ctx, peer_allowed)
}

/// [`accept_loop`] with the peer check `allowed` (tests serve Unix sockets
/// with an allow-all check).
pub(crate) fn serve_peers(
    listener: &OwnedFd,
    ctx: &Context,
    allowed: fn(&libc::sockaddr_vm, libc::socklen_t) -> bool,
) -> ! {
    // SAFETY: setting dispositions to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut refused_logged = false;
    loop {
        // SAFETY: sockaddr_vm is plain data; all-zero is valid.
        let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        let mut peer_len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `peer` and `peer_len` are valid for writes and describe
        // a buffer of `peer_len` bytes.
        let rc = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                (&mut peer as *mut libc::sockaddr_vm).cast(),
                &mut peer_len,
                libc::SOCK_CLOEXEC,
            )
        };
        let conn = match sys::cvt(rc) {
            // SAFETY: accept4 returned a new descriptor.
            Ok(fd) => unsafe { sys::owned(fd) },
            Err(e) => {
                match e.raw_os_error() {
                    // The connection went away before we took it; a signal.
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                    // Out of descriptors or memory: let handlers finish.
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    _ => {
                        console::error("agent: accept", e);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                continue;
            }
        };
        if !allowed(&peer, peer_len) {
            // Closed unread (dropping `conn`); logged once per listener.
            if !refused_logged {
                refused_logged = true;
                console::error(
                    "agent",
                    format_args!(
                        "refused a connection from vsock CID {} (only the host, CID {HOST_CID}, is served; further refusals not logged)",
                        peer.svm_cid
                    ),
                );
            }
            continue;
        }
        // SAFETY: the listener is single-threaded; the child runs the
        // handler and exits without returning into this loop.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: restoring the default disposition (the handler
                // waits for its command); closing our copy of the
                // listening socket so a restarted listener can bind.
                unsafe {
                    libc::signal(libc::SIGCHLD, libc::SIG_DFL);
                    libc::close(listener.as_raw_fd());
                }
                session::serve(conn, ctx);
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(0) }
            }
            -1 => {
                let e = io::Error::last_os_error();
                let frame = Frame::Error {
                    code: session::CODE_OTHER,
                    message: format!("fork: {}", console::describe(&e)),
                };
                let deadline = Instant::now() + session::LINGER;
                let _ = sys::send_all_until(conn.as_raw_fd(), &frame.encode(), deadline);
            }
            _ => {}
        }
        drop(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn vsock_address_layout() {
        let a = vsock_addr(HOST_CID, READY_PORT);
        assert_eq!(a.svm_family, libc::AF_VSOCK as libc::sa_family_t);
        assert_eq!(a.svm_cid, 2);
        assert_eq!(a.svm_port, 1023);
        assert_eq!(std::mem::size_of::<libc::sockaddr_vm>(), 16);
        assert_eq!(
            vsock_addr(libc::VMADDR_CID_ANY, AGENT_PORT).svm_cid,
            u32::MAX
        );
    }

    fn unix_addr(path: &std::path::Path) -> (libc::sockaddr_un, libc::socklen_t) {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: sockaddr_un is plain data; all-zero is valid.
        let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        a.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in a.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        (
            a,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    }

    #[test]
    fn readiness_line_is_sent_then_closed() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("locald-init-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let (addr, len) = unix_addr(&path);
        // SAFETY: valid sockaddr_un.
        unsafe {
            connect_and_send(
                libc::AF_UNIX,
                (&addr as *const libc::sockaddr_un).cast(),
                len,
                READY_LINE,
                Duration::from_secs(5),
            )
        }
        .unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"READY 1\n");
        // Nobody listening: an error, quickly, not a hang.
        drop(l);
        std::fs::remove_file(&path).unwrap();
        // SAFETY: valid sockaddr_un.
        let err = unsafe {
            connect_and_send(
                libc::AF_UNIX,
                (&addr as *const libc::sockaddr_un).cast(),
                len,
                READY_LINE,
                Duration::from_secs(5),
            )
        }
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_the_host_cid_is_served() {
        let full = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        let host = vsock_addr(HOST_CID, 5000);
        assert!(peer_allowed(&host, full));
        for cid in [0, 1, 3, 4, libc::VMADDR_CID_ANY] {
            assert!(!peer_allowed(&vsock_addr(cid, 5000), full), "CID {cid}");
        }
        // A short or foreign address is not the host.
        assert!(!peer_allowed(&host, 4));
        let mut unix = host;
        unix.svm_family = libc::AF_UNIX as libc::sa_family_t;
        assert!(!peer_allowed(&unix, full));
    }

    #[test]
    fn the_silent_word_is_a_whole_word() {
        assert!(cmdline_has(
            "console=ttyS0 locald.agent=silent quiet\n",
            SILENT_WORD
        ));
        assert!(!cmdline_has("locald.agent=silentx", SILENT_WORD));
        assert!(!cmdline_has("xlocald.agent=silent", SILENT_WORD));
        assert!(!cmdline_has("", SILENT_WORD));
    }
}
