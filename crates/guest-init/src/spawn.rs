//! Spawning the command and supervising it as PID 1.
//!
//! Runs on init's only thread. The command is started with `posix_spawn(3)`
//! (glibc implements it with `clone(CLONE_VM|CLONE_VFORK)`: no page-table copy,
//! which matters when every kernel instruction is emulated). PATH lookup is
//! done here, not by the C library, so the lookup uses the *command's* `PATH`.
//!
//! Signals: init blocks `SIGCHLD`, `SIGUSR1`, `SIGUSR2` and `SIGTERM` and
//! takes them synchronously with `sigwaitinfo(2)` — no handlers, so no
//! async-signal-safety concerns. The child gets an empty mask and default
//! dispositions (`SIGPIPE` included, in case a Rust runtime ignored it: init
//! itself is `no_main` and leaves it alone).
//!
//! Running as another user (an OCI image's `User`, [`spawn_as`]):
//! `posix_spawn` cannot change credentials, so that path uses `fork` and,
//! in the child, only async-signal-safe calls: the same stdio and signal
//! setup, then `setgroups`, `setgid`, `setuid` (in that order: after
//! `setuid` the others are no longer permitted) and `execve`. An exec
//! failure is reported through a close-on-exec pipe, so the caller gets
//! the `errno` as with `posix_spawn`.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Exit code when the command cannot be found (like a shell / docker).
pub const CODE_NOT_FOUND: u8 = 127;
/// Exit code when the command was found but cannot be executed.
pub const CODE_NOT_EXECUTABLE: u8 = 126;

/// Result of probing one PATH candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Does not exist.
    Missing,
    /// Regular file with an execute bit.
    Executable,
    /// Exists but is a directory or lacks execute permission.
    NotExecutable,
}

/// Result of resolving a command name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Path to hand to `execve`.
    Path(PathBuf),
    /// Nothing with that name on PATH (`ENOENT`).
    NotFound,
    /// Only non-executable candidates found (`EACCES`).
    NotExecutable,
}

/// Resolves `name` like `execvp(3)`: names containing `/` are used as is;
/// otherwise each PATH entry is tried in order (an empty entry means the
/// current directory). The first executable regular file wins; if only
/// non-executable candidates exist the result is [`Resolved::NotExecutable`].
pub fn resolve(name: &[u8], path_var: &[u8], probe: &impl Fn(&Path) -> Probe) -> Resolved {
    if name.is_empty() {
        return Resolved::NotFound;
    }
    if name.contains(&b'/') {
        return Resolved::Path(PathBuf::from(OsStr::from_bytes(name)));
    }
    let mut saw_non_exec = false;
    for dir in path_var.split(|&b| b == b':') {
        let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
        let candidate = Path::new(OsStr::from_bytes(dir)).join(OsStr::from_bytes(name));
        match probe(&candidate) {
            Probe::Executable => return Resolved::Path(candidate),
            Probe::NotExecutable => saw_non_exec = true,
            Probe::Missing => {}
        }
    }
    if saw_non_exec {
        Resolved::NotExecutable
    } else {
        Resolved::NotFound
    }
}

/// Busybox applets not linked into PATH: `/.locald/applets` lists them,
/// one per line, and `/bin/busybox` runs the one named by `argv[0]`.
pub const APPLET_LIST: &str = "/.locald/applets";
/// The multi-call binary behind the applets.
pub const BUSYBOX: &str = "/bin/busybox";

/// True if `name` is a line of the applet list `list`.
pub fn is_applet(list: &[u8], name: &[u8]) -> bool {
    !name.is_empty() && !name.contains(&b'/') && list.split(|&b| b == b'\n').any(|l| l == name)
}

/// [`resolve`], falling back to busybox for listed applets that are not on
/// PATH (the caller keeps `argv[0]`, which busybox dispatches on).
pub fn resolve_or_applet(name: &[u8], path_var: &[u8], probe: impl Fn(&Path) -> Probe) -> Resolved {
    match resolve(name, path_var, &probe) {
        Resolved::NotFound => match std::fs::read(APPLET_LIST) {
            Ok(list)
                if is_applet(&list, name) && probe(Path::new(BUSYBOX)) == Probe::Executable =>
            {
                Resolved::Path(PathBuf::from(BUSYBOX))
            }
            _ => Resolved::NotFound,
        },
        other => other,
    }
}

