//! One agent connection: run the command an `Exec` frame asks for and relay
//! its stdio, signals, terminal size and exit status (protocol:
//! `locald_agent_proto`).
//!
//! [`serve`] works on any connected stream socket (vsock in the guest, a
//! Unix socketpair in the tests) and is safe to run on a thread: it changes
//! no process-wide state except ignoring `SIGPIPE`, starts the command with
//! `fork` + only async-signal-safe calls until `execve`, creates every
//! descriptor close-on-exec, and waits for its own child by pid only. In the
//! guest each connection runs it in its own forked process (`crate::agent`).
//!
//! Sequence: read one frame (blocking). `Exec` → resolve the program like
//! init does (`PATH` of the merged environment, busybox applet fallback),
//! create the workdir if missing, start the command in a new session with
//! three pipes or a pseudo-terminal, answer `Started(pid)`. A refusal is an
//! `Error` frame (127 not found, 126 cannot execute, 125 anything else)
//! followed by an orderly close. `Shutdown` → signal PID 1 to power off.
//! `Forward(port)` → splice the stream with guest TCP `127.0.0.1:port`
//! (`crate::forward`).
//!
//! Relay: one `poll` loop over the socket, the child's pipes (or the pty
//! master) and a pidfd for the child. Memory is bounded: child output is
//! read only while less than [`OUT_HIGH`] bytes wait for the host (so a
//! host that does not read stops the command through pipe backpressure,
//! never this process), and host input is read only while less than
//! [`STDIN_HIGH`] bytes wait for the command's stdin. `Exit` is sent once
//! the child has been reaped and its output reached EOF (pty: `EIO`), after
//! all output. If the host goes away first, the command's process group is
//! killed with `SIGKILL`.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::time::{Duration, Instant};

use locald_agent_proto::{Decoder, ExecRequest, ExitKind, Frame, MAX_DATA};

use crate::console;
use crate::forward;
use crate::spawn::{self, Resolved};
use crate::spec;
use crate::sys;

/// `Error` code for everything that is neither "not found" nor "cannot
/// execute" (protocol errors, bad workdir, failed uid/gid switch, ...).
pub const CODE_OTHER: u8 = 125;
/// Signal sent to PID 1 for a `Shutdown` frame: what `poweroff` sends.
pub const POWEROFF_SIGNAL: libc::c_int = libc::SIGUSR2;
/// Child output is read only while fewer bytes than this wait for the host.
pub const OUT_HIGH: usize = 2 * MAX_DATA;
/// Host input is read only while fewer bytes than this wait for stdin.
pub const STDIN_HIGH: usize = 4 * MAX_DATA;
/// How long an orderly close waits for the host to close its side.
pub const LINGER: Duration = Duration::from_secs(1);
/// Exit check interval when the kernel has no `pidfd_open` (before 5.3).
const EXIT_POLL_MS: libc::c_int = 20;
/// Longest program name or path quoted in an `Error` message.
const SHOWN_MAX: usize = 256;

/// What every connection shares.
#[derive(Debug, Clone)]
pub struct Context {
    /// Base environment (init's defaults plus `/.locald/env`); the
    /// request's entries are applied over it.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Process that gets [`POWEROFF_SIGNAL`] on `Shutdown` (PID 1 in the
    /// guest; `None` ignores `Shutdown`).
    pub power_pid: Option<libc::pid_t>,
    /// Default `(uid, gid)` of commands whose request names none: an OCI
    /// image's `User`, resolved at boot (as `docker exec` runs as the
    /// image's user). `None`: root.
    pub user: Option<(u32, u32)>,
}

/// A refused request: the `Error` frame's code and message.
pub type Refusal = (u8, String);

/// Bytes for a message, lossily decoded and cut to a sane length.
pub fn shown(b: &[u8]) -> String {
    let cut = &b[..b.len().min(SHOWN_MAX)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if b.len() > SHOWN_MAX {
        s.push_str("...");
    }
    s
}

/// Name of a frame type, for "unexpected frame" messages.
pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Exec(_) => "Exec",
        Frame::Stdin(_) => "Stdin",
        Frame::Resize(..) => "Resize",
        Frame::Signal(_) => "Signal",
        Frame::Shutdown => "Shutdown",
        Frame::Forward(_) => "Forward",
        Frame::Refresh(_) => "Refresh",
        Frame::Started(_) => "Started",
        Frame::Stdout(_) => "Stdout",
        Frame::Stderr(_) => "Stderr",
        Frame::Exit(_) => "Exit",
        Frame::Error { .. } => "Error",
    }
}

