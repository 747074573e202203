//! The vsock muxer: the host side of the device, Firecracker's hybrid
//! protocol over Unix sockets. It owns the listening socket at `uds_path`,
//! host clients still writing their `CONNECT <port>\n` line, and every
//! [`Connection`]; routes guest packets to connections (creating them on
//! REQUEST, answering RST to anything unroutable); and queues what the
//! guest must receive. Runs on the device's worker thread.
//!
//! All its host descriptors (listener, clients, connection sockets, one
//! timerfd) live in a private epoll set whose descriptor
//! ([`AsRawFd::as_raw_fd`]) the worker watches; [`Muxer::process_events`]
//! handles whatever is ready. Without a worker (tests, fuzzing) the same
//! calls drive it directly.
//!
//! Every queue is bounded: connections plus pending clients by
//! `max_connections`, of which the guest may open at most
//! `max_guest_connections` (the rest stays for host-initiated ones: the
//! agent's control path, `exec` and `stop`), standalone RSTs by [`MAX_PENDING_RST`], per-connection
//! state by flags (a connection sits in the RX queue at most once), guest
//! data per connection by `buf_alloc`.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connect::{ConnectLine, LineState};
use super::connection::Connection;
use super::packet::{op, validate, Header, Verdict, HOST_CID, TYPE_STREAM};
use super::{sys, VsockError};
use crate::devices::virtio::Warned;

const DEV: &str = "virtio-vsock";

/// Standalone RSTs (answers to unroutable packets) waiting for RX buffers;
/// beyond this they are dropped.
pub const MAX_PENDING_RST: usize = 1024;
/// First port of the range host-initiated connections get on the host side.
pub const LOCAL_PORT_FIRST: u32 = 1 << 30;
/// Accepts per listener wake-up, so a connect storm cannot starve the rest.
const ACCEPT_BATCH: usize = 32;
/// Epoll events handled per [`Muxer::process_events`] call.
const EVENT_BATCH: usize = 64;

/// Tunables, with the defaults the device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxerConfig {
    /// Receive buffer advertised per connection, and the most guest data
    /// buffered for a host socket that is not writable.
    pub buf_alloc: u32,
    /// How long a host client may take to send its CONNECT line, and the
    /// guest to answer the resulting REQUEST.
    pub connect_timeout: Duration,
    /// How long a closing connection may wait for the guest's RST or for
    /// buffered data to drain before it is reset.
    pub shutdown_timeout: Duration,
    /// Most connections plus pending host clients.
    pub max_connections: usize,
    /// Most guest-initiated connections: a guest cannot take the slots the
    /// host's control path (`exec`, `stop`) needs.
    pub max_guest_connections: usize,
}

impl Default for MuxerConfig {
    fn default() -> Self {
        MuxerConfig {
            buf_alloc: 256 * 1024,
            connect_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(3),
            max_connections: 1024,
            max_guest_connections: 512,
        }
    }
}

/// A connection's identity: host-side port, guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

impl ConnKey {
    fn of_guest_pkt(hdr: &Header) -> Self {
        ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Owner {
    Client,
    Conn(ConnKey),
}

#[derive(Debug)]
struct PendingClient {
    stream: UnixStream,
    line: ConnectLine,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy)]
enum RxItem {
    Rst(ConnKey),
    Conn(ConnKey),
}

/// Removes the listening socket's file when the muxer goes.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The host side of a vsock device.
#[derive(Debug)]
pub struct Muxer {
    cid: u64,
    cfg: MuxerConfig,
    listener: UnixListener,
    socket_file: SocketFile,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    clients: HashMap<RawFd, PendingClient>,
    fd_owner: HashMap<RawFd, Owner>,
    rxq: VecDeque<RxItem>,
    rst_queued: usize,
    /// Host ports handed to host-initiated connections → their guest port.
    local_ports: HashMap<u32, u32>,
    next_local_port: u32,
    /// Connections the guest opened (bounded by `max_guest_connections`).
    guest_init: std::collections::HashSet<ConnKey>,
    /// Host clients wait in the listen backlog until then (a restored
    /// guest has not yet dropped its stale connections).
    held_until: Option<Instant>,
    warned: Warned,
}

/// Binds the listening socket at `path`: a stale socket file (nobody
/// listening) is replaced, a live one or any other file is an error.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    let bind_err = |source| VsockError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
            UnixListener::bind(path).map_err(bind_err)?
        }
        Err(e) => return Err(bind_err(e)),
    };
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