/// Probes the real filesystem (one `stat`, following symlinks).
pub fn probe_fs(path: &Path) -> Probe {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Probe::Executable,
        Ok(_) => Probe::NotExecutable,
        Err(_) => Probe::Missing,
    }
}

/// Maps a `waitpid` status to an exit code: exited N → N, killed by signal
/// S → 128 + S.
pub fn code_from_wait_status(status: libc::c_int) -> u8 {
    if libc::WIFEXITED(status) {
        // WEXITSTATUS is 0..=255.
        libc::WEXITSTATUS(status) as u8
    } else if libc::WIFSIGNALED(status) {
        (128 + libc::WTERMSIG(status)).clamp(0, 255) as u8
    } else {
        // Stopped/continued are not reported without WUNTRACED; be safe.
        125
    }
}

/// Maps an exec/spawn `errno` to an exit code: not found → 127, anything
/// else (permission denied, exec format error, ...) → 126.
pub fn code_from_spawn_errno(errno: i32) -> u8 {
    match errno {
        libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::ENAMETOOLONG => CODE_NOT_FOUND,
        _ => CODE_NOT_EXECUTABLE,
    }
}

/// How the child's stdio is set up.
#[derive(Debug, Clone, Copy)]
pub enum Stdio<'a> {
    /// Inherit init's fds 0/1/2 (the console).
    Inherit,
    /// New session; open this tty as fds 0/1/2, making it the controlling
    /// terminal (a session leader opening a tty without `O_NOCTTY` acquires it).
    ControllingTty(&'a CStr),
}

/// Signals init takes synchronously.
pub const SUPERVISED_SIGNALS: &[libc::c_int] =
    &[libc::SIGCHLD, libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM];

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully, and
    // sigaddset with valid signal numbers cannot fail.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks [`SUPERVISED_SIGNALS`] so they queue for [`wait_for`].
pub fn block_signals() -> io::Result<()> {
    let set = sigset(SUPERVISED_SIGNALS);
    // SAFETY: `set` is initialised; old mask not requested.
    let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Owns the C-level spawn attributes; destroyed on drop.
struct SpawnSetup {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl SpawnSetup {
    fn new(stdio: Stdio<'_>) -> io::Result<Box<Self>> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(rc))
            }
        };
        // Boxed so the (possibly self-referential in libc) structs never move
        // after init.
        // SAFETY: both types are plain data and are initialised right below
        // before any other use.
        let mut s: Box<Self> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: valid pointers to owned storage.
        unsafe {
            check(libc::posix_spawnattr_init(&mut s.attr))?;
            check(libc::posix_spawn_file_actions_init(&mut s.actions))?;
        }
        let empty = sigset(&[]);
        let mut defaults: Vec<libc::c_int> = SUPERVISED_SIGNALS.to_vec();
        defaults.push(libc::SIGPIPE);
        let defaults = sigset(&defaults);
        let mut flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
        if let Stdio::ControllingTty(tty) = stdio {
            flags |= libc::c_int::from(libc::POSIX_SPAWN_SETSID);
            // SAFETY: `actions` is initialised; `tty` is NUL-terminated.
            // Opening with fd 0 closed first makes the tty fd 0; glibc runs
            // setsid before the file actions.
            unsafe {
                check(libc::posix_spawn_file_actions_addclose(&mut s.actions, 0))?;
                check(libc::posix_spawn_file_actions_addopen(
                    &mut s.actions,
                    0,
                    tty.as_ptr(),
                    libc::O_RDWR,
                    0,
                ))?;
                check(libc::posix_spawn_file_actions_adddup2(&mut s.actions, 0, 1))?;
                check(libc::posix_spawn_file_actions_adddup2(&mut s.actions, 0, 2))?;
            }
        }
        // SAFETY: `attr` is initialised; the sets are initialised.
        unsafe {
            check(libc::posix_spawnattr_setsigmask(&mut s.attr, &empty))?;
            check(libc::posix_spawnattr_setsigdefault(&mut s.attr, &defaults))?;
            check(libc::posix_spawnattr_setflags(
                &mut s.attr,
                flags as libc::c_short,
            ))?;
        }
        Ok(s)
    }
}

impl Drop for SpawnSetup {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `new` (a zeroed struct is also
        // accepted by glibc's destroy functions, which only free owned memory).
        unsafe {
            libc::posix_spawnattr_destroy(&mut self.attr);
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
        }
    }
}