/// A `waitpid` status as the protocol's exit kind.
pub fn exit_kind(status: libc::c_int) -> ExitKind {
    if libc::WIFSIGNALED(status) {
        ExitKind::Signal(libc::WTERMSIG(status))
    } else if libc::WIFEXITED(status) {
        ExitKind::Code(libc::WEXITSTATUS(status))
    } else {
        ExitKind::Code(255)
    }
}

/// How many end-of-file characters end a tty's input: one at the start of
/// a line; after a partial line the first only hands that line to the
/// reader (canonical mode), so a second is needed.
pub fn eof_chars_needed(last_written: Option<u8>) -> usize {
    match last_written {
        None | Some(b'\n' | b'\r') => 1,
        Some(_) => 2,
    }
}

/// Where the child failed between `fork` and `execve` (reported through
/// the close-on-exec status pipe as this byte plus the `errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// `setsid`.
    Session = 1,
    /// Moving the pipes / pty onto fds 0, 1, 2.
    Stdio = 2,
    /// `TIOCSCTTY`.
    Tty = 3,
    /// `setgroups` / `setgid` / `setuid`.
    Ids = 4,
    /// `chdir` to the workdir.
    Workdir = 5,
    /// `execve`.
    Exec = 6,
}

impl Stage {
    fn from_u8(b: u8) -> Option<Stage> {
        [
            Stage::Session,
            Stage::Stdio,
            Stage::Tty,
            Stage::Ids,
            Stage::Workdir,
            Stage::Exec,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }
}

/// The `Error` frame for a child that failed at `stage` with `errno`.
pub fn refusal_for(stage: Stage, errno: i32, program: &str, workdir: &str) -> Refusal {
    let err = console::describe(&io::Error::from_raw_os_error(errno));
    match stage {
        Stage::Exec => match spawn::code_from_spawn_errno(errno) {
            spawn::CODE_NOT_FOUND => (spawn::CODE_NOT_FOUND, format!("{program}: not found")),
            code => (code, format!("{program}: {err}")),
        },
        Stage::Workdir => (CODE_OTHER, format!("workdir '{workdir}': {err}")),
        Stage::Ids => (CODE_OTHER, format!("setting uid/gid: {err}")),
        Stage::Session => (CODE_OTHER, format!("setsid: {err}")),
        Stage::Stdio => (CODE_OTHER, format!("setting up stdio: {err}")),
        Stage::Tty => (CODE_OTHER, format!("controlling terminal: {err}")),
    }
}

/// Serves one connection until the command ended and the host got its
/// `Exit` (or an `Error`), or the host went away. `conn` is closed on
/// return.
pub fn serve(conn: OwnedFd, ctx: &Context) {
    // Writing to a command's closed stdin must be EPIPE, not death (the
    // socket uses MSG_NOSIGNAL). Idempotent; Rust's runtime does the same.
    // SAFETY: setting a disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let fd = conn.as_raw_fd();
    let req = match Frame::read_from(&mut sys::SocketReader(fd)) {
        Ok(Some(Frame::Exec(req))) => req,
        Ok(Some(Frame::Shutdown)) => {
            request_poweroff(ctx);
            sys::linger(fd, Instant::now() + LINGER);
            return;
        }
        Ok(Some(Frame::Forward(port))) => return forward::serve(fd, port),
        Ok(Some(Frame::Refresh(r))) => {
            return match crate::refresh::apply(&r) {
                Ok(()) => {
                    let deadline = Instant::now() + LINGER;
                    let frame = Frame::Exit(locald_agent_proto::ExitKind::Code(0)).encode();
                    if sys::send_all_until(fd, &frame, deadline).is_ok() {
                        sys::linger(fd, deadline);
                    }
                }
                Err(msg) => refuse(fd, (CODE_OTHER, msg)),
            };
        }
        Ok(Some(other)) => {
            let msg = format!("expected Exec, got {}", frame_name(&other));
            return refuse(fd, (CODE_OTHER, msg));
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return refuse(fd, (CODE_OTHER, e.to_string()));
        }
        // Clean or unclean end of stream before a whole frame: nobody to
        // answer.
        Ok(None) | Err(_) => return,
    };
    let cmd = match Command::prepare(&req, ctx) {
        Ok(c) => c,
        Err(r) => return refuse(fd, r),
    };
    match cmd.start() {
        Ok(child) => Relay::new(fd, child, ctx).run(),
        Err(r) => refuse(fd, r),
    }
}

/// Sends `Error` and closes in order.
pub fn refuse(fd: RawFd, (code, message): Refusal) {
    let deadline = Instant::now() + LINGER;
    let frame = Frame::Error { code, message }.encode();
    if sys::send_all_until(fd, &frame, deadline).is_ok() {
        sys::linger(fd, deadline);
    }
}

fn request_poweroff(ctx: &Context) {
    if let Some(pid) = ctx.power_pid {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, POWEROFF_SIGNAL) };
    }
}

