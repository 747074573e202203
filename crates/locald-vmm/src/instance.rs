//! Long-lived, named VMs: their state directory, and the control protocol
//! spoken on each VM's control socket (JSON lines over a Unix socket,
//! versioned; see docs/control-protocol.md).
//!
//! A named VM lives in `<runtime base>/vms/<name>/`: `control.sock`
//! (served by the process that runs the VM), `vsock.sock` (its vsock
//! device's hybrid socket, through which commands run), `console.log`, and
//! `lock` (held by that process for its whole life). Every level of that
//! path is checked before use ([`crate::hostdir`]): another user's or a
//! world-writable directory, or a symlink, is refused. The server side
//! ([`serve_control`]) runs on a thread of that process; the client
//! functions ([`info`], [`stop`], [`list`]) run on the caller's thread.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::hostdir::{self, Create, HostDirError};

/// Version of the control protocol.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the server reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Longest `stop` grace period (100 years, as `run --timeout`).
pub const MAX_STOP_TIMEOUT_SECS: u64 = 100 * 365 * 86_400;

/// Errors about named VMs.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "invalid VM name '{0}': use 1-32 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    #[error("no VM named '{0}' (see `locald-vmm ps`)")]
    NotFound(String),
    #[error("a VM named '{0}' is already running")]
    Exists(String),
    #[error("VM '{0}' is not running: its VMM is gone (stale state cleaned up)")]
    Stale(String),
    #[error("VM '{0}' is not ready: it is still starting (or stopping); try again shortly")]
    Busy(String),
    #[error("stop timeout {0} s is too large (at most {MAX_STOP_TIMEOUT_SECS} s, 100 years)")]
    Timeout(u64),
    #[error(transparent)]
    Untrusted(#[from] HostDirError),
    #[error("state directory of VM '{name}': {err}")]
    State { name: String, err: io::Error },
    #[error("control socket of VM '{name}': {err}")]
    Io { name: String, err: io::Error },
    #[error("VM '{name}' answered: {message}")]
    Remote { name: String, message: String },
}

/// Checks a VM name.
pub fn check_name(name: &str) -> Result<(), InstanceError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(InstanceError::BadName(name.to_string()))
    }
}

/// The state directory of VM `name` (the path only, for messages: use
/// [`checked_dir`] to reach it).
pub fn dir(name: &str) -> PathBuf {
    crate::runtime_base().join("vms").join(name)
}

/// `<runtime base>/vms`, checked; created (mode 0700) when `create`.
fn vms_dir(create: bool) -> Result<Option<PathBuf>, InstanceError> {
    let Some(base) = hostdir::runtime_dir(create)? else {
        return Ok(None);
    };
    let vms = base.join("vms");
    Ok(if create {
        Some(hostdir::ensure_private_dir(&vms)?)
    } else {
        hostdir::check_private_dir(&vms)?
    })
}

/// The state directory of VM `name` after checking every level of it
/// (ours, private, no symlinks); `None` if there is none.
pub fn checked_dir(name: &str) -> Result<Option<PathBuf>, InstanceError> {
    check_name(name)?;
    let Some(vms) = vms_dir(false)? else {
        return Ok(None);
    };
    Ok(hostdir::check_private_dir(&vms.join(name))?)
}

/// The vsock socket of VM `name`, in its checked state directory (what
/// `exec` connects to, whatever path the VM reports).
pub fn checked_vsock_path(name: &str) -> Result<PathBuf, InstanceError> {
    let d = checked_dir(name)?.ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
    Ok(d.join("vsock.sock"))
}

/// Paths inside a VM's state directory.
pub fn control_path(name: &str) -> PathBuf {
    dir(name).join("control.sock")
}

/// The vsock hybrid socket of VM `name`.
pub fn vsock_path(name: &str) -> PathBuf {
    dir(name).join("vsock.sock")
}

