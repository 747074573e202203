//! The host side of vsock under Virtualization.framework: serves
//! Firecracker's hybrid protocol on `uds_path` so that the agent
//! (`agent.rs`), publishing (`publish.rs`) and named VMs talk to a VZ guest
//! exactly as they talk to a KVM one.
//!
//! - Host → guest: a client connects to `uds_path` and writes
//!   `CONNECT <port>\n`; the bridge dials the guest through a
//!   [`GuestDialer`] (on macOS, `VZVirtioSocketDevice connectToPort:`),
//!   answers `OK <local port>\n` and splices the two streams. A port the
//!   guest refuses closes the client without a reply, as the KVM muxer
//!   does when the guest answers RST, so `agent::connect` reports it the
//!   same way. A malformed, oversized or late line closes the client.
//! - Guest → host: the backend hands over each accepted guest connection
//!   ([`BridgeHandle::guest_connected`]); the bridge connects it to
//!   `<uds_path>_<port>` (`agent::host_port_path`) and splices, or closes
//!   it if nothing listens there.
//!
//! Threads: one accept thread; one per client during its handshake; two
//! per open connection (one per direction, 64 KiB buffer each), so a slow
//! reader only ever stalls its own direction. Bounded: at most
//! [`BridgeLimits::max_pending`] clients in the handshake and
//! [`BridgeLimits::max_connections`] connections in all; beyond that, new
//! ones are closed at once. Pure Rust on Unix sockets: tested on Linux.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::agent::host_port_path;
use crate::hybrid::{parse_connect_line, MAX_CONNECT_LINE};

const WHO: &str = "vz vsock bridge";

/// Stack of the bridge's threads: they only copy through a heap buffer.
const THREAD_STACK: usize = 256 * 1024;

/// A connection the dialer opened to a guest port.
#[derive(Debug)]
pub struct DialedConn {
    /// A stream socket whose other end is the guest's connection; owned
    /// by the bridge from now on.
    pub fd: OwnedFd,
    /// The host-side vsock port, for the `OK <port>` reply.
    pub local_port: u32,
}

/// Opens connections to guest vsock ports (host-initiated).
pub trait GuestDialer: Send + Sync {
    /// Connects to guest port `port`; blocks until the guest accepts or
    /// refuses, at most a few seconds.
    fn connect(&self, port: u32) -> io::Result<DialedConn>;
}

/// The bridge's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeLimits {
    /// Most host clients still sending their CONNECT line (or being dialed).
    pub max_pending: usize,
    /// Most open connections, both directions together (pending included).
    pub max_connections: usize,
    /// How long a client may take to send its CONNECT line.
    pub handshake_timeout: Duration,
    /// Copy buffer per direction of a connection.
    pub buf_size: usize,
}

impl Default for BridgeLimits {
    fn default() -> Self {
        BridgeLimits {
            max_pending: 64,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
            buf_size: 64 * 1024,
        }
    }
}