impl Muxer {
    /// Binds `uds_path` and starts with no connections.
    pub fn new(guest_cid: u64, uds_path: PathBuf, cfg: MuxerConfig) -> Result<Self, VsockError> {
        let listener = bind_listener(&uds_path)?;
        let socket_file = SocketFile(uds_path);
        let epoll = Epoll::new().map_err(VsockError::Setup)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Setup(e.into()))?;
        for fd in [listener.as_raw_fd(), timer.as_raw_fd()] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(VsockError::Setup)?;
        }
        Ok(Muxer {
            cid: guest_cid,
            cfg,
            listener,
            socket_file,
            epoll,
            timer,
            timer_armed: None,
            conns: HashMap::new(),
            clients: HashMap::new(),
            fd_owner: HashMap::new(),
            rxq: VecDeque::new(),
            rst_queued: 0,
            local_ports: HashMap::new(),
            next_local_port: LOCAL_PORT_FIRST,
            guest_init: Default::default(),
            held_until: None,
            warned: Warned::default(),
        })
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.socket_file.0
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// Live connections (including ones waiting to send their RST).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host clients that have not finished their CONNECT line.
    pub fn pending_client_count(&self) -> usize {
        self.clients.len()
    }

    /// Guest bytes buffered for host sockets, over all connections.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|c| c.buffered()).sum()
    }

    /// Causes of guest misbehaviour logged so far.
    pub fn warned(&self) -> &Warned {
        &self.warned
    }

    /// Forgets every connection and pending client (device reset); the
    /// listener stays.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove_conn(k);
        }
        let fds: Vec<RawFd> = self.clients.keys().copied().collect();
        for fd in fds {
            self.drop_client(fd);
        }
        self.rxq.clear();
        self.rst_queued = 0;
        self.local_ports.clear();
        self.guest_init.clear();
        self.release_host_clients();
        self.timer_armed = None;
        let _ = self.timer.clear();
    }

    /// Leaves new host clients in the listen backlog (the listener is not
    /// watched) until [`Muxer::release_host_clients`], or `limit` at most.
    /// A restored device holds them until the guest has handled its
    /// transport reset, so the reset cannot drop a fresh connection.
    pub fn hold_host_clients(&mut self, limit: Duration) {
        if self.held_until.is_some() {
            return;
        }
        let fd = self.listener.as_raw_fd();
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let d = Instant::now() + limit;
        self.held_until = Some(d);
        self.note_deadline(d);
    }

    /// Whether host clients are held back.
    pub fn holds_host_clients(&self) -> bool {
        self.held_until.is_some()
    }

    /// Takes host clients again (and those waiting in the backlog now).
    pub fn release_host_clients(&mut self) {
        if self.held_until.take().is_none() {
            return;
        }
        let fd = self.listener.as_raw_fd();
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, fd as u64),
        ) {
            tracing::warn!("{DEV}: cannot watch the listener again: {e}");
        }
        self.accept_clients(Instant::now());
    }

    /// Whether the guest has packets waiting (an RX buffer would be used).
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    // ----- Guest → host -------------------------------------------------

    /// A packet the guest transmitted (header parsed, payload read).
    pub fn send_pkt(&mut self, hdr: &Header, payload: &[u8]) {
        let now = Instant::now();
        let key = ConnKey::of_guest_pkt(hdr);
        match validate(hdr, self.cid) {
            Verdict::Accept => {}
            Verdict::Drop(cause) => {
                self.warned.warn(DEV, cause, format_args!("{hdr:?}"));
                return;
            }
            Verdict::Rst(cause) => {
                self.warned.warn(DEV, cause, format_args!("{hdr:?}"));
                self.reset_key(key);
                return;
            }
        }
        if hdr.op == op::RST {
            // The guest closed it; nothing to answer.
            self.remove_conn(key);
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            if hdr.op == op::REQUEST {
                self.warned.warn(
                    DEV,
                    "REQUEST for an existing connection",
                    format_args!("{key:?}"),
                );
                conn.kill();
            } else {
                conn.send_pkt(hdr, payload, now, &mut self.warned);
            }
            self.sync(key);
            return;
        }
        if hdr.op == op::REQUEST {
            self.guest_connect(hdr);
        } else if matches!(
            hdr.op,
            op::SHUTDOWN | op::CREDIT_UPDATE | op::CREDIT_REQUEST
        ) {
            // Normal after we reset a connection whose host side closed:
            // the guest's last control packets cross our RST.
            tracing::debug!("{DEV}: op {} for a closed connection {key:?}", hdr.op);
            self.enqueue_rst(key);
        } else {
            self.warned.warn(
                DEV,
                "packet for an unknown connection",
                format_args!("op {} {key:?}", hdr.op),
            );
            self.enqueue_rst(key);
        }
    }

    /// A guest packet whose header was read but whose payload was bad
    /// (too long, truncated): reset its connection, if it names one of ours.
    pub fn reject_pkt(&mut self, hdr: &Header) {
        if hdr.src_cid != self.cid || hdr.dst_cid != HOST_CID {
            return;
        }
        let key = ConnKey::of_guest_pkt(hdr);
        if hdr.op == op::RST {
            self.remove_conn(key);
        } else {
            self.reset_key(key);
        }
    }

    /// Resets `key`: kills the connection if we have it, else queues a bare RST.
    fn reset_key(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.kill();
            self.sync(key);
        } else {
            self.enqueue_rst(key);
        }
    }

    fn enqueue_rst(&mut self, key: ConnKey) {
        if self.rst_queued >= MAX_PENDING_RST {
            self.warned.warn(
                DEV,
                "RST backlog full",
                "the guest is not taking RX buffers",
            );
            return;
        }
        self.rst_queued += 1;
        self.rxq.push_back(RxItem::Rst(key));
    }

    fn at_capacity(&self) -> bool {
        self.conns.len() + self.clients.len() >= self.cfg.max_connections
    }

    /// The guest asks to connect to host port `hdr.dst_port`: connect to
    /// `<uds_path>_<port>`, or answer RST.
    fn guest_connect(&mut self, hdr: &Header) {
        let key = ConnKey::of_guest_pkt(hdr);
        if self.at_capacity() {
            self.warned
                .warn(DEV, "connection limit reached", self.cfg.max_connections);
            self.enqueue_rst(key);
            return;
        }
        if self.guest_init.len() >= self.cfg.max_guest_connections {
            self.warned.warn(
                DEV,
                "guest connection limit reached",
                self.cfg.max_guest_connections,
            );
            self.enqueue_rst(key);
            return;
        }
        let mut path: OsString = self.socket_file.0.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        match sys::connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let conn = Connection::new_peer_init(
                    stream,
                    hdr,
                    self.cfg.buf_alloc,
                    self.cfg.shutdown_timeout,
                );
                self.guest_init.insert(key);
                self.insert_conn(key, conn);
            }
            Err(e) => {
                tracing::debug!(
                    "{DEV}: guest port {} -> {}: {e}; answering RST",
                    hdr.src_port,
                    Path::new(&path).display()
                );
                self.enqueue_rst(key);
            }
        }
    }

    fn insert_conn(&mut self, key: ConnKey, conn: Connection) {
        self.fd_owner.insert(conn.fd(), Owner::Conn(key));
        self.conns.insert(key, conn);
        self.sync(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.guest_init.remove(&key);
        if conn.registered.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
        }
        self.fd_owner.remove(&conn.fd());
        if conn.queued {
            // A later connection with the same key must not inherit (and
            // duplicate) this one's place in the RX queue.
            self.rxq
                .retain(|i| !matches!(i, RxItem::Conn(k) if *k == key));
        }
        if self.local_ports.get(&key.local_port) == Some(&key.peer_port) {
            self.local_ports.remove(&key.local_port);
        }
    }

    /// After any change to a connection: watch its socket for what it now
    /// needs, queue it for RX if it has something for the guest, and keep
    /// the timer armed for its deadline.
    fn sync(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.interest();
        let fd = conn.fd();
        let res = match (conn.registered, want.is_empty()) {
            (None, true) => Ok(()),
            (None, false) => {
                self.epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(want, fd as u64))
            }
            (Some(_), true) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default()),
            (Some(cur), false) if cur != want => self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(want, fd as u64),
            ),
            (Some(_), false) => Ok(()),
        };
        match res {
            Ok(()) => conn.registered = (!want.is_empty()).then_some(want),
            Err(e) => {
                tracing::warn!("{DEV}: cannot watch host socket of {key:?}: {e}");
                conn.kill();
                if conn.registered.take().is_some() {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
            }
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
        if let Some(d) = conn.deadline() {
            self.note_deadline(d);
        }
    }

    // ----- Host → guest -------------------------------------------------

    /// The next packet for the guest, with up to `buf.len()` payload bytes
    /// in `buf`. Each queued item is looked at most once per call.
    pub fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        let mut visits = self.rxq.len();
        while visits > 0 {
            visits -= 1;
            let item = self.rxq.pop_front()?;
            match item {
                RxItem::Rst(key) => {
                    self.rst_queued -= 1;
                    return Some((self.rst_header(key), 0));
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.queued = false;
                    let r = conn.recv_pkt(buf, Instant::now());
                    if let Some((h, _)) = &r {
                        if h.op == op::RST {
                            self.remove_conn(key);
                            return r;
                        }
                    }
                    self.sync(key);
                    if r.is_some() {
                        return r;
                    }
                }
            }
        }
        None
    }

    fn rst_header(&self, key: ConnKey) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    // ----- Host events --------------------------------------------------

    /// Handles ready host descriptors (listener, clients, connection
    /// sockets, the timer) without blocking.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!("{DEV}: epoll_wait: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            let set = ev.event_set();
            let now = Instant::now();
            if fd == self.listener.as_raw_fd() {
                self.accept_clients(now);
            } else if fd == self.timer.as_raw_fd() {
                self.on_timer(now);
            } else {
                match self.fd_owner.get(&fd).copied() {
                    Some(Owner::Client) => self.read_client(fd, now),
                    Some(Owner::Conn(key)) => {
                        if let Some(conn) = self.conns.get_mut(&key) {
                            conn.notify(set, now);
                            self.sync(key);
                        }
                    }
                    // A descriptor removed earlier in this batch.
                    None => {}
                }
            }
        }
    }

    fn accept_clients(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("{DEV}: accept on {}: {e}", self.uds_path().display());
                    return;
                }
            };
            if self.at_capacity() {
                tracing::warn!(
                    "{DEV}: connection limit ({}) reached; closing a host client",
                    self.cfg.max_connections
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            ) {
                tracing::warn!("{DEV}: cannot watch a host client: {e}");
                continue;
            }
            let deadline = now + self.cfg.connect_timeout;
            self.clients.insert(
                fd,
                PendingClient {
                    stream,
                    line: ConnectLine::new(),
                    deadline,
                },
            );
            self.fd_owner.insert(fd, Owner::Client);
            self.note_deadline(deadline);
        }
    }

    fn drop_client(&mut self, fd: RawFd) -> Option<UnixStream> {
        let c = self.clients.remove(&fd)?;
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.fd_owner.remove(&fd);
        Some(c.stream)
    }

    /// Reads a host client's CONNECT line, one byte at a time so nothing
    /// after the newline is consumed.
    fn read_client(&mut self, fd: RawFd, now: Instant) {
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let state = loop {
            let mut b = [0u8; 1];
            match client.stream.read(&mut b) {
                Ok(0) => break LineState::Invalid,
                Ok(_) => match client.line.push(b[0]) {
                    LineState::NeedMore => continue,
                    s => break s,
                },
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break LineState::NeedMore,
                Err(_) => break LineState::Invalid,
            }
        };
        match state {
            LineState::NeedMore => {}
            LineState::Invalid => {
                tracing::debug!("{DEV}: host client sent a bad CONNECT line; closing it");
                self.drop_client(fd);
            }
            LineState::Port(port) => {
                if let Some(stream) = self.drop_client(fd) {
                    self.host_connect(stream, port, now);
                }
            }
        }
    }

    /// A host client asked for guest port `peer_port`: pick a host port,
    /// send the guest a REQUEST, wait for its answer.
    fn host_connect(&mut self, stream: UnixStream, peer_port: u32, now: Instant) {
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            tracing::warn!("{DEV}: no free host port; closing a host client");
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port,
        };
        self.local_ports.insert(local_port, peer_port);
        let conn = Connection::new_local_init(
            stream,
            self.cid,
            local_port,
            peer_port,
            self.cfg.buf_alloc,
            self.cfg.shutdown_timeout,
            now + self.cfg.connect_timeout,
        );
        self.insert_conn(key, conn);
    }

    /// A host port in `[1 << 30, 1 << 31)` not used by any connection,
    /// handed out round-robin.
    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.cfg.max_connections * 2 + 1 {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX >> 1 {
                LOCAL_PORT_FIRST
            } else {
                p + 1
            };
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.local_ports.contains_key(&p) && !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    // ----- Timers -------------------------------------------------------

    fn note_deadline(&mut self, d: Instant) {
        if self.timer_armed.is_some_and(|a| a <= d) {
            return;
        }
        self.arm(d);
    }

    fn arm(&mut self, d: Instant) {
        let after = d
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(after, None) {
            Ok(()) => self.timer_armed = Some(d),
            Err(e) => tracing::warn!("{DEV}: cannot arm the timer: {e}"),
        }
    }

    /// Expires overdue clients and connections, then re-arms (or disarms)
    /// the timer, which also clears its readiness.
    fn on_timer(&mut self, now: Instant) {
        self.timer_armed = None;
        if self.held_until.is_some_and(|d| d <= now) {
            tracing::warn!("{DEV}: the guest did not acknowledge the transport reset; taking host connections anyway");
            self.release_host_clients();
        }
        let late: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in late {
            tracing::debug!("{DEV}: host client sent no CONNECT line in time; closing it");
            self.drop_client(fd);
        }
        let keys: Vec<ConnKey> = self
            .conns
            .iter_mut()
            .filter_map(|(k, c)| c.expire(now).then_some(*k))
            .collect();
        for k in keys {
            tracing::debug!("{DEV}: {k:?} timed out; resetting it");
            self.sync(k);
        }
        let next = self
            .clients
            .values()
            .map(|c| c.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline()))
            .chain(self.held_until)
            .min();
        match next {
            Some(d) => self.arm(d),
            None => {
                let _ = self.timer.clear();
            }
        }
    }
}