/// A control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Describe the VM.
    Info,
    /// Pause the VM, write its snapshot into `dir` (absolute; new or
    /// empty), then resume it or, with `stop`, end it.
    Snapshot {
        /// Where the snapshot goes.
        dir: PathBuf,
        /// Stop the VM once the snapshot is written.
        #[serde(default)]
        stop: bool,
    },
    /// Power the guest off cleanly (forced after `timeout_secs`), then the
    /// VMM exits.
    Stop {
        /// Grace period before the VM is stopped by force.
        #[serde(default = "default_stop_timeout")]
        timeout_secs: u64,
    },
}

fn default_stop_timeout() -> u64 {
    10
}

/// What a running VM reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Protocol version of the server.
    pub version: u32,
    /// VM name.
    pub name: String,
    /// PID of the VMM process.
    pub pid: u32,
    /// vCPUs.
    pub cpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Unix time the VM started.
    pub started_at: u64,
    /// Host socket for vsock connections (and the agent).
    pub vsock: PathBuf,
    /// Published ports as (host, guest).
    pub publish: Vec<(u16, u16)>,
    /// The OCI image's `ExposedPorts` (`80/tcp`…), when it boots one.
    #[serde(default)]
    pub exposed: Vec<String>,
}

/// A control response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `info`.
    Info(Info),
    /// The VM stopped; `how` says how the guest ended.
    Stopped { how: String },
    /// A snapshot was written.
    Snapshotted {
        /// Its directory.
        dir: PathBuf,
        /// How long the vCPUs were paused, in milliseconds.
        paused_ms: u64,
        /// Bytes of guest memory written.
        memory_bytes: u64,
        /// Whether the VM stopped after it.
        stopped: bool,
    },
    /// The request was refused.
    Error { message: String },
}

/// Parses one request line; errors become an [`Response::Error`] text.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// One request/response exchange with VM `name`.
pub fn call(name: &str, req: &Request) -> Result<Response, InstanceError> {
    let timeout = match req {
        Request::Stop { timeout_secs } if *timeout_secs > MAX_STOP_TIMEOUT_SECS => {
            return Err(InstanceError::Timeout(*timeout_secs));
        }
        Request::Stop { timeout_secs } => Duration::from_secs(timeout_secs + 30),
        Request::Info => Duration::from_secs(10),
        Request::Snapshot { .. } => Duration::from_secs(600),
    };
    let d = checked_dir(name)?.ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
    let path = d.join("control.sock");
    let io_err = |err| InstanceError::Io {
        name: name.to_string(),
        err,
    };
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            // Nobody serves it: a VM still starting, or one whose VMM
            // crashed and left its directory.
            return Err(remove_if_stale(name, &d));
        }
        Err(e) => return Err(io_err(e)),
    };
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(|e| io_err(io::Error::other(e)))?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(io_err)?;
    let reply = crate::agent::read_line(&mut BufReader::new(s), MAX_REQUEST).map_err(io_err)?;
    let resp: Response = serde_json::from_str(&reply)
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if let Response::Error { message } = resp {
        return Err(InstanceError::Remote {
            name: name.to_string(),
            message,
        });
    }
    Ok(resp)
}

/// Describes VM `name`.
pub fn info(name: &str) -> Result<Info, InstanceError> {
    match call(name, &Request::Info)? {
        Response::Info(i) => Ok(i),
        other => Err(InstanceError::Remote {
            name: name.into(),
            message: format!("unexpected answer {other:?}"),
        }),
    }
}

/// Stops VM `name` (clean poweroff, forced after `timeout`).
pub fn stop(name: &str, timeout: Duration) -> Result<String, InstanceError> {
    if timeout.as_secs() > MAX_STOP_TIMEOUT_SECS {
        return Err(InstanceError::Timeout(timeout.as_secs()));
    }
    match call(
        name,
        &Request::Stop {
            timeout_secs: timeout.as_secs(),
        },
    )? {
        Response::Stopped { how } => {
            // The VM's process removes the directory as it exits; wait for
            // that so a following `ps` or `start` sees a clean slate.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while dir(name).exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(how)
        }
        other => Err(InstanceError::Remote {
            name: name.into(),
            message: format!("unexpected answer {other:?}"),
        }),
    }
}