/// Reads a CONNECT line byte by byte (so nothing after it is consumed).
/// `None` on EOF, error, timeout, an oversized line or a bad one.
fn read_connect_line(s: &mut UnixStream) -> Option<u32> {
    let mut line = Vec::with_capacity(MAX_CONNECT_LINE);
    let mut b = [0u8; 1];
    while line.len() < MAX_CONNECT_LINE {
        match s.read(&mut b) {
            Ok(0) => return None,
            Ok(_) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    return parse_connect_line(&line);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    None
}

/// A place under a counter's limit, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Inner {
    uds: PathBuf,
    dialer: Arc<dyn GuestDialer>,
    limits: BridgeLimits,
    pending: Arc<AtomicUsize>,
    live: Arc<AtomicUsize>,
    closing: AtomicBool,
}

/// A running bridge. Dropping it stops accepting and removes the socket
/// file; open connections run on until either end closes.
pub struct VsockBridge {
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

/// A cheap, cloneable handle to hand guest-initiated connections to the
/// bridge (the VZ listener delegate keeps one).
#[derive(Clone)]
pub struct BridgeHandle(Arc<Inner>);

impl VsockBridge {
    /// Binds `uds` (replacing a stale socket file, never another kind of
    /// file) and starts accepting host clients.
    pub fn bind(
        uds: &Path,
        dialer: Arc<dyn GuestDialer>,
        limits: BridgeLimits,
    ) -> io::Result<VsockBridge> {
        if let Ok(m) = std::fs::symlink_metadata(uds) {
            if m.file_type().is_socket() {
                std::fs::remove_file(uds)?;
            }
        }
        let listener = UnixListener::bind(uds)?;
        let inner = Arc::new(Inner {
            uds: uds.to_path_buf(),
            dialer,
            limits,
            pending: Arc::new(AtomicUsize::new(0)),
            live: Arc::new(AtomicUsize::new(0)),
            closing: AtomicBool::new(false),
        });
        let i = inner.clone();
        let accept = std::thread::Builder::new()
            .name("vz-vsock-accept".into())
            .stack_size(THREAD_STACK)
            .spawn(move || accept_loop(&i, listener))?;
        Ok(VsockBridge {
            inner,
            accept: Some(accept),
        })
    }

    /// The hybrid socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.inner.uds
    }

    /// A handle for guest-initiated connections.
    pub fn handle(&self) -> BridgeHandle {
        BridgeHandle(self.inner.clone())
    }

    /// Host clients in their handshake now.
    pub fn pending_clients(&self) -> usize {
        self.inner.pending.load(Ordering::SeqCst)
    }

    /// Connections open now (pending ones included).
    pub fn connections(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }
}

impl Drop for VsockBridge {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::SeqCst);
        // Wake the accept thread; it sees `closing` and ends.
        let _ = UnixStream::connect(&self.inner.uds);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.inner.uds);
    }
}