/// A request turned into everything `execve` needs, prepared before the
/// fork so the child allocates nothing.
#[derive(Debug)]
struct Command {
    /// `argv[0]` for messages.
    program: String,
    /// Resolved program path.
    path: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    workdir: Option<CString>,
    uid: Option<u32>,
    gid: Option<u32>,
    tty: Option<(u16, u16)>,
}

/// `chdir` target check like init's `/.locald/workdir`: created (with
/// parents) if missing.
fn ensure_workdir(dir: &Path) -> io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(dir),
        Err(e) => Err(e),
    }
}

impl Command {
    fn prepare(req: &ExecRequest, ctx: &Context) -> Result<Command, Refusal> {
        let bad = |what: &str| (CODE_OTHER, format!("{what} contains a NUL byte"));
        let name = req.argv.first().map(Vec::as_slice).unwrap_or_default();
        let program = shown(name);
        let argv = req
            .argv
            .iter()
            .map(|a| CString::new(a.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| bad("argv"))?;
        if req.env.iter().any(|e| e.contains(&0)) {
            return Err(bad("env"));
        }
        let mut env = ctx.env.clone();
        spec::merge_env(&mut env, req.env.iter().map(Vec::as_slice));
        let workdir = match &req.workdir {
            Some(w) => {
                let c = CString::new(w.as_slice()).map_err(|_| bad("workdir"))?;
                ensure_workdir(Path::new(OsStr::from_bytes(w))).map_err(|e| {
                    let e = console::describe(&e);
                    (CODE_OTHER, format!("workdir '{}': {e}", shown(w)))
                })?;
                Some(c)
            }
            None => None,
        };
        // Relative candidates (a name with '/', or an empty PATH entry) are
        // looked up where the command will run: in the workdir.
        let base = req
            .workdir
            .as_deref()
            .map(|w| Path::new(OsStr::from_bytes(w)));
        let probe = |p: &Path| match base {
            Some(b) if p.is_relative() => spawn::probe_fs(&b.join(p)),
            _ => spawn::probe_fs(p),
        };
        let path_var = env
            .iter()
            .find(|(k, _)| k == b"PATH")
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default();
        let path = match spawn::resolve_or_applet(name, path_var, probe) {
            // Built from NUL-free parts.
            Resolved::Path(p) => CString::new(p.into_os_string().into_vec()).unwrap_or_default(),
            Resolved::NotFound => {
                return Err((spawn::CODE_NOT_FOUND, format!("{program}: not found")))
            }
            Resolved::NotExecutable => {
                return Err(refusal_for(Stage::Exec, libc::EACCES, &program, ""));
            }
        };
        Ok(Command {
            program,
            path,
            argv,
            envp: spec::envp(&env),
            workdir,
            uid: req.uid.or(ctx.user.map(|u| u.0)),
            gid: req.gid.or(ctx.user.map(|u| u.1)),
            tty: req.tty,
        })
    }

    /// Forks and execs the command; returns once `execve` succeeded (or
    /// the child reported why it did not).
    fn start(&self) -> Result<Child, Refusal> {
        let sys_err =
            |what: &str, e: io::Error| (CODE_OTHER, format!("{what}: {}", console::describe(&e)));
        // Our ends and the child's ends of its stdio.
        let (io, child_ends) = match self.tty {
            Some((rows, cols)) => {
                let (master, slave) = open_pty(rows, cols).map_err(|e| sys_err("pty", e))?;
                if let Some(uid) = self.uid {
                    // Like login: the user owns its terminal (for programs that
                    // reopen it by name). Best effort.
                    // SAFETY: fchown on our own descriptor; -1 keeps the group.
                    unsafe { libc::fchown(slave.as_raw_fd(), uid, u32::MAX) };
                }
                let s = slave.as_raw_fd();
                let ends = ChildEnds {
                    fds: [s, s, s],
                    tty: true,
                    _owned: vec![slave],
                };
                (Io::pty(master), ends)
            }
            None => {
                let (in_r, in_w) = sys::pipe().map_err(|e| sys_err("pipe", e))?;
                let (out_r, out_w) = sys::pipe().map_err(|e| sys_err("pipe", e))?;
                let (err_r, err_w) = sys::pipe().map_err(|e| sys_err("pipe", e))?;
                let fds = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
                (
                    Io::Pipes {
                        stdin: Some(in_w),
                        stdout: Some(out_r),
                        stderr: Some(err_r),
                    },
                    ChildEnds {
                        fds,
                        tty: false,
                        _owned: vec![in_r, out_w, err_w],
                    },
                )
            }
        };
        let (status_r, status_w) = sys::pipe().map_err(|e| sys_err("pipe", e))?;
        let plan = ExecPlan::new(self, &child_ends, status_w.as_raw_fd());
        let pid = plan.spawn();
        drop(status_w);
        drop(child_ends);
        if pid < 0 {
            return Err(sys_err("fork", io::Error::last_os_error()));
        }
        // EOF (exec closed the pipe) means success; otherwise stage + errno.
        let mut report = [0u8; 5];
        let mut got = 0;
        while got < report.len() {
            match sys::read(status_r.as_raw_fd(), &mut report[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        if got == report.len() {
            reap(pid);
            let errno = i32::from_le_bytes([report[1], report[2], report[3], report[4]]);
            let stage = Stage::from_u8(report[0]).unwrap_or(Stage::Exec);
            let workdir = self
                .workdir
                .as_ref()
                .map(|w| shown(w.as_bytes()))
                .unwrap_or_default();
            return Err(refusal_for(stage, errno, &self.program, &workdir));
        }
        io.set_nonblocking().map_err(|e| {
            kill_group(pid, libc::SIGKILL);
            reap(pid);
            sys_err("fcntl", e)
        })?;
        // SAFETY: pidfd_open on our own, not yet reaped child; the new
        // descriptor (close-on-exec) is ours.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let pidfd = (pidfd >= 0).then(|| {
            // SAFETY: pidfd_open returned a new descriptor.
            unsafe { sys::owned(pidfd as RawFd) }
        });
        Ok(Child { pid, pidfd, io })
    }
}

/// `waitpid(pid)`, blocking; the status.
fn reap(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: valid out pointer; our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return status;
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 0xff00; // ECHILD: already gone; report code 255.
        }
    }
}

