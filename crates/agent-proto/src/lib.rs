//! The wire protocol between the host (locald-vmm) and the guest agent in
//! the guest init, spoken over one vsock stream per command. Pure encoding
//! and decoding, no I/O policy; used by the guest agent (one process per
//! connection) and by the host client (the caller's thread).
//!
//! A stream carries frames: `u32` little-endian length of what follows,
//! then a `u8` frame type, then the payload. Frames are at most
//! [`MAX_FRAME`] bytes; anything larger, shorter than its type byte, or of
//! an unknown type is a protocol error and the peer closes the stream.
//!
//! Conversation: the host sends [`Frame::Exec`]; the agent answers
//! [`Frame::Started`] (or [`Frame::Error`] and closes); then both sides
//! stream: host → guest [`Frame::Stdin`] (empty = EOF), [`Frame::Resize`],
//! [`Frame::Signal`]; guest → host [`Frame::Stdout`], [`Frame::Stderr`],
//! and finally [`Frame::Exit`] once the process ended and its output was
//! sent. [`Frame::Shutdown`] on any agent stream asks the guest to power
//! off cleanly. Versions: [`VERSION`] is carried in `Exec`.
//!
//! Clone refresh: after a VM is restored from a snapshot, the host opens a
//! stream with [`Frame::Refresh`] before any command runs; the agent mixes
//! the host's entropy into the guest's pool, sets the wall clock and the
//! hostname, and answers `Exit(Code(0))` (or `Error` and closes).
//!
//! Port forwarding: instead of `Exec`, the host may open with
//! [`Frame::Forward`]; the agent connects to that TCP port on the guest's
//! loopback and answers `Started(0)` (or `Error` and closes); from then on
//! the stream carries raw bytes both ways, with half-closes passed on.

use std::io::{self, Read, Write};

/// Protocol version carried in every `Exec`.
pub const VERSION: u8 = 1;
/// Guest vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Host vsock port the agent connects to once it listens (readiness).
pub const READY_PORT: u32 = 1023;
/// Line the agent sends on the readiness connection.
pub const READY_LINE: &[u8] = b"READY 1\n";
/// Largest frame (type byte + payload) either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest chunk of stdin/stdout/stderr data in one frame.
pub const MAX_DATA: usize = 64 * 1024;

/// What to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<Vec<u8>>,
    /// `KEY=VALUE` entries added to (or replacing) the agent's defaults.
    pub env: Vec<Vec<u8>>,
    /// Working directory.
    pub workdir: Option<Vec<u8>>,
    /// User id to run as.
    pub uid: Option<u32>,
    /// Group id to run as.
    pub gid: Option<u32>,
    /// Run on a pseudo-terminal of this size (rows, cols); stderr is then
    /// merged into stdout, as on any terminal.
    pub tty: Option<(u16, u16)>,
}

/// What a restored guest gets from the host before any command runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refresh {
    /// Host wall-clock time, nanoseconds since the Unix epoch.
    pub time_ns: u64,
    /// Random bytes for the guest's entropy pool (at most
    /// [`MAX_ENTROPY`]).
    pub entropy: Vec<u8>,
    /// A new hostname, if the guest gets one.
    pub hostname: Option<Vec<u8>>,
    /// virtio-fs shares to mount now, in the `/.locald/shares` format
    /// (`locald_guest_spec::shares`): a warm guest's shares are bound
    /// after its restore.
    pub shares: Vec<u8>,
}

/// Most entropy bytes one `Refresh` carries.
pub const MAX_ENTROPY: usize = 512;

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitKind {
    /// The shell convention: the code, or 128 + signal.
    pub fn shell_code(self) -> u8 {
        match self {
            ExitKind::Code(c) => c as u8,
            ExitKind::Signal(s) => 128u8.wrapping_add(s as u8),
        }
    }
}

