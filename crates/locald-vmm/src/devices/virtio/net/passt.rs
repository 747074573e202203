//! passt backend: unprivileged user-mode networking. We spawn `passt`
//! (Debian package `passt`) in the foreground, hand it one end of a Unix
//! stream socketpair (`--fd`), and speak its QEMU-compatible stream
//! protocol on the other: every Ethernet frame is preceded by its length
//! as a 4-byte big-endian integer. passt answers DHCP/ARP itself, maps
//! guest TCP/UDP/ICMP flows to host sockets, and forwards the host
//! loopback ports we `publish` (its `-t` option) to the guest.
//!
//! passt carries no offload metadata. Guest → host, with
//! [`PasstOptions::offload`] (opt-in) the device offers checksum and TSO
//! offloads and [`super::segment`] completes them here, so the guest sends
//! 64 KiB TCP packets and the VMM cuts them into checksummed MSS-sized
//! frames (under an emulated guest kernel that work is far cheaper here).
//! Off by default: with Debian 12's passt a guest connection that
//! half-closes first then never receives the host's FIN (seen with
//! offloads on, never without; docs/virtio-net.md). Host → guest, no
//! offloads: the headers we hand the guest are zero.
//!
//! Spawned on the caller's thread; used on the device's worker thread.
//! Supervision: when passt exits, its socket reads EOF, the device takes
//! the link down (its exit status is logged at teardown: the worker
//! thread may not call `wait4` under seccomp); the VM keeps running.
//! Dropping the backend stops passt (SIGTERM, then wait).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::backend::{NetBackend, Offloads};
use super::header::{HDR_LEN, MAX_GSO_FRAME, MTU};
use super::segment;

/// Largest frame passt may send us (its own limit is 65520).
const MAX_STREAM_FRAME: usize = MAX_GSO_FRAME;
/// Receive staging buffer.
const INBUF: usize = 256 * 1024;

/// Why passt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error(
        "user-mode networking needs passt, which is not installed: \
         install the Debian package `passt` (apt install passt)"
    )]
    Missing,
    #[error("cannot start passt ({0}): {1}")]
    Spawn(String, io::Error),
    #[error("cannot create the passt socket pair: {0}")]
    Socket(io::Error),
}

/// How to start passt.
#[derive(Clone, Debug, Default)]
pub struct PasstOptions {
    /// The passt binary; default `$LOCALD_VMM_PASST` or `passt` on PATH.
    pub binary: Option<PathBuf>,
    /// Host loopback TCP port → guest port.
    pub publish: Vec<(u16, u16)>,
    /// More passt arguments (tests, debugging).
    pub extra_args: Vec<String>,
    /// Offer the guest checksum/TSO offloads, completed in software.
    pub offload: bool,
    /// Let the guest reach host loopback at the gateway address (passt's
    /// `--map-gw`, its default). Off: `--no-map-gw`, so the gateway is
    /// only a gateway and nothing bound to the host's 127.0.0.1 (other
    /// VMs' published ports, databases, …) is reachable from the guest.
    pub host_loopback: bool,
}