/// Signals the process group `pid` leads; if there is none, the process.
fn kill_group(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        if libc::kill(-pid, sig) != 0 {
            libc::kill(pid, sig);
        }
    }
}

/// A pseudo-terminal pair (master, slave), both close-on-exec, of the
/// given size. `posix_openpt`/`grantpt`/`unlockpt`/`ptsname_r` are in libc
/// proper (no `-lutil`, unlike `openpty`).
fn open_pty(rows: u16, cols: u16) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain libc calls on a descriptor we own; the name buffer is
    // large enough ("/dev/pts/N") and NUL-terminated by ptsname_r.
    unsafe {
        let m = sys::cvt(libc::posix_openpt(
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let master = sys::owned(m);
        sys::cvt(libc::grantpt(m))?;
        sys::cvt(libc::unlockpt(m))?;
        let mut name = [0 as libc::c_char; 128];
        let rc = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let s = sys::cvt(libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let slave = sys::owned(s);
        set_winsize(m, rows, cols)?;
        Ok((master, slave))
    }
}

/// `TIOCSWINSZ` (the kernel sends `SIGWINCH` to the foreground group).
fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    sys::cvt(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) }).map(drop)
}

/// The terminal's end-of-file character (`VEOF`), if enabled.
fn veof_char(master: RawFd) -> Option<u8> {
    // SAFETY: termios is plain data; tcgetattr fills it on success.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    if unsafe { libc::tcgetattr(master, &mut t) } != 0 {
        return Some(4); // ^D
    }
    let c = t.c_cc[libc::VEOF];
    (c != 0).then_some(c) // 0 is _POSIX_VDISABLE
}

