//! Host side of the guest agent: waiting for the agent's readiness call,
//! connecting to it through the vsock device's hybrid Unix socket
//! (`CONNECT <port>\n` → `OK <port>\n`), and running commands with their
//! stdin, stdout and stderr relayed byte for byte (protocol in the
//! `locald-agent-proto` crate).
//!
//! Runs on the caller's thread, plus one stdin-forwarding thread per
//! command that has stdin (under the `control` seccomp filter when the
//! caller is filtered, see [`crate::seccomp::spawn_inherit`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use locald_agent_proto::{
    ExecRequest, ExitKind, Frame, Refresh, AGENT_PORT, READY_LINE, READY_PORT,
};

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent did not become ready within {0:?} (did the guest boot? run with -v to see its console)")]
    NotReady(Duration),
    #[error("cannot reach the VM's vsock socket {}: {err}", .path.display())]
    Connect { path: PathBuf, err: io::Error },
    #[error("the VM refused a connection to guest port {port}: {reply}")]
    Refused { port: u32, reply: String },
    #[error("lost the connection to the guest agent: {0}")]
    Io(#[from] io::Error),
    #[error("the guest agent broke the protocol: {0}")]
    Protocol(String),
}

/// Path of the host socket the vsock device connects to for guest
/// connections to host port `port` (Firecracker's hybrid convention).
pub fn host_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Listens for the agent's readiness connection (guest → host port
/// [`READY_PORT`]). Create it before the VM boots.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Binds `<uds>_1023`, replacing a stale socket file.
    pub fn bind(uds: &Path) -> io::Result<Self> {
        let path = host_port_path(uds, READY_PORT);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        listener.set_nonblocking(true)?;
        Ok(ReadyListener { listener, path })
    }

    /// Waits until the agent says it is ready, the VM ends (`alive`
    /// returns false) or `timeout` passes.
    pub fn wait(&self, timeout: Duration, alive: impl Fn() -> bool) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut line = vec![0u8; READY_LINE.len()];
                    if s.read_exact(&mut line).is_ok() && line == READY_LINE {
                        return Ok(());
                    }
                    tracing::warn!("unexpected readiness message from the guest: {line:?}");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if !alive() || Instant::now() >= deadline {
                return Err(AgentError::NotReady(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens a stream to guest vsock port `port` through the hybrid socket.
pub fn connect(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let mut s = UnixStream::connect(uds).map_err(|err| AgentError::Connect {
        path: uds.to_path_buf(),
        err,
    })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply byte by byte: whatever follows belongs to the stream.
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while reply.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => reply.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    s.set_read_timeout(None)?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if reply.starts_with("OK ") {
        Ok(s)
    } else {
        Err(AgentError::Refused {
            port,
            reply: if reply.is_empty() {
                "connection closed (nothing listens on that port)".into()
            } else {
                reply
            },
        })
    }
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecOutcome {
    /// It ran and ended.
    Ended(ExitKind),
    /// It could not start; `code` is the shell's (126, 127 or 125).
    Failed { code: u8, message: String },
}

impl ExecOutcome {
    /// Exit code a shell would report.
    pub fn shell_code(&self) -> u8 {
        match self {
            ExecOutcome::Ended(k) => k.shell_code(),
            ExecOutcome::Failed { code, .. } => *code,
        }
    }
}

/// A command's standard streams on the host side.
pub struct ExecIo<'a> {
    /// Read until EOF and forwarded (None: the command's stdin is closed).
    pub stdin: Option<Box<dyn Read + Send>>,
    /// Receives the command's stdout (or terminal output).
    pub stdout: &'a mut dyn Write,
    /// Receives the command's stderr.
    pub stderr: &'a mut dyn Write,
}

/// A command running in the guest, for sending it signals or resizes
/// from another thread.
#[derive(Clone)]
pub struct ExecHandle {
    writer: Arc<Mutex<UnixStream>>,
}

impl ExecHandle {
    /// Sends `frame` (Signal, Resize, Stdin).
    pub fn send(&self, frame: &Frame) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        frame.write_to(&mut *w)
    }
}

/// Runs `req` through the agent at guest port [`AGENT_PORT`] and relays
/// its streams until it ends. `on_start` gets a handle once it runs.
pub fn exec(
    uds: &Path,
    req: ExecRequest,
    io: ExecIo<'_>,
    on_start: impl FnOnce(ExecHandle),
) -> Result<ExecOutcome, AgentError> {
    let tty = req.tty.is_some();
    let stream = connect(uds, AGENT_PORT)?;
    let writer = Arc::new(Mutex::new(stream.try_clone()?));
    let handle = ExecHandle {
        writer: writer.clone(),
    };
    handle.send(&Frame::Exec(req))?;
    let mut reader = BufReader::with_capacity(128 * 1024, stream);
    let mut stdin = io.stdin;
    let mut on_start = Some(on_start);
    loop {
        let frame = match Frame::read_from(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(AgentError::Protocol(
                    "the agent closed the stream before the command's exit status".into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(AgentError::Protocol(e.to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        match frame {
            Frame::Started(_pid) => {
                match stdin.take() {
                    Some(input) => spawn_stdin_pump(input, handle.clone())?,
                    // On a terminal an empty Stdin frame types ^D: only
                    // close a pipe.
                    None if !tty => handle.send(&Frame::Stdin(Vec::new()))?,
                    None => {}
                }
                if let Some(f) = on_start.take() {
                    f(handle.clone());
                }
            }
            Frame::Stdout(d) => {
                io.stdout.write_all(&d)?;
                io.stdout.flush()?;
            }
            Frame::Stderr(d) => {
                io.stderr.write_all(&d)?;
                io.stderr.flush()?;
            }
            Frame::Exit(k) => return Ok(ExecOutcome::Ended(k)),
            Frame::Error { code, message } => return Ok(ExecOutcome::Failed { code, message }),
            other => {
                return Err(AgentError::Protocol(format!(
                    "unexpected frame from the agent: {other:?}"
                )))
            }
        }
    }
}

/// Forwards `input` as Stdin frames, then an empty frame for EOF. The
/// thread ends at EOF or when the connection goes away.
fn spawn_stdin_pump(mut input: Box<dyn Read + Send>, handle: ExecHandle) -> io::Result<()> {
    crate::seccomp::spawn_inherit(
        "agent stdin".into(),
        crate::seccomp::ThreadKind::Control,
        move || {
            let mut buf = vec![0u8; locald_agent_proto::MAX_DATA];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => {
                        let _ = handle.send(&Frame::Stdin(Vec::new()));
                        return;
                    }
                    Ok(n) => {
                        if handle.send(&Frame::Stdin(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        let _ = handle.send(&Frame::Stdin(Vec::new()));
                        return;
                    }
                }
            }
        },
    )?;
    Ok(())
}

/// Bytes of host randomness a restored guest gets.
pub const REFRESH_ENTROPY: usize = 64;

/// A refresh for a restored guest: the host's wall clock now, fresh
/// random bytes, and `hostname` if it changes.
pub fn refresh_now(hostname: Option<&str>, shares: &[u8]) -> io::Result<Refresh> {
    let mut entropy = vec![0u8; REFRESH_ENTROPY];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut entropy)?;
    let time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Ok(Refresh {
        time_ns,
        entropy,
        hostname: hostname.map(|h| h.as_bytes().to_vec()),
        shares: shares.to_vec(),
    })
}

/// Sends a restored guest its refresh ([`Frame::Refresh`]) and waits for
/// the agent's answer.
pub fn refresh(uds: &Path, r: &Refresh) -> Result<(), AgentError> {
    let mut s = connect(uds, AGENT_PORT)?;
    Frame::Refresh(r.clone()).write_to(&mut s)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    match Frame::read_from(&mut s)? {
        Some(Frame::Exit(ExitKind::Code(0))) => Ok(()),
        Some(Frame::Error { message, .. }) => Err(AgentError::Protocol(format!(
            "the guest refused the refresh: {message}"
        ))),
        Some(other) => Err(AgentError::Protocol(format!(
            "unexpected answer to Refresh: {other:?}"
        ))),
        // A connection the guest's transport reset dropped: retried.
        None => Err(AgentError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the stream before answering Refresh",
        ))),
    }
}

/// Refreshes a restored guest ([`refresh`]), retrying while its agent is
/// not reachable yet (the guest is still handling the vsock transport
/// reset) until `timeout`; `alive` says whether the VM still runs.
pub fn refresh_restored(
    uds: &Path,
    hostname: Option<&str>,
    shares: &[u8],
    timeout: Duration,
    alive: impl Fn() -> bool,
) -> Result<(), AgentError> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = refresh_now(hostname, shares)?;
        match refresh(uds, &r) {
            Ok(()) => return Ok(()),
            // The agent answered, and not with success: no retry.
            Err(e @ AgentError::Protocol(_)) => return Err(e),
            Err(e) => {
                if Instant::now() >= deadline || !alive() {
                    tracing::debug!("refresh of the restored guest: {e}");
                    return Err(AgentError::NotReady(timeout));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Asks the guest to power off cleanly (the agent's Shutdown frame).
pub fn request_shutdown(uds: &Path) -> Result<(), AgentError> {
    let mut s = connect(uds, AGENT_PORT)?;
    Frame::Shutdown.write_to(&mut s)?;
    Ok(())
}

/// Reads one `\n`-terminated line (without it) of at most `max` bytes.
pub fn read_line(r: &mut impl BufRead, max: usize) -> io::Result<String> {
    let mut line = Vec::new();
    r.take(max as u64 + 1).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "line too long or stream ended",
        ));
    }
    line.pop();
    Ok(String::from_utf8_lossy(&line).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("locald-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A fake VM side: accepts on `uds`, checks the CONNECT line, answers,
    /// then plays the agent with `agent`.
    fn fake_vm(
        uds: &Path,
        reply: &'static str,
        agent: impl FnOnce(UnixStream) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(uds).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            assert_eq!(
                read_line(&mut r, 64).unwrap(),
                format!("CONNECT {AGENT_PORT}")
            );
            let mut w = s.try_clone().unwrap();
            w.write_all(reply.as_bytes()).unwrap();
            agent(s);
        })
    }

    #[test]
    fn exec_relays_streams_and_exit() {
        let d = tmp("exec");
        let uds = d.join("v.sock");
        let t = fake_vm(&uds, "OK 1073741824\n", |s| {
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let Some(Frame::Exec(req)) = Frame::read_from(&mut r).unwrap() else {
                panic!("want exec")
            };
            assert_eq!(req.argv, [b"cat".to_vec()]);
            Frame::Started(7).write_to(&mut w).unwrap();
            // Echo stdin to stdout until EOF, then binary stderr and exit 42.
            loop {
                match Frame::read_from(&mut r).unwrap() {
                    Some(Frame::Stdin(d)) if d.is_empty() => break,
                    Some(Frame::Stdin(d)) => Frame::Stdout(d).write_to(&mut w).unwrap(),
                    f => panic!("unexpected {f:?}"),
                }
            }
            Frame::Stderr(vec![0, 255]).write_to(&mut w).unwrap();
            Frame::Exit(ExitKind::Code(42)).write_to(&mut w).unwrap();
        });
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let input: Box<dyn Read + Send> = Box::new(io::Cursor::new(b"in\x00put".to_vec()));
        let res = exec(
            &uds,
            ExecRequest {
                argv: vec![b"cat".to_vec()],
                ..Default::default()
            },
            ExecIo {
                stdin: Some(input),
                stdout: &mut out,
                stderr: &mut err,
            },
            |_| {},
        )
        .unwrap();
        t.join().unwrap();
        assert_eq!(res, ExecOutcome::Ended(ExitKind::Code(42)));
        assert_eq!(res.shell_code(), 42);
        assert_eq!(out, b"in\x00put");
        assert_eq!(err, [0, 255]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refused_and_broken_agents_are_errors() {
        let d = tmp("refused");
        let uds = d.join("v.sock");
        let t = fake_vm(&uds, "", |_| {});
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let io = ExecIo {
            stdin: None,
            stdout: &mut out,
            stderr: &mut err,
        };
        let e = exec(&uds, ExecRequest::default(), io, |_| {}).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, AgentError::Refused { .. }), "{e}");

        let uds2 = d.join("v2.sock");
        let t = fake_vm(&uds2, "OK 5\n", |mut s| {
            let _ = Frame::read_from(&mut s);
            s.write_all(&[9, 0, 0, 0, 99, 1, 2, 3, 4, 5, 6, 7, 8])
                .unwrap();
        });
        let io = ExecIo {
            stdin: None,
            stdout: &mut out,
            stderr: &mut err,
        };
        let e = exec(&uds2, ExecRequest::default(), io, |_| {}).unwrap_err();
        t.join().unwrap();
        assert!(matches!(e, AgentError::Protocol(_)), "{e}");

        let e = connect(&d.join("missing.sock"), 5).unwrap_err();
        assert!(e.to_string().contains("missing.sock"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn readiness_waits_for_the_ready_line() {
        let d = tmp("ready");
        let uds = d.join("v.sock");
        let l = ReadyListener::bind(&uds).unwrap();
        let e = l.wait(Duration::from_millis(50), || true).unwrap_err();
        assert!(matches!(e, AgentError::NotReady(_)));
        let e = l.wait(Duration::from_secs(10), || false).unwrap_err();
        assert!(matches!(e, AgentError::NotReady(_)));
        let p = host_port_path(&uds, READY_PORT);
        let t = std::thread::spawn(move || {
            UnixStream::connect(p)
                .unwrap()
                .write_all(READY_LINE)
                .unwrap();
        });
        l.wait(Duration::from_secs(10), || true).unwrap();
        t.join().unwrap();
        drop(l);
        assert!(!host_port_path(&uds, READY_PORT).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