impl AsRawFd for Muxer {
    /// The epoll set holding all the muxer's host descriptors: readable
    /// when [`Muxer::process_events`] has work.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::{SHUTDOWN_BOTH, SHUTDOWN_SEND};
    use super::super::tests::TempDir;
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    const GUEST: u64 = 3;

    fn cfg() -> MuxerConfig {
        MuxerConfig {
            buf_alloc: 64 * 1024,
            connect_timeout: Duration::from_millis(200),
            shutdown_timeout: Duration::from_millis(200),
            max_connections: 16,
            max_guest_connections: 16,
        }
    }

    fn muxer(dir: &TempDir) -> Muxer {
        Muxer::new(GUEST, dir.path().join("v.sock"), cfg()).unwrap()
    }

    fn pkt(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    fn rw(src_port: u32, dst_port: u32, data: &[u8]) -> Header {
        let mut h = pkt(op::RW, src_port, dst_port);
        h.len = data.len() as u32;
        h
    }

    /// Drains every packet the muxer has for the guest.
    fn drain(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some((h, n)) = m.recv_pkt(&mut buf) {
            out.push((h, buf[..n].to_vec()));
        }
        out
    }

    /// Runs the event loop until `f` is true (or fails after 5 s).
    fn pump_until(m: &mut Muxer, mut f: impl FnMut(&mut Muxer) -> bool) {
        let t0 = Instant::now();
        while !f(m) {
            assert!(t0.elapsed() < Duration::from_secs(5), "timed out");
            let mut p = libc::pollfd {
                fd: m.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, 20) };
            m.process_events();
        }
    }