/// The child's ends of its stdio (fds for 0, 1, 2), closed in the parent
/// once the child has them.
struct ChildEnds {
    fds: [RawFd; 3],
    tty: bool,
    _owned: Vec<OwnedFd>,
}

/// Raw pointers for the child, built before the fork.
/// Stack of the child between `clone` and `execve` (a few libc calls).
const CHILD_STACK: usize = 64 * 1024;

struct ExecPlan {
    path: *const libc::c_char,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    workdir: Option<*const libc::c_char>,
    uid: Option<u32>,
    gid: Option<u32>,
    stdio: [RawFd; 3],
    tty: bool,
    status_fd: RawFd,
    empty_mask: libc::sigset_t,
}

impl ExecPlan {
    fn new(cmd: &Command, ends: &ChildEnds, status_fd: RawFd) -> ExecPlan {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        // SAFETY: sigset_t is plain data, initialised by sigemptyset.
        let empty_mask = unsafe {
            let mut s: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut s);
            s
        };
        ExecPlan {
            path: cmd.path.as_ptr(),
            argv: ptrs(&cmd.argv),
            envp: ptrs(&cmd.envp),
            workdir: cmd.workdir.as_ref().map(|w| w.as_ptr()),
            uid: cmd.uid,
            gid: cmd.gid,
            stdio: ends.fds,
            tty: ends.tty,
            status_fd,
            empty_mask,
        }
    }

    /// Reports `stage` and `errno` on the status pipe and exits.
    ///
    /// # Safety
    /// Only for the forked child before `execve`: it calls `_exit` and
    /// must not run destructors or touch locks the parent may hold.
    unsafe fn fail(&self, stage: Stage) -> ! {
        // SAFETY: errno location is thread-local and always valid.
        let errno = unsafe { *libc::__errno_location() };
        let mut msg = [stage as u8, 0, 0, 0, 0];
        msg[1..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: writing our own stack buffer; _exit never returns.
        unsafe {
            libc::write(self.status_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    }

    /// Starts the child running [`ExecPlan::exec`] and returns its pid (or
    /// -1 with `errno` set).
    ///
    /// `clone(CLONE_VM | CLONE_VFORK)`, as glibc's `posix_spawn` does: the
    /// child borrows our address space on its own stack until `execve`
    /// (we are suspended meanwhile), so no page tables are copied and no
    /// copy-on-write faults follow — a whole `fork` of this process saved,
    /// which under an emulated guest kernel is a large part of a command's
    /// start. The child only reads the plan, makes async-signal-safe system
    /// calls and writes to the status pipe; its signal dispositions and
    /// mask are its own (no `CLONE_SIGHAND`, no `CLONE_THREAD`).
    fn spawn(&self) -> libc::pid_t {
        extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
            // SAFETY: `arg` is the `&ExecPlan` passed below; the parent is
            // suspended (CLONE_VFORK) until this execs or exits, so it is
            // live. `exec` never returns.
            unsafe { (*(arg as *const ExecPlan)).exec() }
        }
        let mut stack = vec![0u8; CHILD_STACK];
        // The stack grows down from its (16-byte aligned) top.
        let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;
        // SAFETY: `child` runs on `stack`, which outlives it (we return
        // only after the child has exec'd or exited); the argument is a
        // valid pointer to `self` for as long.
        unsafe {
            libc::clone(
                child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (self as *const ExecPlan).cast_mut().cast(),
            )
        }
    }

    /// Body of the child: async-signal-safe calls only (no allocation, no
    /// locks, no writes to shared memory besides `errno`), then `execve`.
    ///
    /// # Safety
    /// Only in the child started by [`ExecPlan::spawn`]; the pointers must
    /// be live.
    unsafe fn exec(&self) -> ! {
        // SAFETY: each call gets valid arguments prepared before the clone.
        unsafe {
            // Ignored dispositions survive execve: give the command
            // defaults (before unblocking anything).
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::signal(libc::SIGCHLD, libc::SIG_DFL);
            libc::sigprocmask(libc::SIG_SETMASK, &self.empty_mask, std::ptr::null_mut());
            if libc::setsid() < 0 {
                self.fail(Stage::Session);
            }
            // Move the ends above 2 first so no dup2 below clobbers one.
            let mut high = [0; 3];
            for (h, &fd) in high.iter_mut().zip(&self.stdio) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
                if *h < 0 {
                    self.fail(Stage::Stdio);
                }
            }
            for (target, &fd) in high.iter().enumerate() {
                if libc::dup2(fd, target as RawFd) < 0 {
                    self.fail(Stage::Stdio);
                }
            }
            if self.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                self.fail(Stage::Tty);
            }
            if self.uid.is_some() || self.gid.is_some() {
                if libc::setgroups(0, std::ptr::null()) < 0 {
                    self.fail(Stage::Ids);
                }
                if let Some(gid) = self.gid {
                    if libc::setgid(gid) < 0 {
                        self.fail(Stage::Ids);
                    }
                }
                if let Some(uid) = self.uid {
                    if libc::setuid(uid) < 0 {
                        self.fail(Stage::Ids);
                    }
                }
            }
            if let Some(dir) = self.workdir {
                if libc::chdir(dir) < 0 {
                    self.fail(Stage::Workdir);
                }
            }
            libc::execve(self.path, self.argv.as_ptr(), self.envp.as_ptr());
            self.fail(Stage::Exec)
        }
    }
}