/// Whom [`spawn_as`] runs the command as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (empty: none).
    pub groups: Vec<u32>,
}

/// Spawns `path` with `argv`/`envp` as `creds` (see the module docs); the
/// same contract as [`spawn`]. `creds` of root with no groups is still a
/// switch (it drops init's supplementary groups, which are none).
pub fn spawn_as(
    path: &Path,
    argv: &[CString],
    envp: &[CString],
    stdio: Stdio<'_>,
    creds: &Creds,
) -> io::Result<libc::pid_t> {
    // Everything the child needs is prepared before fork: no allocation
    // after it.
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let groups: Vec<libc::gid_t> = creds.groups.clone();
    let empty = sigset(&[]);
    let mut defaults: Vec<libc::c_int> = SUPERVISED_SIGNALS.to_vec();
    defaults.push(libc::SIGPIPE);
    let tty = match stdio {
        Stdio::ControllingTty(t) => Some(t),
        Stdio::Inherit => None,
    };
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: valid out array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: init is single-threaded, so the child is a full copy with no
    // lock held by another thread; the child only makes raw syscalls on
    // data prepared above and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: async-signal-safe calls only, on valid prepared data.
        unsafe {
            libc::close(rd);
            let fail = |wr: libc::c_int| -> ! {
                // Reads errno; an Os error holds no allocation.
                let errno = io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL);
                let b = errno.to_ne_bytes();
                libc::write(wr, b.as_ptr().cast(), b.len());
                libc::_exit(127)
            };
            if let Some(t) = tty {
                if libc::setsid() < 0 {
                    fail(wr);
                }
                libc::close(0);
                if libc::open(t.as_ptr(), libc::O_RDWR) != 0
                    || libc::dup2(0, 1) < 0
                    || libc::dup2(0, 2) < 0
                {
                    fail(wr);
                }
            }
            for &s in &defaults {
                libc::signal(s, libc::SIG_DFL);
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(creds.gid) != 0
                || libc::setuid(creds.uid) != 0
            {
                fail(wr);
            }
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::execve(cpath.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
            fail(wr);
        }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(wr) };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: closing the read end we own.
        unsafe { libc::close(rd) };
        return Err(e);
    }
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: reading into the unfilled part of `buf`.
        let n = unsafe { libc::read(rd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n > 0 {
            got += n as usize;
        } else if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    // SAFETY: closing the read end we own.
    unsafe { libc::close(rd) };
    if got == buf.len() {
        // The child failed before or at execve: reap it, report its errno.
        let mut status = 0;
        // SAFETY: our own child; valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(buf)));
    }
    Ok(pid)
}

/// Spawns `path` with `argv`/`envp`. On failure returns the exec `errno`
/// (glibc's posix_spawn reports execve failures this way).
pub fn spawn(
    path: &Path,
    argv: &[CString],
    envp: &[CString],
    stdio: Stdio<'_>,
) -> io::Result<libc::pid_t> {
    let setup = SpawnSetup::new(stdio)?;
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut argv_p: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_p.push(std::ptr::null_mut());
    let mut envp_p: Vec<*mut libc::c_char> = envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_p.push(std::ptr::null_mut());
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the duration of the call; argv and
    // envp are NULL-terminated arrays of NUL-terminated strings.
    let rc = unsafe {
        libc::posix_spawn(
            &mut pid,
            cpath.as_ptr(),
            &setup.actions,
            &setup.attr,
            argv_p.as_ptr(),
            envp_p.as_ptr(),
        )
    };
    if rc == 0 {
        Ok(pid)
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Why [`wait_for`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The command ended with this exit code (already mapped).
    Exited(u8),
    /// `halt`/`poweroff` (SIGUSR1/SIGUSR2): power off with code 0.
    PowerOff,
    /// `reboot` (SIGTERM).
    Reboot,
}

/// Reaps every child (PID 1 duty) until `pid` exits or a power signal
/// arrives. [`block_signals`] must have been called before the spawn.
pub fn wait_for(pid: libc::pid_t) -> Event {
    let set = sigset(SUPERVISED_SIGNALS);
    loop {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: valid out pointer; WNOHANG never blocks.
            let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if r <= 0 {
                break; // 0: children alive, none exited; -1: ECHILD/EINTR.
            }
            if r == pid {
                return Event::Exited(code_from_wait_status(status));
            }
        }
        // SAFETY: `set` is initialised; siginfo not requested.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        match sig {
            libc::SIGUSR1 | libc::SIGUSR2 => return Event::PowerOff,
            libc::SIGTERM => return Event::Reboot,
            _ => {} // SIGCHLD or EINTR: reap again.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &[u8] = b"/usr/local/bin:/usr/bin:/bin";

    fn fake(files: &'static [(&'static str, Probe)]) -> impl Fn(&Path) -> Probe {
        move |p: &Path| {
            files
                .iter()
                .find(|(f, _)| Path::new(f) == p)
                .map_or(Probe::Missing, |(_, pr)| *pr)
        }
    }

    #[test]
    fn resolve_first_executable_wins() {
        let probe = fake(&[
            ("/usr/bin/ls", Probe::Executable),
            ("/bin/ls", Probe::Executable),
        ]);
        assert_eq!(
            resolve(b"ls", PATH, &probe),
            Resolved::Path("/usr/bin/ls".into())
        );
    }

    #[test]
    fn resolve_skips_non_executable() {
        let probe = fake(&[
            ("/usr/local/bin/ls", Probe::NotExecutable),
            ("/bin/ls", Probe::Executable),
        ]);
        assert_eq!(
            resolve(b"ls", PATH, &probe),
            Resolved::Path("/bin/ls".into())
        );
        let probe = fake(&[("/usr/bin/ls", Probe::NotExecutable)]);
        assert_eq!(resolve(b"ls", PATH, &probe), Resolved::NotExecutable);
    }

    #[test]
    fn resolve_not_found_and_slash() {
        assert_eq!(resolve(b"nope", PATH, &fake(&[])), Resolved::NotFound);
        assert_eq!(resolve(b"", PATH, &fake(&[])), Resolved::NotFound);
        assert_eq!(
            resolve(b"./x", PATH, &fake(&[])),
            Resolved::Path("./x".into())
        );
        assert_eq!(
            resolve(b"/no/such", PATH, &fake(&[])),
            Resolved::Path("/no/such".into())
        );
    }

    #[test]
    fn resolve_empty_path_entry_is_cwd() {
        let probe = fake(&[("./tool", Probe::Executable)]);
        assert_eq!(
            resolve(b"tool", b"/bin::/usr/bin", &probe),
            Resolved::Path("./tool".into())
        );
    }

    #[test]
    fn probe_real_files() {
        assert_eq!(probe_fs(Path::new("/bin/sh")), Probe::Executable);
        assert_eq!(probe_fs(Path::new("/etc/passwd")), Probe::NotExecutable);
        assert_eq!(probe_fs(Path::new("/")), Probe::NotExecutable);
        assert_eq!(probe_fs(Path::new("/no/such/file")), Probe::Missing);
    }

    #[test]
    fn wait_status_mapping() {
        assert_eq!(code_from_wait_status(0), 0);
        assert_eq!(code_from_wait_status(3 << 8), 3);
        assert_eq!(code_from_wait_status(255 << 8), 255);
        assert_eq!(code_from_wait_status(libc::SIGKILL), 137);
        assert_eq!(code_from_wait_status(libc::SIGSEGV | 0x80), 139); // core dumped
        assert_eq!(code_from_wait_status(libc::SIGTERM), 143);
    }

    #[test]
    fn spawn_errno_mapping() {
        assert_eq!(code_from_spawn_errno(libc::ENOENT), 127);
        assert_eq!(code_from_spawn_errno(libc::ENOTDIR), 127);
        assert_eq!(code_from_spawn_errno(libc::EACCES), 126);
        assert_eq!(code_from_spawn_errno(libc::ENOEXEC), 126);
        assert_eq!(code_from_spawn_errno(libc::EPERM), 126);
    }

    #[test]
    fn spawn_and_reap_real_process() {
        // Exercises posix_spawn + status mapping without touching the signal
        // mask of the test process (waitpid on the pid directly).
        let argv = [
            CString::new("sh").unwrap(),
            CString::new("-c").unwrap(),
            CString::new("exit 7").unwrap(),
        ];
        let pid = spawn(Path::new("/bin/sh"), &argv, &[], Stdio::Inherit).unwrap();
        let mut status = 0;
        // SAFETY: valid out pointer, our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(code_from_wait_status(status), 7);
        let err = spawn(Path::new("/no/such/binary"), &argv, &[], Stdio::Inherit).unwrap_err();
        assert_eq!(code_from_spawn_errno(err.raw_os_error().unwrap()), 127);
        let err = spawn(Path::new("/etc/passwd"), &argv, &[], Stdio::Inherit).unwrap_err();
        assert_eq!(code_from_spawn_errno(err.raw_os_error().unwrap()), 126);
    }

    #[test]
    fn controlling_tty_for_interactive_mode() {
        use std::io::Read;
        use std::os::fd::FromRawFd;
        // SAFETY: standard pty allocation; the master fd is owned by `master`.
        let (mut master, slave) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            let name = std::ffi::CStr::from_ptr(libc::ptsname(fd)).to_owned();
            (std::fs::File::from_raw_fd(fd), name)
        };
        // Prints: its pid, then fields of /proc/self/stat (pid comm state
        // ppid pgrp session tty_nr ...), then whether stdin/stdout are ttys.
        let script = "echo $$; cat /proc/$$/stat; [ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo TTY";
        let argv = [
            CString::new("sh").unwrap(),
            CString::new("-c").unwrap(),
            CString::new(script).unwrap(),
        ];
        let pid = spawn(
            Path::new("/bin/sh"),
            &argv,
            &[],
            Stdio::ControllingTty(&slave),
        )
        .unwrap();
        let mut status = 0;
        // SAFETY: valid out pointer, our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(code_from_wait_status(status), 0);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Reading the master after the slave side closed ends with EIO.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let out = String::from_utf8_lossy(&out);
        let mut lines = out.lines();
        let sh_pid: i32 = lines.next().unwrap().trim().parse().unwrap();
        assert_eq!(sh_pid, pid);
        let stat: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(
            stat[5].parse::<i32>().unwrap(),
            pid,
            "session leader: {out}"
        );
        assert_ne!(stat[6], "0", "has a controlling tty: {out}");
        assert_eq!(lines.next().map(str::trim), Some("TTY"), "{out}");
    }

    #[test]
    fn spawn_as_other_user() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::test_support::skip(crate::test_support::Why::NotRoot("setuid/setgid"));
            return;
        }
        let sh = |script: &str| {
            [
                CString::new("sh").unwrap(),
                CString::new("-c").unwrap(),
                CString::new(script).unwrap(),
            ]
        };
        let creds = Creds {
            uid: 1234,
            gid: 2345,
            groups: vec![3456, 4567],
        };
        let argv = sh(
            r#"[ "$(id -u)" = 1234 ] && [ "$(id -g)" = 2345 ] && [ "$(id -G)" = "2345 3456 4567" ] && [ "$HOME" = /home/x ]"#,
        );
        let env = [CString::new("HOME=/home/x").unwrap()];
        let pid = spawn_as(Path::new("/bin/sh"), &argv, &env, Stdio::Inherit, &creds).unwrap();
        let mut status = 0;
        // SAFETY: valid out pointer, our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(code_from_wait_status(status), 0, "id checks failed");
        // No supplementary groups at all.
        let none = Creds {
            groups: vec![],
            ..creds.clone()
        };
        let argv = sh(r#"[ "$(id -G)" = 2345 ] && exit 9"#);
        let pid = spawn_as(Path::new("/bin/sh"), &argv, &[], Stdio::Inherit, &none).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(code_from_wait_status(status), 9);
        // Exec failures come back as errno, like posix_spawn.
        let err = spawn_as(Path::new("/no/such"), &argv, &[], Stdio::Inherit, &creds).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        // /etc/passwd is not executable (and as uid 1234, /root/x is out of reach).
        let err =
            spawn_as(Path::new("/etc/passwd"), &argv, &[], Stdio::Inherit, &creds).unwrap_err();
        assert_eq!(code_from_spawn_errno(err.raw_os_error().unwrap()), 126);
    }

    #[test]
    fn applet_list_lookup() {
        let list = b"cat\nls\nnproc\n";
        assert!(is_applet(list, b"nproc"));
        assert!(is_applet(list, b"cat"));
        assert!(!is_applet(list, b"nprocx"));
        assert!(!is_applet(list, b"proc"));
        assert!(!is_applet(list, b""));
        assert!(!is_applet(list, b"bin/ls"));
    }
}
