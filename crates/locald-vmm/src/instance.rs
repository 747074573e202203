//! Long-lived, named VMs: their state directory, and the control protocol
//! spoken on each VM's control socket (JSON lines over a Unix socket,
//! versioned; see docs/control-protocol.md).
//!
//! A named VM lives in `<runtime base>/<name>/`: `control.sock` (served
//! by the process that runs the VM), `vsock.sock` (its vsock device's
//! hybrid socket, through which commands run), and `console.log`. The
//! server side ([`serve_control`]) runs on a thread of that process; the
//! client functions ([`info`], [`stop`], [`list`]) run on the caller's
//! thread.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Version of the control protocol.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line the server reads.
pub const MAX_REQUEST: usize = 64 * 1024;

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

/// The state directory of VM `name`.
pub fn dir(name: &str) -> PathBuf {
    crate::runtime_base().join("vms").join(name)
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
}

/// A control response line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// Answer to `info`.
    Info(Info),
    /// The VM stopped; `how` says how the guest ended.
    Stopped { how: String },
    /// The request was refused.
    Error { message: String },
}

/// Parses one request line; errors become an [`Response::Error`] text.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

/// One request/response exchange with VM `name`.
pub fn call(name: &str, req: &Request) -> Result<Response, InstanceError> {
    check_name(name)?;
    let path = control_path(name);
    if !dir(name).exists() {
        return Err(InstanceError::NotFound(name.to_string()));
    }
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
            // Nobody serves it: a VMM that crashed left its directory.
            let _ = std::fs::remove_dir_all(dir(name));
            return Err(InstanceError::Stale(name.to_string()));
        }
        Err(e) => return Err(io_err(e)),
    };
    let timeout = match req {
        Request::Stop { timeout_secs } => Duration::from_secs(timeout_secs + 30),
        Request::Info => Duration::from_secs(10),
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

/// Every named VM: its info, or the error asking for it (stale VMs are
/// cleaned up and reported as such).
pub fn list() -> Vec<(String, Result<Info, InstanceError>)> {
    let base = crate::runtime_base().join("vms");
    let mut names: Vec<String> = std::fs::read_dir(&base)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| check_name(n).is_ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let r = info(&n);
            (n, r)
        })
        .collect()
}

/// Creates the state directory of a new VM `name`: fails if a live VM
/// has it, cleans it up if stale.
pub fn create_dir(name: &str) -> Result<PathBuf, InstanceError> {
    use std::os::unix::fs::DirBuilderExt;
    check_name(name)?;
    let d = dir(name);
    if d.exists() {
        match UnixStream::connect(control_path(name)) {
            Ok(_) => return Err(InstanceError::Exists(name.to_string())),
            Err(_) => {
                // Either stale, or a VM still starting: a starting VM holds
                // the lock file below.
                if lock_held(&d) {
                    return Err(InstanceError::Exists(name.to_string()));
                }
                let _ = std::fs::remove_dir_all(&d);
            }
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .map_err(|err| InstanceError::Io {
            name: name.to_string(),
            err,
        })?;
    Ok(d)
}

/// Whether another process holds `dir/lock` (the VMM serving this VM
/// keeps it for its lifetime).
fn lock_held(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::File::open(dir.join("lock")) else {
        return false;
    };
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    rc != 0
}

/// Takes `dir/lock` for the life of the returned file.
pub fn hold_lock(dir: &Path) -> io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(dir.join("lock"))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

/// What the control server asks of the VM it serves.
pub trait ControlTarget {
    /// Current description.
    fn info(&self) -> Info;
    /// Stops the VM (blocking); returns how the guest ended.
    fn stop(&mut self, timeout: Duration) -> String;
    /// Whether the VM still runs (the server exits when it does not).
    fn running(&self) -> bool;
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
                Ok(Request::Stop { timeout_secs }) => {
                    let how = target.stop(Duration::from_secs(timeout_secs));
                    let mut out =
                        serde_json::to_string(&Response::Stopped { how }).unwrap_or_default();
                    out.push('\n');
                    let _ = w.write_all(out.as_bytes());
                    return Ok(());
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
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web-1", "svc_2.test", &"x".repeat(32)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "sp ace", &"x".repeat(33), "ü"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_wire_format() {
        assert_eq!(parse_request(r#"{"op":"info"}"#), Ok(Request::Info));
        assert_eq!(
            parse_request(r#"{"op":"stop"}"#),
            Ok(Request::Stop { timeout_secs: 10 })
        );
        assert_eq!(
            parse_request(r#"{"op":"stop","timeout_secs":3}"#),
            Ok(Request::Stop { timeout_secs: 3 })
        );
        for bad in [
            "",
            "{}",
            "[1]",
            r#"{"op":"format_disk"}"#,
            "\u{0}",
            r#"{"op":"stop","timeout_secs":-1}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        let s = serde_json::to_string(&Response::Stopped {
            how: "poweroff".into(),
        })
        .unwrap();
        assert_eq!(s, r#"{"status":"stopped","how":"poweroff"}"#);
    }

    struct Fake {
        stopped: bool,
    }

    impl ControlTarget for Fake {
        fn info(&self) -> Info {
            Info {
                version: PROTOCOL_VERSION,
                name: "t".into(),
                pid: 1,
                cpus: 2,
                memory_mib: 128,
                started_at: 0,
                vsock: "/x".into(),
                publish: vec![(8080, 80)],
            }
        }
        fn stop(&mut self, _timeout: Duration) -> String {
            self.stopped = true;
            "poweroff".into()
        }
        fn running(&self) -> bool {
            !self.stopped
        }
    }

    #[test]
    fn control_server_answers_and_survives_bad_clients() {
        let d = std::env::temp_dir().join(format!("locald-ctl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("c.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let mut f = Fake { stopped: false };
            serve_control(&l, &mut f).unwrap();
            f.stopped
        });
        let ask = |text: &[u8]| -> String {
            let mut s = UnixStream::connect(&path).unwrap();
            s.write_all(text).unwrap();
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut out = String::new();
            let _ = BufReader::new(s).read_line(&mut out);
            out
        };
        assert!(ask(b"{\"op\":\"info\"}\n").contains("\"publish\":[[8080,80]]"));
        assert!(ask(b"garbage\n").contains("\"status\":\"error\""));
        assert!(ask(b"{\"op\":\"info\"}").contains("unterminated"));
        assert!(ask(&vec![b'x'; MAX_REQUEST + 10]).contains("error"));
        assert!(ask(b"{\"op\":\"stop\",\"timeout_secs\":1}\n").contains("poweroff"));
        assert!(server.join().unwrap());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