/// One protocol frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// host → guest: run a command.
    Exec(ExecRequest),
    /// host → guest: bytes for the command's stdin; empty means EOF.
    Stdin(Vec<u8>),
    /// host → guest: new terminal size (rows, cols).
    Resize(u16, u16),
    /// host → guest: send a signal to the command.
    Signal(i32),
    /// host → guest: power the guest off cleanly.
    Shutdown,
    /// host → guest: connect this stream to guest TCP port 127.0.0.1:N.
    Forward(u16),
    /// host → guest: a restored guest's fresh entropy, clock and hostname.
    Refresh(Refresh),
    /// guest → host: the command runs with this pid.
    Started(u32),
    /// guest → host: output on stdout (or the terminal).
    Stdout(Vec<u8>),
    /// guest → host: output on stderr.
    Stderr(Vec<u8>),
    /// guest → host: the command ended (all output was sent before).
    Exit(ExitKind),
    /// guest → host: the command could not run; `code` is what a shell
    /// would report (126 cannot execute, 127 not found, 125 other).
    Error { code: u8, message: String },
}

mod ty {
    pub const EXEC: u8 = 1;
    pub const STDIN: u8 = 2;
    pub const RESIZE: u8 = 3;
    pub const SIGNAL: u8 = 4;
    pub const SHUTDOWN: u8 = 5;
    pub const FORWARD: u8 = 6;
    pub const REFRESH: u8 = 7;
    pub const STARTED: u8 = 16;
    pub const STDOUT: u8 = 17;
    pub const STDERR: u8 = 18;
    pub const EXIT: u8 = 19;
    pub const ERROR: u8 = 20;
}

/// A malformed frame.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtoError(pub String);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "agent protocol error: {}", self.0)
    }
}

impl std::error::Error for ProtoError {}

impl From<ProtoError> for io::Error {
    fn from(e: ProtoError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_opt_u32(out: &mut Vec<u8>, v: Option<u32>) {
    match v {
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        None => out.push(0),
    }
}

/// Reads fields off a payload, failing (never panicking) on short input.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError(format!(
                "payload ends early: {n} bytes wanted, {} left",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn i32(&mut self) -> Result<i32, ProtoError> {
        Ok(self.u32()? as i32)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, ProtoError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn list(&mut self) -> Result<Vec<Vec<u8>>, ProtoError> {
        let n = self.u32()? as usize;
        // Each entry needs at least its 4-byte length: bound the count by
        // what is left so a lying count cannot make us allocate.
        if n > self.0.len() / 4 {
            return Err(ProtoError(format!(
                "list of {n} entries in {} bytes",
                self.0.len()
            )));
        }
        (0..n).map(|_| self.bytes()).collect()
    }
    fn opt_u32(&mut self) -> Result<Option<u32>, ProtoError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u32()?)),
            t => Err(ProtoError(format!("bad option tag {t}"))),
        }
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtoError(format!("{} trailing bytes", self.0.len())))
        }
    }
}