impl BridgeHandle {
    /// Takes a guest-initiated connection to host port `port` (an fd the
    /// bridge now owns) and connects it to `<uds_path>_<port>`. Returns
    /// at once; the connection is closed if nothing listens there or the
    /// bridge is full.
    pub fn guest_connected(&self, port: u32, guest: OwnedFd) {
        let inner = &self.0;
        let Some(slot) = Slot::take(&inner.live, inner.limits.max_connections) else {
            tracing::warn!(
                "{WHO}: connection limit reached; closing a guest connection to port {port}"
            );
            return;
        };
        let path = host_port_path(&inner.uds, port);
        let buf = inner.limits.buf_size;
        let spawned = std::thread::Builder::new()
            .name("vz-vsock-guest".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let guest = UnixStream::from(guest);
                match UnixStream::connect(&path) {
                    Ok(host) => splice(guest, host, buf, slot),
                    Err(e) => tracing::debug!(
                        "{WHO}: guest connection to host port {port}: {} ({e}); closing it",
                        path.display()
                    ),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("{WHO}: cannot start a thread ({e}); closing a guest connection");
        }
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: UnixListener) {
    use std::os::fd::AsRawFd;
    // Poll with a timeout rather than block in accept(2), so that Drop
    // ends this thread even if the socket file was removed under us.
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::warn!("{WHO}: cannot make the listener non-blocking: {e}");
        return;
    }
    loop {
        if inner.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd for a descriptor we own, and
        // the count passed is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 200) };
        if r <= 0 {
            continue;
        }
        let client = match listener.accept() {
            // macOS hands out accepted sockets with the listener's
            // O_NONBLOCK; the handshake and copies want blocking ones.
            Ok((c, _)) => match c.set_nonblocking(false) {
                Ok(()) => c,
                Err(_) => continue,
            },
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => {
                // Out of descriptors or similar: back off, do not spin.
                tracing::warn!("{WHO}: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if inner.closing.load(Ordering::SeqCst) {
            return;
        }
        let Some(live) = Slot::take(&inner.live, inner.limits.max_connections) else {
            tracing::warn!("{WHO}: connection limit reached; closing a host client");
            continue;
        };
        let Some(pending) = Slot::take(&inner.pending, inner.limits.max_pending) else {
            tracing::warn!("{WHO}: too many clients in their handshake; closing a host client");
            continue;
        };
        let i = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("vz-vsock-client".into())
            .stack_size(THREAD_STACK)
            .spawn(move || host_client(&i, client, pending, live));
        if let Err(e) = spawned {
            tracing::warn!("{WHO}: cannot start a thread ({e}); closing a host client");
        }
    }
}

/// One host client: handshake, dial, reply, splice.
fn host_client(inner: &Inner, mut client: UnixStream, pending: Slot, live: Slot) {
    if client
        .set_read_timeout(Some(inner.limits.handshake_timeout))
        .is_err()
    {
        return;
    }
    let Some(port) = read_connect_line(&mut client) else {
        tracing::debug!("{WHO}: host client sent a bad CONNECT line (or none in time); closing it");
        return;
    };
    let conn = match inner.dialer.connect(port) {
        Ok(c) => c,
        Err(e) => {
            // As the KVM muxer on a guest RST: close, no reply.
            tracing::debug!(
                "{WHO}: guest port {port} refused the connection ({e}); closing the client"
            );
            return;
        }
    };
    drop(pending);
    let ok = format!("OK {}\n", conn.local_port);
    if client.set_read_timeout(None).is_err() || client.write_all(ok.as_bytes()).is_err() {
        return;
    }
    splice(
        client,
        UnixStream::from(conn.fd),
        inner.limits.buf_size,
        live,
    );
}

/// Copies both ways between `a` and `b` until both directions end: EOF on
/// one side shuts down writing on the other (half-close); an error on
/// either shuts both sockets down completely. `slot` is held until then.
fn splice(a: UnixStream, b: UnixStream, buf: usize, slot: Slot) {
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let other = std::thread::Builder::new()
        .name("vz-vsock-copy".into())
        .stack_size(THREAD_STACK)
        .spawn(move || copy_half(a2, b2, buf));
    if other.is_err() {
        tracing::warn!("{WHO}: cannot start a copy thread; closing a connection");
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
        return;
    }
    copy_half(b, a, buf);
    if let Ok(t) = other {
        let _ = t.join();
    }
    drop(slot);
}

/// One direction: `from` → `to`.
fn copy_half(mut from: UnixStream, mut to: UnixStream, buf: usize) {
    let mut data = vec![0u8; buf.max(1)];
    loop {
        let n = match from.read(&mut data) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if to.write_all(&data[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{self, AgentError};
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Instant;

    /// A guest whose listening ports are set by the test; each accepted
    /// connection's guest end is sent to the test.
    struct FakeGuest {
        listening: Vec<u32>,
        conns: Mutex<mpsc::Sender<(u32, UnixStream)>>,
        dials: AtomicUsize,
    }

    impl GuestDialer for FakeGuest {
        fn connect(&self, port: u32) -> io::Result<DialedConn> {
            self.dials.fetch_add(1, Ordering::SeqCst);
            if !self.listening.contains(&port) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "guest refused",
                ));
            }
            let (host, guest) = UnixStream::pair()?;
            self.conns.lock().unwrap().send((port, guest)).unwrap();
            Ok(DialedConn {
                fd: host.into(),
                local_port: 1_073_741_824 + port,
            })
        }
    }

    /// Fields drop in order: the bridge before its directory.
    struct Setup {
        bridge: VsockBridge,
        _dir: TempDir,
        uds: PathBuf,
        guest: Arc<FakeGuest>,
        conns: mpsc::Receiver<(u32, UnixStream)>,
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup(tag: &str, limits: BridgeLimits) -> Setup {
        let dir = std::env::temp_dir().join(format!("locald-vzb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let (tx, rx) = mpsc::channel();
        let guest = Arc::new(FakeGuest {
            listening: vec![52, 1024],
            conns: Mutex::new(tx),
            dials: AtomicUsize::new(0),
        });
        let bridge = VsockBridge::bind(&uds, guest.clone(), limits).unwrap();
        Setup {
            _dir: TempDir(dir),
            uds,
            bridge,
            guest,
            conns: rx,
        }
    }

    fn guest_end(s: &Setup) -> (u32, UnixStream) {
        s.conns.recv_timeout(Duration::from_secs(5)).unwrap()
    }

    fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        s.read_exact(&mut v).unwrap();
        v
    }

    /// Reads until EOF, failing the test after 5 s.
    fn read_eof(s: &mut UnixStream) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        v
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn connect_round_trip_through_agent_connect() {
        let s = setup("rt", BridgeLimits::default());
        // The agent's own client code, unchanged.
        let mut c = agent::connect(&s.uds, 52).unwrap();
        let (port, mut g) = guest_end(&s);
        assert_eq!(port, 52);
        c.write_all(b"ping").unwrap();
        assert_eq!(read_n(&mut g, 4), b"ping");
        g.write_all(b"pong!").unwrap();
        assert_eq!(read_n(&mut c, 5), b"pong!");
        // A large transfer both ways (more than one buffer).
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let b2 = big.clone();
        let mut g2 = g.try_clone().unwrap();
        let w = std::thread::spawn(move || g2.write_all(&b2).unwrap());
        assert_eq!(read_n(&mut c, big.len()), big);
        w.join().unwrap();
        assert_eq!(s.bridge.connections(), 1);
        drop(c);
        assert!(read_eof(&mut g).is_empty());
        drop(g);
        wait_until("the connection to end", || s.bridge.connections() == 0);
    }

    #[test]
    fn ok_reply_names_the_local_port_and_keeps_early_data() {
        let s = setup("ok", BridgeLimits::default());
        let mut c = UnixStream::connect(&s.uds).unwrap();
        // Data right behind the line belongs to the stream.
        c.write_all(b"connect 1024\r\nearly").unwrap();
        let (_, mut g) = guest_end(&s);
        let want = format!("OK {}\n", 1_073_741_824u32 + 1024);
        assert_eq!(read_n(&mut c, want.len()), want.as_bytes());
        assert_eq!(read_n(&mut g, 5), b"early");
    }

    #[test]
    fn refused_port_closes_without_reply() {
        let s = setup("refused", BridgeLimits::default());
        match agent::connect(&s.uds, 99) {
            Err(AgentError::Refused { port: 99, reply }) => {
                assert!(reply.contains("nothing listens"), "{reply}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(s.guest.dials.load(Ordering::SeqCst), 1);
        wait_until("the slot to be released", || s.bridge.connections() == 0);
    }

    #[test]
    fn bad_lines_close_the_client() {
        let limits = BridgeLimits {
            handshake_timeout: Duration::from_millis(200),
            ..BridgeLimits::default()
        };
        let s = setup("bad", limits);
        for bad in [
            &b"HELLO 52\n"[..],
            &[b'x'; 40],
            b"CONNECT 99999999999\n",
            b"CONNECT 52 53\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            let mut c = UnixStream::connect(&s.uds).unwrap();
            let _ = c.write_all(bad);
            assert!(read_eof(&mut c).is_empty(), "{bad:?}");
        }
        // Silent, and half a line then silence: closed after the timeout.
        for partial in [&b""[..], b"CONN"] {
            let mut c = UnixStream::connect(&s.uds).unwrap();
            c.write_all(partial).unwrap();
            let t0 = Instant::now();
            assert!(read_eof(&mut c).is_empty());
            assert!(t0.elapsed() >= Duration::from_millis(150));
        }
        // The client closing before its line ends.
        let mut c = UnixStream::connect(&s.uds).unwrap();
        c.write_all(b"CONNECT 5").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert!(read_eof(&mut c).is_empty());
        assert_eq!(s.guest.dials.load(Ordering::SeqCst), 0);
        wait_until("pending clients to go", || s.bridge.pending_clients() == 0);
    }

    #[test]
    fn eof_propagates_each_way() {
        let s = setup("eof", BridgeLimits::default());
        let mut c = agent::connect(&s.uds, 52).unwrap();
        let (_, mut g) = guest_end(&s);
        c.write_all(b"last words").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        // The guest reads the data, then EOF…
        assert_eq!(read_eof(&mut g), b"last words");
        // …and can still answer on its half.
        g.write_all(b"reply").unwrap();
        g.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_eof(&mut c), b"reply");
        wait_until("the connection to end", || s.bridge.connections() == 0);
    }

    #[test]
    fn guest_initiated_reaches_the_port_socket() {
        let s = setup("g2h", BridgeLimits::default());
        let path = agent::host_port_path(&s.uds, agent::READY_PORT);
        let l = UnixListener::bind(&path).unwrap();
        let (guest, host_side) = UnixStream::pair().unwrap();
        s.bridge
            .handle()
            .guest_connected(agent::READY_PORT, host_side.into());
        let (mut h, _) = l.accept().unwrap();
        let mut guest = guest;
        guest.write_all(b"READY\n").unwrap();
        assert_eq!(read_n(&mut h, 6), b"READY\n");
        h.write_all(b"ack").unwrap();
        drop(h);
        assert_eq!(read_eof(&mut guest), b"ack");
        // The host closed; once the guest closes too, the connection ends.
        drop(guest);
        // Nothing listens on another port: the guest end is closed.
        let (mut guest, host_side) = UnixStream::pair().unwrap();
        s.bridge.handle().guest_connected(4000, host_side.into());
        assert!(read_eof(&mut guest).is_empty());
        wait_until("connections to end", || s.bridge.connections() == 0);
    }

    #[test]
    fn pending_clients_are_bounded() {
        let limits = BridgeLimits {
            max_pending: 2,
            handshake_timeout: Duration::from_secs(30),
            ..BridgeLimits::default()
        };
        let s = setup("pending", limits);
        let quiet: Vec<UnixStream> = (0..2)
            .map(|_| UnixStream::connect(&s.uds).unwrap())
            .collect();
        wait_until("two pending clients", || s.bridge.pending_clients() == 2);
        // The third is closed at once.
        let mut third = UnixStream::connect(&s.uds).unwrap();
        assert!(read_eof(&mut third).is_empty());
        // The first two are still open.
        for mut q in quiet {
            q.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let e = q.read(&mut [0u8; 1]).unwrap_err();
            assert!(matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ));
        }
    }

    #[test]
    fn connections_are_bounded() {
        let limits = BridgeLimits {
            max_connections: 1,
            ..BridgeLimits::default()
        };
        let s = setup("conns", limits);
        let _c = agent::connect(&s.uds, 52).unwrap();
        let _g = guest_end(&s);
        assert!(agent::connect(&s.uds, 52).is_err());
        let (mut guest, host_side) = UnixStream::pair().unwrap();
        s.bridge.handle().guest_connected(1023, host_side.into());
        assert!(read_eof(&mut guest).is_empty());
    }

    #[test]
    fn drop_removes_the_socket_and_replaces_stale_ones() {
        let s = setup("drop", BridgeLimits::default());
        let uds = s.uds.clone();
        let guest = s.guest.clone();
        drop(s.bridge);
        assert!(!uds.exists());
        assert!(UnixStream::connect(&uds).is_err());
        // A stale socket file is replaced; a regular file is not touched.
        let _stale = UnixListener::bind(&uds).unwrap();
        let b = VsockBridge::bind(&uds, guest.clone(), BridgeLimits::default()).unwrap();
        drop(b);
        std::fs::write(&uds, b"not a socket").unwrap();
        assert!(VsockBridge::bind(&uds, guest, BridgeLimits::default()).is_err());
        assert_eq!(std::fs::read(&uds).unwrap(), b"not a socket");
    }
}