/// passt's arguments for `opts`, socket descriptor `fd` (without the binary).
pub fn passt_args(opts: &PasstOptions, fd: RawFd) -> Vec<String> {
    let mut a: Vec<String> = ["--foreground", "--quiet", "--one-off", "--ipv4-only"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend([
        "--mtu".into(),
        MTU.to_string(),
        "--fd".into(),
        fd.to_string(),
    ]);
    if !opts.host_loopback {
        a.push("--no-map-gw".into());
    }
    for (h, g) in &opts.publish {
        a.extend(["-t".into(), format!("127.0.0.1/{h}:{g}")]);
    }
    if opts.publish.is_empty() {
        a.extend(["-t", "none", "-u", "none"].map(String::from));
    }
    a.extend(opts.extra_args.iter().cloned());
    a
}

/// A running passt and our end of its socket.
pub struct Passt {
    sock: OwnedFd,
    child: Child,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    out: Vec<u8>,
    out_start: usize,
    /// The socket closed or failed (passt is gone).
    lost: bool,
    /// Guest offloads are offered and completed here.
    offload: bool,
}

impl Passt {
    /// Spawns passt connected to a fresh socketpair.
    pub fn spawn(opts: &PasstOptions) -> Result<Self, PasstError> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(PasstError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: both descriptors are fresh and owned by us alone.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for fd in [&ours, &theirs] {
            let size: libc::c_int = 1 << 20;
            for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
                // SAFETY: setsockopt reads an int from a valid pointer.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        opt,
                        (&size as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
            }
        }
        let binary = opts
            .binary
            .clone()
            .or_else(|| std::env::var_os("LOCALD_VMM_PASST").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("passt"));
        let child_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&binary);
        cmd.args(passt_args(opts, child_fd))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure only calls fcntl(2), async-signal-safe, on a
        // descriptor that exists in the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(child_fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                PasstError::Missing
            } else {
                PasstError::Spawn(binary.display().to_string(), e)
            }
        })?;
        drop(theirs);
        // SAFETY: F_SETFL on our own descriptor.
        unsafe {
            let fl = libc::fcntl(ours.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        tracing::debug!("passt started (pid {})", child.id());
        Ok(Passt {
            sock: ours,
            child,
            inbuf: vec![0; INBUF],
            in_start: 0,
            in_end: 0,
            out: Vec::new(),
            out_start: 0,
            lost: false,
            offload: opts.offload,
        })
    }

    /// passt's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The error to report once passt's socket closed. Runs on the
    /// device's worker thread, whose seccomp filter has no `wait4`: passt
    /// is not reaped here; its exit status is logged when the backend is
    /// dropped (on the VMM thread, at teardown).
    fn gone(&mut self, why: &str) -> io::Error {
        self.lost = true;
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("passt (pid {}) closed its socket: {why}", self.child.id()),
        )
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        match self.child.try_wait() {
            Ok(Some(status)) if self.lost => {
                tracing::info!("passt (pid {}) had exited ({status})", self.child.id());
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                // SAFETY: signalling our own child, which has not been reaped.
                unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
                let _ = self.child.wait();
            }
            Err(_) => {}
        }
    }
}

impl NetBackend for Passt {
    fn describe(&self) -> String {
        format!("passt (pid {})", self.child.id())
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn offloads(&self) -> Offloads {
        Offloads {
            host: self.offload,
            guest: false,
        }
    }

    fn send(&mut self, packet: &[u8]) -> io::Result<()> {
        if self.out_start == self.out.len() {
            self.out.clear();
            self.out_start = 0;
        }
        let out = &mut self.out;
        segment::complete(packet, |frame| {
            out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
            out.extend_from_slice(frame);
        })
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.flush()
    }

    fn tx_blocked(&self) -> bool {
        self.out_start < self.out.len()
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.out_start < self.out.len() {
            let rest = &self.out[self.out_start..];
            // SAFETY: sends from a valid slice; MSG_NOSIGNAL turns a closed
            // peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                self.out_start += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(()),
                _ => {
                    self.out.clear();
                    self.out_start = 0;
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        self.gone(&e.to_string()),
                    ));
                }
            }
        }
        self.out.clear();
        self.out_start = 0;
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let have = self.in_end - self.in_start;
            if have >= 4 {
                let b = &self.inbuf[self.in_start..self.in_start + 4];
                let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                if len > MAX_STREAM_FRAME || len + HDR_LEN > buf.len() {
                    return Err(self.gone(&format!("protocol error: frame length {len}")));
                }
                if have >= 4 + len {
                    let src = self.in_start + 4;
                    buf[..HDR_LEN].fill(0);
                    buf[HDR_LEN..HDR_LEN + len].copy_from_slice(&self.inbuf[src..src + len]);
                    self.in_start += 4 + len;
                    return Ok(Some(HDR_LEN + len));
                }
            }
            if self.in_start > 0 {
                self.inbuf.copy_within(self.in_start..self.in_end, 0);
                self.in_end -= self.in_start;
                self.in_start = 0;
            }
            let room = &mut self.inbuf[self.in_end..];
            // SAFETY: reads at most `room.len()` bytes into a valid slice.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    room.as_mut_ptr().cast(),
                    room.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                self.in_end += n as usize;
                continue;
            }
            if n == 0 {
                return Err(self.gone("end of stream"));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(self.gone(&e.to_string())),
            }
        }
    }
}