impl Frame {
    /// The frame's bytes on the wire, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        let t = match self {
            Frame::Exec(r) => {
                p.push(VERSION);
                p.extend_from_slice(&(r.argv.len() as u32).to_le_bytes());
                for a in &r.argv {
                    put_bytes(&mut p, a);
                }
                p.extend_from_slice(&(r.env.len() as u32).to_le_bytes());
                for e in &r.env {
                    put_bytes(&mut p, e);
                }
                match &r.workdir {
                    Some(w) => {
                        p.push(1);
                        put_bytes(&mut p, w);
                    }
                    None => p.push(0),
                }
                put_opt_u32(&mut p, r.uid);
                put_opt_u32(&mut p, r.gid);
                match r.tty {
                    Some((rows, cols)) => {
                        p.push(1);
                        p.extend_from_slice(&rows.to_le_bytes());
                        p.extend_from_slice(&cols.to_le_bytes());
                    }
                    None => p.push(0),
                }
                ty::EXEC
            }
            Frame::Stdin(d) => {
                p.extend_from_slice(d);
                ty::STDIN
            }
            Frame::Resize(r, c) => {
                p.extend_from_slice(&r.to_le_bytes());
                p.extend_from_slice(&c.to_le_bytes());
                ty::RESIZE
            }
            Frame::Signal(s) => {
                p.extend_from_slice(&s.to_le_bytes());
                ty::SIGNAL
            }
            Frame::Shutdown => ty::SHUTDOWN,
            Frame::Forward(port) => {
                p.extend_from_slice(&port.to_le_bytes());
                ty::FORWARD
            }
            Frame::Refresh(r) => {
                p.extend_from_slice(&r.time_ns.to_le_bytes());
                put_bytes(&mut p, &r.entropy);
                match &r.hostname {
                    Some(h) => {
                        p.push(1);
                        put_bytes(&mut p, h);
                    }
                    None => p.push(0),
                }
                put_bytes(&mut p, &r.shares);
                ty::REFRESH
            }
            Frame::Started(pid) => {
                p.extend_from_slice(&pid.to_le_bytes());
                ty::STARTED
            }
            Frame::Stdout(d) => {
                p.extend_from_slice(d);
                ty::STDOUT
            }
            Frame::Stderr(d) => {
                p.extend_from_slice(d);
                ty::STDERR
            }
            Frame::Exit(k) => {
                let (kind, v) = match k {
                    ExitKind::Code(c) => (0u8, *c),
                    ExitKind::Signal(s) => (1u8, *s),
                };
                p.push(kind);
                p.extend_from_slice(&v.to_le_bytes());
                ty::EXIT
            }
            Frame::Error { code, message } => {
                p.push(*code);
                p.extend_from_slice(message.as_bytes());
                ty::ERROR
            }
        };
        let mut out = Vec::with_capacity(5 + p.len());
        out.extend_from_slice(&((p.len() + 1) as u32).to_le_bytes());
        out.push(t);
        out.extend_from_slice(&p);
        out
    }

    /// Decodes one frame body (type byte + payload, without the length).
    pub fn decode(body: &[u8]) -> Result<Frame, ProtoError> {
        let Some((&t, payload)) = body.split_first() else {
            return Err(ProtoError("empty frame".into()));
        };
        let mut c = Cursor(payload);
        let f = match t {
            ty::EXEC => {
                let v = c.u8()?;
                if v != VERSION {
                    return Err(ProtoError(format!(
                        "protocol version {v} (this side speaks {VERSION})"
                    )));
                }
                let argv = c.list()?;
                let env = c.list()?;
                let workdir = match c.u8()? {
                    0 => None,
                    1 => Some(c.bytes()?),
                    t => return Err(ProtoError(format!("bad option tag {t}"))),
                };
                let uid = c.opt_u32()?;
                let gid = c.opt_u32()?;
                let tty = match c.u8()? {
                    0 => None,
                    1 => Some((c.u16()?, c.u16()?)),
                    t => return Err(ProtoError(format!("bad option tag {t}"))),
                };
                if argv.is_empty() {
                    return Err(ProtoError("empty argv".into()));
                }
                Frame::Exec(ExecRequest {
                    argv,
                    env,
                    workdir,
                    uid,
                    gid,
                    tty,
                })
            }
            ty::STDIN => return Ok(Frame::Stdin(payload.to_vec())),
            ty::RESIZE => Frame::Resize(c.u16()?, c.u16()?),
            ty::SIGNAL => Frame::Signal(c.i32()?),
            ty::SHUTDOWN => Frame::Shutdown,
            ty::FORWARD => Frame::Forward(c.u16()?),
            ty::REFRESH => {
                let lo = u64::from(c.u32()?);
                let hi = u64::from(c.u32()?);
                let entropy = c.bytes()?;
                if entropy.len() > MAX_ENTROPY {
                    return Err(ProtoError(format!(
                        "{} entropy bytes (at most {MAX_ENTROPY})",
                        entropy.len()
                    )));
                }
                let hostname = match c.u8()? {
                    0 => None,
                    1 => Some(c.bytes()?),
                    t => return Err(ProtoError(format!("bad option tag {t}"))),
                };
                let shares = c.bytes()?;
                Frame::Refresh(Refresh {
                    time_ns: lo | (hi << 32),
                    entropy,
                    hostname,
                    shares,
                })
            }
            ty::STARTED => Frame::Started(c.u32()?),
            ty::STDOUT => return Ok(Frame::Stdout(payload.to_vec())),
            ty::STDERR => return Ok(Frame::Stderr(payload.to_vec())),
            ty::EXIT => {
                let kind = c.u8()?;
                let v = c.i32()?;
                Frame::Exit(match kind {
                    0 => ExitKind::Code(v),
                    1 => ExitKind::Signal(v),
                    k => return Err(ProtoError(format!("bad exit kind {k}"))),
                })
            }
            ty::ERROR => {
                let code = c.u8()?;
                let message = String::from_utf8_lossy(c.take(c.0.len())?).into_owned();
                Frame::Error { code, message }
            }
            t => return Err(ProtoError(format!("unknown frame type {t}"))),
        };
        c.end()?;
        Ok(f)
    }

    /// Writes the frame.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
    pub fn read_from(r: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match r.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(ProtoError(format!("frame length {len} out of range")).into());
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        Ok(Some(Frame::decode(&body)?))
    }
}