/// Snapshots VM `name` into `dir` (absolute), stopping it after with
/// `stop`; returns the server's answer.
pub fn snapshot(name: &str, dir: &Path, stop: bool) -> Result<Response, InstanceError> {
    let resp = call(
        name,
        &Request::Snapshot {
            dir: dir.to_path_buf(),
            stop,
        },
    )?;
    if stop {
        // As for `stop`: the VM's process removes its directory on exit.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self::dir(name).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(resp)
}

/// One entry of [`list`]: a VM's name and its info (or why there is none).
pub type Listed = (String, Result<Info, InstanceError>);

/// Every named VM: its info, or the error asking for it (stale VMs are
/// cleaned up and reported as such, starting ones as [`InstanceError::Busy`]).
/// Fails only when the runtime directory cannot be trusted.
pub fn list() -> Result<Vec<Listed>, InstanceError> {
    let Some(vms) = vms_dir(false)? else {
        return Ok(Vec::new());
    };
    let mut names: Vec<String> = std::fs::read_dir(&vms)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| check_name(n).is_ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| {
            let r = info(&n);
            (n, r)
        })
        .collect())
}

/// A new VM's state directory, claimed: its `lock` is held for as long as
/// this lives (the VM's whole life).
#[derive(Debug)]
pub struct Claimed {
    /// The state directory (checked, ours).
    pub dir: PathBuf,
    /// The held lock file.
    pub lock: File,
}