/// Our side of the command's stdio.
enum Io {
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    },
    Pty {
        master: OwnedFd,
        /// Output not at EOF/EIO yet.
        output_open: bool,
        /// Input still accepted.
        input_open: bool,
    },
}

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

impl Io {
    fn pty(master: OwnedFd) -> Io {
        Io::Pty {
            master,
            output_open: true,
            input_open: true,
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Io::Pipes {
                stdin,
                stdout,
                stderr,
            } => [stdin, stdout, stderr]
                .into_iter()
                .flatten()
                .try_for_each(sys::set_nonblocking),
            Io::Pty { master, .. } => sys::set_nonblocking(master),
        }
    }

    fn input(&self) -> Option<RawFd> {
        match self {
            Io::Pipes { stdin, .. } => stdin.as_ref().map(AsRawFd::as_raw_fd),
            Io::Pty {
                master, input_open, ..
            } => input_open.then(|| master.as_raw_fd()),
        }
    }

    fn output(&self, s: Stream) -> Option<RawFd> {
        match (self, s) {
            (Io::Pipes { stdout, .. }, Stream::Out) => stdout.as_ref().map(AsRawFd::as_raw_fd),
            (Io::Pipes { stderr, .. }, Stream::Err) => stderr.as_ref().map(AsRawFd::as_raw_fd),
            (
                Io::Pty {
                    master,
                    output_open,
                    ..
                },
                Stream::Out,
            ) => output_open.then(|| master.as_raw_fd()),
            (Io::Pty { .. }, Stream::Err) => None,
        }
    }

    fn close_input(&mut self) {
        match self {
            Io::Pipes { stdin, .. } => *stdin = None,
            Io::Pty { input_open, .. } => *input_open = false,
        }
    }

    fn close_output(&mut self, s: Stream) {
        match (self, s) {
            (Io::Pipes { stdout, .. }, Stream::Out) => *stdout = None,
            (Io::Pipes { stderr, .. }, Stream::Err) => *stderr = None,
            (Io::Pty { output_open, .. }, _) => *output_open = false,
        }
    }

    fn outputs_done(&self) -> bool {
        self.output(Stream::Out).is_none() && self.output(Stream::Err).is_none()
    }

    fn master(&self) -> Option<RawFd> {
        match self {
            Io::Pty { master, .. } => Some(master.as_raw_fd()),
            Io::Pipes { .. } => None,
        }
    }
}

/// The running command.
struct Child {
    pid: libc::pid_t,
    /// Readable once the child exited (`None`: no pidfd support, poll).
    pidfd: Option<OwnedFd>,
    io: Io,
}

/// The host went away (EOF, reset, protocol violation already answered).
struct HostGone;

/// The relay loop's state.
struct Relay<'a> {
    sock: RawFd,
    ctx: &'a Context,
    child: Child,
    /// `waitpid` status once reaped.
    status: Option<libc::c_int>,
    /// Encoded frames not yet accepted by the socket.
    to_host: Vec<u8>,
    /// Host bytes not yet written to the command's stdin.
    stdin_buf: Vec<u8>,
    /// The host sent stdin EOF: close stdin once `stdin_buf` is written.
    stdin_eof: bool,
    /// Last byte written to a tty (for the end-of-file characters).
    last_tty_byte: Option<u8>,
    decoder: Decoder,
    /// `Exit` or `Error` queued: flush, then close.
    finishing: bool,
    buf: Vec<u8>,
}