/// Incremental decoder for non-blocking streams: feed bytes as they come,
/// take whole frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// Adds received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(ProtoError(format!("frame length {len} out of range")));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let f = Frame::decode(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        f.map(Some)
    }

    /// Bytes buffered but not yet a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Exec(ExecRequest {
                argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo \x00\xff".to_vec()],
                env: vec![b"A=1".to_vec(), b"EMPTY=".to_vec()],
                workdir: Some(b"/srv".to_vec()),
                uid: Some(1000),
                gid: None,
                tty: Some((24, 80)),
            }),
            Frame::Exec(ExecRequest {
                argv: vec![b"true".to_vec()],
                ..Default::default()
            }),
            Frame::Stdin(b"data\x00\xff".to_vec()),
            Frame::Stdin(Vec::new()),
            Frame::Resize(50, 132),
            Frame::Signal(15),
            Frame::Shutdown,
            Frame::Forward(8080),
            Frame::Refresh(Refresh {
                time_ns: 1_780_000_000_123_456_789,
                entropy: (0..64).collect(),
                hostname: Some(b"clone-1".to_vec()),
                shares: b"share0\0/mnt/src\0rw\0".to_vec(),
            }),
            Frame::Refresh(Refresh::default()),
            Frame::Started(42),
            Frame::Stdout(vec![0, 1, 2, 255]),
            Frame::Stderr(b"oops\n".to_vec()),
            Frame::Exit(ExitKind::Code(7)),
            Frame::Exit(ExitKind::Signal(9)),
            Frame::Error {
                code: 127,
                message: "nope: not found".into(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all_frames() {
            let wire = f.encode();
            let mut r = &wire[..];
            assert_eq!(Frame::read_from(&mut r).unwrap(), Some(f.clone()));
            assert!(r.is_empty());
        }
    }

    #[test]
    fn decoder_handles_byte_by_byte_input() {
        let mut wire = Vec::new();
        for f in all_frames() {
            wire.extend(f.encode());
        }
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in wire {
            d.feed(&[b]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, all_frames());
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn hostile_frames_are_errors_not_panics() {
        // Zero and oversized lengths.
        assert!(Frame::read_from(&mut &[0u8, 0, 0, 0][..]).is_err());
        assert!(Frame::read_from(&mut &((MAX_FRAME as u32 + 1).to_le_bytes())[..]).is_err());
        // Unknown type, short payloads, trailing bytes, bad tags, lying counts.
        assert!(Frame::decode(&[99]).is_err());
        assert!(Frame::decode(&[]).is_err());
        assert!(Frame::decode(&[ty::RESIZE, 1]).is_err());
        assert!(Frame::decode(&[ty::SIGNAL, 1, 0, 0, 0, 9]).is_err());
        assert!(Frame::decode(&[ty::EXIT, 7, 0, 0, 0, 0]).is_err());
        assert!(Frame::decode(&[ty::EXEC, 2]).is_err(), "wrong version");
        assert!(
            Frame::decode(&[ty::EXEC, VERSION, 0xff, 0xff, 0xff, 0xff]).is_err(),
            "argc lies"
        );
        let mut empty_argv = vec![ty::EXEC, VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(Frame::decode(&empty_argv).is_err());
        empty_argv[2] = 1; // argc 1 but no entry
        assert!(Frame::decode(&empty_argv).is_err());
        // Truncated streams.
        let wire = Frame::Stdout(b"hello".to_vec()).encode();
        assert!(Frame::read_from(&mut &wire[..6]).is_err());
        assert!(Frame::read_from(&mut &wire[..2]).is_err());
        assert_eq!(Frame::read_from(&mut &[][..]).unwrap(), None);
        // Every prefix of every frame decodes to an error or nothing, never a panic.
        for f in all_frames() {
            let w = f.encode();
            for cut in 0..w.len() {
                let _ = Frame::decode(&w[4.min(cut)..cut]);
            }
        }
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitKind::Code(42).shell_code(), 42);
        assert_eq!(ExitKind::Signal(9).shell_code(), 137);
    }
}