fn state_err(name: &str) -> impl FnOnce(io::Error) -> InstanceError + use<'_> {
    move |err| InstanceError::State {
        name: name.to_string(),
        err,
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: whether we got it.
fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Called when nobody serves `d/control.sock`. A VM that is still starting
/// holds `d/lock`: it is left alone ([`InstanceError::Busy`]). Otherwise
/// the VMM is gone: we take the lock ourselves, check `d` is still the
/// directory we locked, move it aside and remove it
/// ([`InstanceError::Stale`]). Taking the lock first means two cleaners,
/// or a cleaner and a `start` that replaced the directory, never remove a
/// live VM's state.
fn remove_if_stale(name: &str, d: &Path) -> InstanceError {
    let lock_path = d.join("lock");
    let lock = match hostdir::open_nofollow(&lock_path, Create::IfMissing) {
        Ok(f) => f,
        Err(HostDirError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return InstanceError::NotFound(name.to_string());
        }
        Err(e) => return e.into(),
    };
    if !try_lock(&lock) {
        return InstanceError::Busy(name.to_string());
    }
    let same = match (lock.metadata(), std::fs::symlink_metadata(&lock_path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    if !same {
        // Replaced since we opened it: a new VM is starting there.
        return InstanceError::Busy(name.to_string());
    }
    let grave = d.with_file_name(format!(".stale-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&grave);
    if std::fs::rename(d, &grave).is_ok() {
        let _ = std::fs::remove_dir_all(&grave);
    }
    InstanceError::Stale(name.to_string())
}

/// `rename(from, to)` that fails if `to` exists (`RENAME_NOREPLACE`).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (f, t) = (c(from)?, c(to)?);
    #[cfg(target_os = "macos")]
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::renamex_np(f.as_ptr(), t.as_ptr(), libc::RENAME_EXCL) };
    #[cfg(not(target_os = "macos"))]
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Claims the state directory of a new VM `name`: fails if a live (or
/// starting) VM has it, cleans it up if stale. The directory appears
/// already locked: it is made as `vms/.new-<name>-<pid>` (mode 0700), its
/// `lock` created (`O_EXCL|O_NOFOLLOW`) and taken, then renamed into place
/// without replacing anything, so no other command ever sees it unlocked.
pub fn create_dir(name: &str) -> Result<Claimed, InstanceError> {
    check_name(name)?;
    let vms = vms_dir(true)?.ok_or_else(|| InstanceError::NotFound(name.to_string()))?;
    let d = vms.join(name);
    if let Some(d) = hostdir::check_private_dir(&d)? {
        if UnixStream::connect(d.join("control.sock")).is_ok() {
            return Err(InstanceError::Exists(name.to_string()));
        }
        match remove_if_stale(name, &d) {
            InstanceError::Stale(_) | InstanceError::NotFound(_) => {}
            InstanceError::Busy(_) => return Err(InstanceError::Exists(name.to_string())),
            e => return Err(e),
        }
    }
    let tmp = vms.join(format!(".new-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let claimed = (|| {
        let tmp = hostdir::ensure_private_dir(&tmp)?;
        let lock = hostdir::open_nofollow(&tmp.join("lock"), Create::New)?;
        if !try_lock(&lock) {
            return Err(state_err(name)(io::Error::last_os_error()));
        }
        match rename_noreplace(&tmp, &d) {
            Ok(()) => Ok(Claimed { dir: d, lock }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
                Err(InstanceError::Exists(name.to_string()))
            }
            Err(e) => Err(state_err(name)(e)),
        }
    })();
    if claimed.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    claimed
}

/// Opens `console.log` in a VM's state directory without following a
/// symlink; `create` makes a new one (`O_EXCL`).
pub fn open_console_log(dir: &Path, create: bool) -> Result<File, InstanceError> {
    let how = if create { Create::New } else { Create::No };
    Ok(hostdir::open_nofollow(&dir.join("console.log"), how)?)
}

/// What the control server asks of the VM it serves.
pub trait ControlTarget {
    /// Current description.
    fn info(&self) -> Info;
    /// Stops the VM (blocking); returns how the guest ended.
    fn stop(&mut self, timeout: Duration) -> String;
    /// Whether the VM still runs (the server exits when it does not).
    fn running(&self) -> bool;
    /// Snapshots the VM into `dir` (stopping it after with `stop`).
    fn snapshot(&mut self, dir: &Path, stop: bool) -> Response;
}

/// Serves `listener` until a stop request was handled or the VM ended.
/// One client at a time; each gets one answer per request line. Runs on
/// the caller's thread.
pub fn serve_control(listener: &UnixListener, target: &mut dyn ControlTarget) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    loop {
        if !target.running() {
            return Ok(());
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e),
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut w = stream;
        let mut line = String::new();
        let resp = match io::Read::take(&mut reader, MAX_REQUEST as u64 + 1).read_line(&mut line) {
            Ok(_) if line.len() > MAX_REQUEST || !line.ends_with('\n') => Response::Error {
                message: format!("request missing, unterminated or over {MAX_REQUEST} bytes"),
            },
            Ok(_) => match parse_request(line.trim_end()) {
                Ok(Request::Info) => Response::Info(target.info()),
                Ok(Request::Stop { timeout_secs }) if timeout_secs > MAX_STOP_TIMEOUT_SECS => {
                    Response::Error {
                        message: InstanceError::Timeout(timeout_secs).to_string(),
                    }
                }
                Ok(Request::Stop { timeout_secs }) => {
                    let how = target.stop(Duration::from_secs(timeout_secs));
                    let mut out =
                        serde_json::to_string(&Response::Stopped { how }).unwrap_or_default();
                    out.push('\n');
                    let _ = w.write_all(out.as_bytes());
                    return Ok(());
                }
                Ok(Request::Snapshot { dir, .. }) if !dir.is_absolute() => Response::Error {
                    message: format!("snapshot directory {} is not absolute", dir.display()),
                },
                Ok(Request::Snapshot { dir, stop }) => {
                    let resp = target.snapshot(&dir, stop);
                    if matches!(resp, Response::Snapshotted { stopped: true, .. }) {
                        let mut out = serde_json::to_string(&resp).unwrap_or_default();
                        out.push('\n');
                        let _ = w.write_all(out.as_bytes());
                        return Ok(());
                    }
                    resp
                }
                Err(message) => Response::Error { message },
            },
            Err(e) => Response::Error {
                message: format!("reading the request: {e}"),
            },
        };
        let mut out = serde_json::to_string(&resp).unwrap_or_default();
        out.push('\n');
        let _ = w.write_all(out.as_bytes());
    }
}

#[cfg(test)]
mod tests;