    fn ops(pkts: &[(Header, Vec<u8>)]) -> Vec<u16> {
        pkts.iter().map(|(h, _)| h.op).collect()
    }

    #[test]
    fn binding_handles_stale_live_and_foreign_files() {
        let dir = TempDir::new("bind");
        let path = dir.path().join("v.sock");
        // A stale socket file is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let m = Muxer::new(GUEST, path.clone(), cfg()).unwrap();
        // A live listener is not.
        assert!(matches!(
            Muxer::new(GUEST, path.clone(), cfg()),
            Err(VsockError::InUse(_))
        ));
        drop(m);
        assert!(!path.exists(), "socket file removed on drop");
        // A regular file is never deleted.
        std::fs::write(&path, b"data").unwrap();
        assert!(matches!(
            Muxer::new(GUEST, path.clone(), cfg()),
            Err(VsockError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        assert!(matches!(
            Muxer::new(GUEST, dir.path().join("no/such/dir"), cfg()),
            Err(VsockError::Bind { .. })
        ));
    }

    #[test]
    fn guest_connect_to_a_listening_port_gets_response() {
        let dir = TempDir::new("gconn");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RESPONSE]);
        let h = out[0].0;
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (2, 3, 52, 1000)
        );
        let (mut s, _) = host.accept().unwrap();
        m.send_pkt(&rw(1000, 52, b"ping"), b"ping");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        s.write_all(b"pong").unwrap();
        pump_until(&mut m, |m| m.has_pending_rx());
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RW]);
        assert_eq!(out[0].1, b"pong");
    }

    #[test]
    fn guest_connect_to_nothing_gets_rst() {
        let dir = TempDir::new("gnone");
        let mut m = muxer(&dir);
        m.send_pkt(&pkt(op::REQUEST, 1000, 99), &[]);
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RST]);
        assert_eq!((out[0].0.src_port, out[0].0.dst_port), (99, 1000));
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn unroutable_and_hostile_packets() {
        let dir = TempDir::new("hostile");
        let mut m = muxer(&dir);
        // RW for an unknown connection: RST.
        m.send_pkt(&rw(1, 2, b"x"), b"x");
        assert_eq!(ops(&drain(&mut m)), [op::RST]);
        assert!(m.warned().seen("packet for an unknown connection"));
        // RST for an unknown connection: nothing (never RST an RST).
        m.send_pkt(&pkt(op::RST, 1, 2), &[]);
        assert!(drain(&mut m).is_empty());
        // Spoofed source CID, or not for the host: dropped.
        let mut h = pkt(op::REQUEST, 1, 2);
        h.src_cid = 7;
        m.send_pkt(&h, &[]);
        let mut h = pkt(op::REQUEST, 1, 2);
        h.dst_cid = 5;
        m.send_pkt(&h, &[]);
        assert!(drain(&mut m).is_empty());
        assert!(m.warned().seen("packet with a wrong source CID"));
        assert!(m.warned().seen("packet not addressed to the host"));
        // Unknown type and op: RST.
        let mut h = pkt(op::REQUEST, 1, 2);
        h.type_ = 2;
        m.send_pkt(&h, &[]);
        m.send_pkt(&pkt(42, 1, 2), &[]);
        assert_eq!(ops(&drain(&mut m)), [op::RST, op::RST]);
        // Responses and credit packets for nothing: RST.
        for o in [
            op::RESPONSE,
            op::SHUTDOWN,
            op::CREDIT_UPDATE,
            op::CREDIT_REQUEST,
        ] {
            m.send_pkt(&pkt(o, 1, 2), &[]);
        }
        assert_eq!(ops(&drain(&mut m)), [op::RST; 4]);
        // A malformed packet with a readable header resets its connection.
        m.reject_pkt(&rw(1, 2, &[0; 10]));
        assert_eq!(ops(&drain(&mut m)), [op::RST]);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn hostile_packets_on_a_live_connection_reset_it() {
        let dir = TempDir::new("hostile2");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        for bad in [
            {
                let mut h = pkt(op::RW, 1000, 52);
                h.type_ = 9;
                h
            },
            pkt(99, 1000, 52),
            pkt(op::REQUEST, 1000, 52),
        ] {
            m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
            assert_eq!(ops(&drain(&mut m)), [op::RESPONSE]);
            let (mut s, _) = host.accept().unwrap();
            m.send_pkt(&bad, &[]);
            assert_eq!(ops(&drain(&mut m)), [op::RST]);
            assert_eq!(m.connection_count(), 0);
            let mut v = Vec::new();
            s.read_to_end(&mut v).unwrap();
        }
    }

    #[test]
    fn connect_reset_churn_without_rx_buffers_stays_bounded() {
        let dir = TempDir::new("churn");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        host.set_nonblocking(true).unwrap();
        // The guest opens and resets the same connection over and over,
        // never taking RX buffers: the RX queue must not grow.
        for _ in 0..500 {
            m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
            m.send_pkt(&pkt(op::RST, 1000, 52), &[]);
            while host.accept().is_ok() {}
        }
        assert!(m.rxq.len() <= 1, "rxq grew to {}", m.rxq.len());
        assert_eq!(m.connection_count(), 0);
    }

    /// A guest that honours credit streams 2 MiB to a host that reads
    /// slowly: flow control must neither deadlock nor overrun.
    #[test]
    fn credit_honouring_guest_streams_to_a_slow_host() {
        const TOTAL: usize = 2 << 20;
        let dir = TempDir::new("g2hstream");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = host.accept().unwrap();
            let mut got = Vec::with_capacity(TOTAL);
            let mut b = [0u8; 8192];
            loop {
                match s.read(&mut b).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&b[..n]),
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
        let resp = drain(&mut m).remove(0).0;
        let (mut peer_buf_alloc, mut peer_fwd_cnt) = (resp.buf_alloc, resp.fwd_cnt);
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 253) as u8).collect();
        let mut sent = 0usize;
        let t0 = Instant::now();
        while sent < TOTAL {
            assert!(t0.elapsed() < Duration::from_secs(20), "stalled at {sent}");
            let in_flight = (sent as u32).wrapping_sub(peer_fwd_cnt);
            let credit = peer_buf_alloc.saturating_sub(in_flight) as usize;
            if credit > 0 {
                let n = credit.min(4096).min(TOTAL - sent);
                let chunk = &data[sent..sent + n];
                m.send_pkt(&rw(1000, 52, chunk), chunk);
                sent += n;
                assert!(m.buffered_bytes() <= cfg().buf_alloc as usize);
            } else {
                pump_until(&mut m, |m| m.has_pending_rx());
            }
            for (h, _) in drain(&mut m) {
                assert_eq!(h.op, op::CREDIT_UPDATE);
                peer_buf_alloc = h.buf_alloc;
                peer_fwd_cnt = h.fwd_cnt;
            }
        }
        let mut sd = pkt(op::SHUTDOWN, 1000, 52);
        sd.flags = SHUTDOWN_SEND;
        m.send_pkt(&sd, &[]);
        pump_until(&mut m, |m| m.buffered_bytes() == 0);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), TOTAL);
        assert!(got == data);
    }

    /// The host writes 2 MiB at once to a guest that grants 64 KiB of
    /// credit and reopens it as it consumes: we never send past its credit.
    #[test]
    fn host_streams_to_a_credit_limited_guest() {
        const TOTAL: usize = 2 << 20;
        const GUEST_BUF: u32 = 64 * 1024;
        let dir = TempDir::new("h2gstream");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        let mut req = pkt(op::REQUEST, 1000, 52);
        req.buf_alloc = GUEST_BUF;
        m.send_pkt(&req, &[]);
        drain(&mut m);
        let (s, _) = host.accept().unwrap();
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 249) as u8).collect();
        let src = data.clone();
        let writer = std::thread::spawn(move || {
            let mut s = s;
            s.write_all(&src).unwrap();
        });
        let mut got = Vec::with_capacity(TOTAL);
        let mut consumed_reported = 0u32;
        let t0 = Instant::now();
        while got.len() < TOTAL {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "stalled at {}",
                got.len()
            );
            pump_until(&mut m, |m| m.has_pending_rx());
            for (h, d) in drain(&mut m) {
                match h.op {
                    op::RW => {
                        got.extend_from_slice(&d);
                        let in_flight = got.len() as u32 - consumed_reported;
                        assert!(in_flight <= GUEST_BUF, "overran credit: {in_flight}");
                    }
                    op::CREDIT_REQUEST => {}
                    // The writer closed its socket: only after all its data.
                    op::SHUTDOWN => assert_eq!(got.len(), TOTAL),
                    o => panic!("unexpected op {o}"),
                }
            }
            // The guest application consumes everything it got and tells
            // the device once half its buffer is free again.
            let consumed = got.len() as u32;
            if consumed - consumed_reported >= GUEST_BUF / 2 || got.len() == TOTAL {
                let mut cu = pkt(op::CREDIT_UPDATE, 1000, 52);
                cu.buf_alloc = GUEST_BUF;
                cu.fwd_cnt = consumed;
                m.send_pkt(&cu, &[]);
                consumed_reported = consumed;
            }
        }
        writer.join().unwrap();
        assert!(got == data);
    }

    #[test]
    fn rst_backlog_is_bounded() {
        let dir = TempDir::new("rstq");
        let mut m = muxer(&dir);
        for i in 0..(MAX_PENDING_RST as u32 + 100) {
            m.send_pkt(&rw(i, 7, b""), &[]);
        }
        assert!(m.warned().seen("RST backlog full"));
        assert_eq!(drain(&mut m).len(), MAX_PENDING_RST);
        // Room again once drained.
        m.send_pkt(&rw(1, 7, b""), &[]);
        assert_eq!(drain(&mut m).len(), 1);
    }

    fn client(m: &Muxer) -> UnixStream {
        UnixStream::connect(m.uds_path()).unwrap()
    }

    fn read_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap() == 1 {
            line.push(b[0]);
            if b[0] == b'\n' {
                break;
            }
        }
        String::from_utf8(line).unwrap()
    }

    /// Runs the host-initiated handshake for guest port `port`; returns the
    /// client, the REQUEST header.
    fn host_request(m: &mut Muxer, port: u32) -> (UnixStream, Header) {
        let mut c = client(m);
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        pump_until(m, |m| m.has_pending_rx());
        let out = drain(m);
        assert_eq!(ops(&out), [op::REQUEST]);
        (c, out[0].0)
    }

    /// A restored device holds host clients in the backlog until the
    /// guest acknowledged its transport reset, or the limit passed.
    #[test]
    fn held_host_clients_wait_for_release_or_the_limit() {
        let dir = TempDir::new("hold");
        let mut m = muxer(&dir);
        m.hold_host_clients(Duration::from_secs(30));
        assert!(m.holds_host_clients());
        let mut c = client(&m);
        c.write_all(b"CONNECT 52\n").unwrap();
        let until = std::time::Instant::now() + Duration::from_millis(200);
        while std::time::Instant::now() < until {
            m.process_events();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!m.has_pending_rx(), "a held client reached the guest");
        m.release_host_clients();
        pump_until(&mut m, |m| m.has_pending_rx());
        assert_eq!(ops(&drain(&mut m)), [op::REQUEST]);
        // The limit releases them too.
        m.hold_host_clients(Duration::from_millis(50));
        let mut c2 = client(&m);
        c2.write_all(b"CONNECT 53\n").unwrap();
        pump_until(&mut m, |m| m.has_pending_rx());
        assert!(!m.holds_host_clients());
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::REQUEST]);
        assert_eq!(out[0].0.dst_port, 53);
        drop(c);
    }

    #[test]
    fn host_initiated_connection_round_trip() {
        let dir = TempDir::new("hconn");
        let mut m = muxer(&dir);
        let (mut c, req) = host_request(&mut m, 52);
        assert_eq!((req.src_cid, req.dst_cid, req.dst_port), (2, 3, 52));
        assert!(req.src_port >= LOCAL_PORT_FIRST);
        assert_eq!(req.buf_alloc, cfg().buf_alloc);
        m.send_pkt(&pkt(op::RESPONSE, 52, req.src_port), &[]);
        assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
        // Client data after OK reaches the guest.
        c.write_all(b"hello guest").unwrap();
        pump_until(&mut m, |m| m.has_pending_rx());
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RW]);
        assert_eq!(out[0].1, b"hello guest");
        // Guest data reaches the client.
        m.send_pkt(&rw(52, req.src_port, b"hi host"), b"hi host");
        let mut b = [0u8; 7];
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi host");
        // The client hangs up: full SHUTDOWN to the guest, whose RST ends it.
        drop(c);
        pump_until(&mut m, |m| m.has_pending_rx());
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::SHUTDOWN]);
        assert_eq!(out[0].0.flags, SHUTDOWN_BOTH);
        m.send_pkt(&pkt(op::RST, 52, req.src_port), &[]);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn data_sent_right_after_the_connect_line_is_kept() {
        let dir = TempDir::new("pipelined");
        let mut m = muxer(&dir);
        let mut c = client(&m);
        c.write_all(b"CONNECT 52\nearly").unwrap();
        pump_until(&mut m, |m| m.has_pending_rx());
        let req = drain(&mut m)[0].0;
        m.send_pkt(&pkt(op::RESPONSE, 52, req.src_port), &[]);
        assert!(read_line(&mut c).starts_with("OK "));
        pump_until(&mut m, |m| m.has_pending_rx());
        assert_eq!(drain(&mut m)[0].1, b"early");
    }

    #[test]
    fn host_initiated_refused_by_guest_closes_client() {
        let dir = TempDir::new("hrst");
        let mut m = muxer(&dir);
        let (mut c, req) = host_request(&mut m, 52);
        m.send_pkt(&pkt(op::RST, 52, req.src_port), &[]);
        assert_eq!(m.connection_count(), 0);
        let mut v = Vec::new();
        c.read_to_end(&mut v).unwrap();
        assert!(v.is_empty());
    }

    #[test]
    fn host_initiated_without_guest_answer_times_out() {
        let dir = TempDir::new("htimeout");
        let mut m = muxer(&dir);
        let (mut c, req) = host_request(&mut m, 52);
        let t0 = Instant::now();
        pump_until(&mut m, |m| m.has_pending_rx());
        assert!(t0.elapsed() >= Duration::from_millis(150));
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::RST]);
        assert_eq!(out[0].0.src_port, req.src_port);
        assert_eq!(m.connection_count(), 0);
        let mut v = Vec::new();
        c.read_to_end(&mut v).unwrap();
        assert!(v.is_empty());
    }

    #[test]
    fn bad_connect_lines_close_the_client() {
        let dir = TempDir::new("badline");
        let mut m = muxer(&dir);
        for bad in [&b"HELLO 52\n"[..], &[b'x'; 40], b"CONNECT 99999999999\n"] {
            let mut c = client(&m);
            c.write_all(bad).unwrap();
            pump_until(&mut m, |m| m.pending_client_count() == 1);
            pump_until(&mut m, |m| m.pending_client_count() == 0);
            assert_eq!(m.connection_count(), 0);
            let mut v = Vec::new();
            // The client sees EOF (or a reset if unread bytes were left).
            let _ = c.read_to_end(&mut v);
            assert!(v.is_empty());
        }
        // A client that says nothing is closed after the timeout.
        let mut c = client(&m);
        pump_until(&mut m, |m| m.pending_client_count() == 1);
        pump_until(&mut m, |m| m.pending_client_count() == 0);
        let mut v = Vec::new();
        c.read_to_end(&mut v).unwrap();
        assert!(!m.has_pending_rx());
    }

    #[test]
    fn connect_line_split_over_writes() {
        let dir = TempDir::new("split");
        let mut m = muxer(&dir);
        let mut c = client(&m);
        c.write_all(b"CONN").unwrap();
        pump_until(&mut m, |m| m.pending_client_count() == 1);
        m.process_events();
        assert!(!m.has_pending_rx());
        c.write_all(b"ECT 5\n").unwrap();
        pump_until(&mut m, |m| m.has_pending_rx());
        assert_eq!(drain(&mut m)[0].0.dst_port, 5);
    }

    #[test]
    fn local_ports_are_unique_and_in_range() {
        let dir = TempDir::new("ports");
        let mut m = muxer(&dir);
        let mut seen = std::collections::HashSet::new();
        let mut clients = Vec::new();
        for _ in 0..8 {
            let (c, req) = host_request(&mut m, 52);
            assert!((LOCAL_PORT_FIRST..1 << 31).contains(&req.src_port));
            assert!(seen.insert(req.src_port));
            clients.push(c);
        }
        // Wrap-around skips ports still in use.
        m.next_local_port = u32::MAX >> 1;
        let p1 = m.allocate_local_port(52).unwrap();
        assert_eq!(p1, u32::MAX >> 1);
        let p2 = m.allocate_local_port(52).unwrap();
        assert!(!seen.contains(&p2) && p2 >= LOCAL_PORT_FIRST);
    }

    #[test]
    fn connection_limit_applies_to_guest_and_host() {
        let dir = TempDir::new("limit");
        let mut m = muxer(&dir);
        let _host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        for i in 0..cfg().max_connections as u32 {
            m.send_pkt(&pkt(op::REQUEST, 2000 + i, 52), &[]);
        }
        assert_eq!(m.connection_count(), cfg().max_connections);
        m.send_pkt(&pkt(op::REQUEST, 5000, 52), &[]);
        assert!(m.warned().seen("connection limit reached"));
        let out = drain(&mut m);
        assert_eq!(out.last().unwrap().0.op, op::RST);
        // A host client is closed at once.
        let mut c = client(&m);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(100) {
            m.process_events();
        }
        let mut v = Vec::new();
        c.read_to_end(&mut v).unwrap();
        assert_eq!(m.pending_client_count(), 0);
    }

    /// Issue 14 item 11: a guest that opens connections until it is
    /// refused leaves the host's control path its slots.
    #[test]
    fn guest_connections_leave_room_for_the_host() {
        let dir = TempDir::new("guestcap");
        let c = MuxerConfig {
            max_guest_connections: 10,
            ..cfg()
        };
        let mut m = Muxer::new(GUEST, dir.path().join("v.sock"), c).unwrap();
        let _host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        for i in 0..c.max_connections as u32 {
            m.send_pkt(&pkt(op::REQUEST, 2000 + i, 52), &[]);
        }
        assert_eq!(m.connection_count(), 10, "guest capped below the total");
        assert!(m.warned().seen("guest connection limit reached"));
        // A closed guest connection frees its slot for the guest again.
        m.send_pkt(&pkt(op::RST, 2000, 52), &[]);
        assert_eq!(m.connection_count(), 9);
        m.send_pkt(&pkt(op::REQUEST, 4000, 52), &[]);
        assert_eq!(m.connection_count(), 10);
        drain(&mut m);
        // The host still connects to the guest, up to the total.
        let mut hosts = Vec::new();
        for _ in 0..c.max_connections - 10 {
            let (s, h) = host_request(&mut m, 1024);
            hosts.push((s, h));
        }
        assert_eq!(m.connection_count(), c.max_connections);
        m.reset();
        assert_eq!(m.connection_count(), 0);
        m.send_pkt(&pkt(op::REQUEST, 5000, 52), &[]);
        assert_eq!(m.connection_count(), 1, "reset forgets the guest's count");
    }

    #[test]
    fn many_concurrent_connections_keep_their_data_apart() {
        let dir = TempDir::new("many");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_80")).unwrap();
        let mut socks = Vec::new();
        for i in 0..12u32 {
            m.send_pkt(&pkt(op::REQUEST, 3000 + i, 80), &[]);
            socks.push(host.accept().unwrap().0);
        }
        assert_eq!(ops(&drain(&mut m)), [op::RESPONSE; 12]);
        for (i, s) in socks.iter_mut().enumerate() {
            let msg = format!("to-{i}");
            m.send_pkt(&rw(3000 + i as u32, 80, msg.as_bytes()), msg.as_bytes());
            let mut b = vec![0u8; msg.len()];
            s.read_exact(&mut b).unwrap();
            assert_eq!(b, msg.as_bytes());
            s.write_all(format!("from-{i}").as_bytes()).unwrap();
        }
        let mut got = HashMap::new();
        pump_until(&mut m, |m| {
            for (h, d) in drain(m) {
                assert_eq!(h.op, op::RW);
                got.entry(h.dst_port).or_insert_with(Vec::new).extend(d);
            }
            got.len() == 12 && got.values().all(|v| v.len() >= 6)
        });
        for i in 0..12u32 {
            assert_eq!(got[&(3000 + i)], format!("from-{i}").as_bytes());
        }
    }

    #[test]
    fn host_that_stops_reading_cannot_grow_memory() {
        let dir = TempDir::new("noread");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
        drain(&mut m);
        let (_s, _) = host.accept().unwrap();
        // A guest that ignores credit and keeps sending 4 KiB packets.
        let chunk = [0u8; 4096];
        let mut sent = 0usize;
        while m.connection_count() == 1 {
            m.send_pkt(&rw(1000, 52, &chunk), &chunk);
            sent += chunk.len();
            assert!(m.buffered_bytes() <= cfg().buf_alloc as usize);
            assert!(sent < 64 << 20, "never reset");
            if m.has_pending_rx() {
                // Credit updates may be queued; the RST ends the connection.
                let out = drain(&mut m);
                if out.iter().any(|(h, _)| h.op == op::RST) {
                    break;
                }
            }
        }
        assert!(m.warned().seen("guest sent past its credit"));
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.buffered_bytes(), 0);
    }

    #[test]
    fn stuck_shutdown_is_reset_after_timeout() {
        let dir = TempDir::new("stuck");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
        drain(&mut m);
        let (s, _) = host.accept().unwrap();
        drop(s);
        pump_until(&mut m, |m| m.has_pending_rx());
        let out = drain(&mut m);
        assert_eq!(ops(&out), [op::SHUTDOWN]);
        // The guest never answers with RST: the muxer resets it.
        pump_until(&mut m, |m| m.has_pending_rx());
        assert_eq!(ops(&drain(&mut m)), [op::RST]);
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn guest_half_close_then_host_eof_resets() {
        let dir = TempDir::new("halfclose");
        let mut m = muxer(&dir);
        let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
        drain(&mut m);
        let (mut s, _) = host.accept().unwrap();
        m.send_pkt(&rw(1000, 52, b"q"), b"q");
        let mut sd = pkt(op::SHUTDOWN, 1000, 52);
        sd.flags = SHUTDOWN_SEND;
        m.send_pkt(&sd, &[]);
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        assert_eq!(v, b"q");
        s.write_all(b"a").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut seen = Vec::new();
        pump_until(&mut m, |m| {
            seen.extend(drain(m));
            seen.iter().any(|(h, _)| h.op == op::RST)
        });
        assert_eq!(ops(&seen), [op::RW, op::RST]);
        assert_eq!(seen[0].1, b"a");
        assert_eq!(m.connection_count(), 0);
    }

    #[test]
    fn reset_forgets_connections_but_keeps_listening() {
        let dir = TempDir::new("reset");
        let mut m = muxer(&dir);
        let _host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        m.send_pkt(&pkt(op::REQUEST, 1000, 52), &[]);
        let _c = client(&m);
        pump_until(&mut m, |m| m.pending_client_count() == 1);
        m.reset();
        assert_eq!((m.connection_count(), m.pending_client_count()), (0, 0));
        assert!(!m.has_pending_rx());
        let (_c, _) = host_request(&mut m, 7);
    }
}