impl<'a> Relay<'a> {
    fn new(sock: RawFd, child: Child, ctx: &'a Context) -> Self {
        Relay {
            sock,
            ctx,
            status: None,
            to_host: Frame::Started(child.pid as u32).encode(),
            child,
            stdin_buf: Vec::new(),
            stdin_eof: false,
            last_tty_byte: None,
            decoder: Decoder::default(),
            finishing: false,
            buf: vec![0; MAX_DATA],
        }
    }

    fn run(mut self) {
        loop {
            if !self.finishing && self.status.is_some() && self.child.io.outputs_done() {
                let kind = exit_kind(self.status.unwrap_or_default());
                self.to_host.extend(Frame::Exit(kind).encode());
                self.finish();
            }
            if self.finishing && self.to_host.is_empty() {
                sys::linger(self.sock, Instant::now() + LINGER);
                return;
            }
            if self.step().is_err() {
                self.host_gone();
                return;
            }
        }
    }

    /// One `poll` round.
    fn step(&mut self) -> Result<(), HostGone> {
        const NONE: libc::pollfd = libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        };
        // Fixed slots: socket, stdout, stderr, stdin, pidfd (fd -1 = unused).
        let mut p = [NONE; 5];
        let mut sock_ev = 0;
        if self.finishing || self.stdin_buf.len() < STDIN_HIGH {
            sock_ev |= libc::POLLIN;
        }
        if !self.to_host.is_empty() {
            sock_ev |= libc::POLLOUT;
        }
        p[0] = pollfd(self.sock, sock_ev);
        if !self.finishing {
            if self.to_host.len() < OUT_HIGH {
                for (slot, s) in [(1, Stream::Out), (2, Stream::Err)] {
                    if let Some(fd) = self.child.io.output(s) {
                        p[slot] = pollfd(fd, libc::POLLIN);
                    }
                }
            }
            if let Some(fd) = self.child.io.input().filter(|_| !self.stdin_buf.is_empty()) {
                p[3] = pollfd(fd, libc::POLLOUT);
            }
        }
        let pidfd = self.child.pidfd.as_ref().map(AsRawFd::as_raw_fd);
        let mut timeout = -1;
        if self.status.is_none() {
            match pidfd {
                Some(fd) => p[4] = pollfd(fd, libc::POLLIN),
                None => timeout = EXIT_POLL_MS,
            }
        }
        // SAFETY: `p` is a valid array of pollfds; fd -1 entries are ignored.
        let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout) };
        if rc < 0 {
            return Ok(()); // EINTR (nothing else can fail here): go round.
        }
        let sock_rev = p[0].revents;
        if sock_rev & (libc::POLLOUT | libc::POLLERR) != 0 && !self.to_host.is_empty() {
            self.flush()?;
        }
        if sock_rev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_host()?;
        }
        for (slot, s) in [(1, Stream::Out), (2, Stream::Err)] {
            if p[slot].revents != 0 && !self.finishing {
                self.read_output(s);
            }
        }
        // Output is read only below OUT_HIGH, one chunk per stream per round.
        debug_assert!(self.finishing || self.to_host.len() < OUT_HIGH + 2 * (MAX_DATA + 5) + 64);
        if p[3].revents != 0 && !self.finishing {
            self.write_input();
        }
        if self.stdin_eof && self.stdin_buf.is_empty() {
            self.child.io.close_input();
        }
        if self.status.is_none() && (p[4].revents != 0 || pidfd.is_none()) {
            self.try_reap();
        }
        Ok(())
    }

    /// Stops relaying: no more input or output from the command.
    fn finish(&mut self) {
        self.finishing = true;
        self.stdin_buf = Vec::new();
        self.child.io = Io::Pipes {
            stdin: None,
            stdout: None,
            stderr: None,
        };
        self.child.pidfd = None;
    }

    fn flush(&mut self) -> Result<(), HostGone> {
        let mut sent = 0;
        while sent < self.to_host.len() {
            match sys::send_nonblocking(self.sock, &self.to_host[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(HostGone),
            }
        }
        self.to_host.drain(..sent);
        Ok(())
    }

    fn read_host(&mut self) -> Result<(), HostGone> {
        let n = match sys::recv(self.sock, &mut self.buf, libc::MSG_DONTWAIT) {
            Ok(0) => return Err(HostGone),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(_) => return Err(HostGone),
        };
        if self.finishing {
            return Ok(()); // Read only so the host never blocks on us.
        }
        self.decoder.feed(&self.buf[..n]);
        loop {
            match self.decoder.next_frame() {
                Ok(Some(f)) => self.on_frame(f),
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.protocol_error(e.to_string());
                    return Ok(());
                }
            }
            if self.finishing {
                return Ok(());
            }
        }
    }

    fn on_frame(&mut self, f: Frame) {
        match f {
            Frame::Stdin(d) if d.is_empty() => {
                if !self.stdin_eof {
                    self.stdin_eof = true;
                    if let Some(master) = self.child.io.master() {
                        if let Some(c) = veof_char(master) {
                            let last = self.stdin_buf.last().copied().or(self.last_tty_byte);
                            let n = eof_chars_needed(last);
                            self.stdin_buf.extend(std::iter::repeat_n(c, n));
                        }
                    }
                }
            }
            Frame::Stdin(d) => {
                if !self.stdin_eof && self.child.io.input().is_some() {
                    self.stdin_buf.extend_from_slice(&d);
                }
            }
            Frame::Resize(rows, cols) => {
                if let Some(master) = self.child.io.master() {
                    let _ = set_winsize(master, rows, cols);
                }
            }
            Frame::Signal(sig) => self.signal(sig),
            Frame::Shutdown => request_poweroff(self.ctx),
            other => self.protocol_error(format!("unexpected {} frame", frame_name(&other))),
        }
    }

    /// Answers a protocol violation: kill the command, send `Error`, close.
    fn protocol_error(&mut self, message: String) {
        self.kill_all();
        self.to_host.extend(
            Frame::Error {
                code: CODE_OTHER,
                message,
            }
            .encode(),
        );
        self.finish();
    }

    fn signal(&mut self, sig: libc::c_int) {
        if self.status.is_none() {
            kill_group(self.child.pid, sig);
        } else {
            // Reaped: only what is left of its group (holding the output).
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-self.child.pid, sig) };
        }
    }

    /// `SIGKILL` to the command's group (and the command, should it have
    /// left the group), then reap it.
    fn kill_all(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(-self.child.pid, libc::SIGKILL) };
        if self.status.is_none() {
            // SAFETY: as above; not reaped, so the pid is still ours.
            unsafe { libc::kill(self.child.pid, libc::SIGKILL) };
            self.status = Some(reap(self.child.pid));
        }
    }

    fn host_gone(&mut self) {
        if !self.finishing {
            self.kill_all();
        }
    }

    fn read_output(&mut self, s: Stream) {
        let Some(fd) = self.child.io.output(s) else {
            return;
        };
        match sys::read(fd, &mut self.buf) {
            Ok(0) => self.child.io.close_output(s),
            Ok(n) => {
                let data = self.buf[..n].to_vec();
                let frame = match s {
                    Stream::Out => Frame::Stdout(data),
                    Stream::Err => Frame::Stderr(data),
                };
                self.to_host.extend(frame.encode());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // EIO: pty slave closed everywhere; anything else: give up too.
            Err(_) => self.child.io.close_output(s),
        }
    }

    fn write_input(&mut self) {
        let Some(fd) = self.child.io.input() else {
            self.stdin_buf.clear();
            return;
        };
        match sys::write(fd, &self.stdin_buf) {
            Ok(n) => {
                if self.child.io.master().is_some() && n > 0 {
                    self.last_tty_byte = Some(self.stdin_buf[n - 1]);
                }
                self.stdin_buf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // EPIPE (stdin closed by the command), EIO (tty gone): drop
            // what is pending and whatever comes later.
            Err(_) => {
                self.stdin_buf = Vec::new();
                self.stdin_eof = true;
                self.child.io.close_input();
            }
        }
    }

    fn try_reap(&mut self) {
        let mut status = 0;
        // SAFETY: valid out pointer; our own child; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(self.child.pid, &mut status, libc::WNOHANG) };
        if r == self.child.pid {
            self.status = Some(status);
            self.child.pidfd = None;
        } else if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            self.status = Some(0xff00);
            self.child.pidfd = None;
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests;
