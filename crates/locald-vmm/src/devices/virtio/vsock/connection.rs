//! One vsock stream connection between a guest port and a host Unix
//! stream: its state machine (host-initiated handshake, established,
//! half-closes, reset), credit-based flow control in both directions, and
//! the bounded buffer of guest data the host socket has not taken yet.
//! Owned by the muxer; runs on the device's worker thread.
//!
//! Flow control (virtio 1.2, 5.10.6.3):
//! - guest → host: we advertise `buf_alloc` and `fwd_cnt` (bytes written to
//!   the host socket). Guest data the socket does not take at once waits in
//!   `tx_buf`, which never holds more than `buf_alloc` bytes: a guest that
//!   sends past its credit is reset. A CREDIT_UPDATE goes out when the
//!   guest's view of our free space falls below half of `buf_alloc`, or
//!   when it asks.
//! - host → guest: we read from the host socket only when the guest has
//!   credit (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`), straight into the
//!   packet being built, so host data is never buffered here.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    op, Header, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::sys;
use crate::devices::virtio::Warned;

const DEV: &str = "virtio-vsock";

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent (or pending), waiting for the guest's
    /// RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
    /// Reset: an RST to the guest is pending; then the muxer forgets it.
    Killed,
}

/// One connection. `local_port` is the host side's port, `peer_port` the
/// guest's.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    buf_alloc: u32,
    shutdown_timeout: Duration,

    // Host → guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    rx_cnt: u32,
    host_readable: bool,
    host_eof: bool,
    credit_requested: bool,

    // Guest → host.
    tx_buf: VecDeque<u8>,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    host_write_shut: bool,

    // Control packets owed to the guest.
    need_rst: bool,
    need_request: bool,
    need_response: bool,
    need_credit_update: bool,
    shutdown_to_send: u32,
    shutdown_sent: u32,
    guest_shut: u32,

    deadline: Option<Instant>,
    /// Set by the muxer while the connection sits in its RX queue.
    pub(crate) queued: bool,
    /// Set by the muxer: what the host socket is registered for, if at all.
    pub(crate) registered: Option<EventSet>,
}

impl Connection {
    /// A connection the guest asked for (its REQUEST `req`), to `stream`.
    /// A RESPONSE is owed.
    pub fn new_peer_init(
        stream: UnixStream,
        req: &Header,
        buf_alloc: u32,
        shutdown_timeout: Duration,
    ) -> Self {
        let mut c = Self::new(
            stream,
            req.src_cid,
            req.dst_port,
            req.src_port,
            buf_alloc,
            shutdown_timeout,
        );
        c.state = ConnState::Established;
        c.need_response = true;
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c
    }

    /// A connection a host client asked for: a REQUEST is owed, and the
    /// guest must answer by `deadline`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_local_init(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        buf_alloc: u32,
        shutdown_timeout: Duration,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            buf_alloc,
            shutdown_timeout,
        );
        c.need_request = true;
        c.deadline = Some(deadline);
        c
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        buf_alloc: u32,
        shutdown_timeout: Duration,
    ) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state: ConnState::LocalInit,
            buf_alloc,
            shutdown_timeout,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            host_readable: false,
            host_eof: false,
            credit_requested: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            host_write_shut: false,
            need_rst: false,
            need_request: false,
            need_response: false,
            need_credit_update: false,
            shutdown_to_send: 0,
            shutdown_sent: 0,
            guest_shut: 0,
            deadline: None,
            queued: false,
            registered: None,
        }
    }

    /// The connection's state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The guest port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// When the connection is killed unless something happens first.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Guest bytes waiting for the host socket.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Bytes written to the host socket (our `fwd_cnt`).
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// Credit the guest gives us: bytes we may still send it.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        // A peer claiming to have consumed more than we sent wraps
        // `in_flight` to a huge value: no credit, which only hurts it.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Resets the connection: the host socket is shut down now, an RST goes
    /// to the guest next, then the muxer forgets the connection.
    pub fn kill(&mut self) {
        if self.state == ConnState::Killed {
            return;
        }
        self.state = ConnState::Killed;
        self.need_rst = true;
        self.tx_buf = VecDeque::new();
        self.deadline = None;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Kills the connection if its deadline has passed; returns whether it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now && self.state != ConnState::Killed => {
                self.kill();
                true
            }
            _ => false,
        }
    }

    /// A guest packet for this connection (already validated and routed;
    /// never an RST or REQUEST, which the muxer handles).
    pub fn send_pkt(&mut self, hdr: &Header, payload: &[u8], now: Instant, warned: &mut Warned) {
        if self.state == ConnState::Killed {
            return;
        }
        if self.peer_buf_alloc != hdr.buf_alloc || self.peer_fwd_cnt != hdr.fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            op::RESPONSE => {
                if self.state != ConnState::LocalInit || self.need_request {
                    warned.warn(DEV, "unexpected RESPONSE", self.local_port);
                    self.kill();
                    return;
                }
                self.state = ConnState::Established;
                self.deadline = None;
                let msg = format!("OK {}\n", self.local_port);
                match sys::send_nosignal(self.stream.as_raw_fd(), msg.as_bytes()) {
                    Ok(n) if n == msg.len() => {}
                    other => {
                        tracing::debug!("{DEV}: cannot acknowledge host connection: {other:?}");
                        self.kill();
                    }
                }
            }
            op::RW => self.guest_data(payload, warned),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                if self.state == ConnState::Established {
                    self.need_credit_update = true;
                }
            }
            op::SHUTDOWN => {
                if self.state != ConnState::Established {
                    warned.warn(DEV, "SHUTDOWN before the connection is up", self.local_port);
                    self.kill();
                    return;
                }
                let flags = hdr.flags & SHUTDOWN_BOTH;
                if flags & SHUTDOWN_RCV != 0 && self.guest_shut & SHUTDOWN_RCV == 0 {
                    // The guest reads no more: host writers see EPIPE.
                    let _ = self.stream.shutdown(Shutdown::Read);
                }
                self.guest_shut |= flags;
            }
            _ => {
                warned.warn(DEV, "unexpected op on a connection", hdr.op);
                self.kill();
                return;
            }
        }
        self.check_shutdown(now);
    }

    fn guest_data(&mut self, payload: &[u8], warned: &mut Warned) {
        if self.state != ConnState::Established || self.guest_shut & SHUTDOWN_SEND != 0 {
            warned.warn(
                DEV,
                "RW on a connection not open for guest data",
                self.local_port,
            );
            self.kill();
            return;
        }
        if self.tx_buf.len() + payload.len() > self.buf_alloc as usize {
            warned.warn(
                DEV,
                "guest sent past its credit",
                format_args!(
                    "port {}: {} bytes buffered, {} more",
                    self.local_port,
                    self.tx_buf.len(),
                    payload.len()
                ),
            );
            self.kill();
            return;
        }
        if self.shutdown_sent & SHUTDOWN_RCV != 0 {
            // We told the guest the host reads no more; data in flight is
            // dropped but counted, so the guest's credit does not stall.
            self.fwd_cnt = self.fwd_cnt.wrapping_add(payload.len() as u32);
            return;
        }
        let mut rest = payload;
        if self.tx_buf.is_empty() {
            match self.write_host(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) => {
                    tracing::debug!("{DEV}: host write failed on port {}: {e}", self.local_port);
                    self.kill();
                    return;
                }
            }
        }
        self.tx_buf.extend(rest);
        self.update_credit_need();
    }

    /// Writes as much of `buf` as the host socket takes now, counting it in
    /// `fwd_cnt`.
    fn write_host(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = write_nonblocking(self.stream.as_raw_fd(), buf)?;
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        Ok(n)
    }

    /// Writes buffered guest data to the host socket.
    fn flush_tx(&mut self) {
        let fd = self.stream.as_raw_fd();
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            let want = a.len();
            match write_nonblocking(fd, a) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                    if n < want {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!("{DEV}: host write failed on port {}: {e}", self.local_port);
                    self.kill();
                    return;
                }
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > 64 * 1024 {
            self.tx_buf = VecDeque::new();
        }
        self.update_credit_need();
    }

    /// Asks for a CREDIT_UPDATE when the guest's view of our free space has
    /// fallen below half of `buf_alloc` and we have freed some since.
    fn update_credit_need(&mut self) {
        if self.state != ConnState::Established || self.fwd_cnt == self.last_fwd_cnt_sent {
            return;
        }
        let received = self.fwd_cnt.wrapping_add(self.tx_buf.len() as u32);
        let guest_view_used = received.wrapping_sub(self.last_fwd_cnt_sent);
        let guest_view_free = self.buf_alloc.saturating_sub(guest_view_used);
        if guest_view_free < self.buf_alloc / 2 {
            self.need_credit_update = true;
        }
    }

    /// Half-close bookkeeping after any change: pass the guest's SHUTDOWN
    /// SEND on once its data is flushed, reset when neither side will send
    /// again, and bound the wait for a flush with the shutdown timeout.
    fn check_shutdown(&mut self, now: Instant) {
        if self.state != ConnState::Established {
            return;
        }
        if self.guest_shut & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty() && !self.host_write_shut {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        let guest_closed = self.guest_shut == SHUTDOWN_BOTH;
        let nobody_sends = self.guest_shut & SHUTDOWN_SEND != 0 && self.host_eof;
        if guest_closed || nobody_sends {
            if self.tx_buf.is_empty() {
                self.kill();
            } else if self.deadline.is_none() {
                self.deadline = Some(now + self.shutdown_timeout);
            }
        }
    }

    fn on_host_eof(&mut self, now: Instant) {
        self.host_eof = true;
        self.host_readable = false;
        if sys::peer_hung_up(self.stream.as_raw_fd()) {
            // The host closed both ways: tell the guest, and reset if it
            // does not answer in time.
            self.shutdown_to_send |= SHUTDOWN_BOTH & !self.shutdown_sent;
            if self.deadline.is_none() {
                self.deadline = Some(now + self.shutdown_timeout);
            }
        } else {
            self.shutdown_to_send |= SHUTDOWN_SEND & !self.shutdown_sent;
        }
        self.check_shutdown(now);
    }

    /// Readiness of the host socket, from the muxer's epoll.
    pub fn notify(&mut self, events: EventSet, now: Instant) {
        if self.state != ConnState::Established {
            return;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.host_readable = true;
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
            && !self.tx_buf.is_empty()
        {
            self.flush_tx();
        }
        self.check_shutdown(now);
    }

    /// What the host socket should be watched for (empty: not at all).
    pub fn interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.state != ConnState::Established {
            return e;
        }
        if self.wants_host_data() && !self.host_readable {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    fn wants_host_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
            && self.shutdown_sent & SHUTDOWN_SEND == 0
    }

    fn data_pending(&self) -> bool {
        self.wants_host_data() && self.host_readable
    }

    /// Whether [`Connection::recv_pkt`] has something for the guest.
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            ConnState::Killed => self.need_rst,
            ConnState::LocalInit => self.need_request,
            ConnState::Established => {
                self.need_response
                    || self.shutdown_to_send != 0
                    || self.need_credit_update
                    || (self.data_pending() && (self.peer_credit() > 0 || !self.credit_requested))
            }
        }
    }

    fn header(&self, op: u16, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Every packet we send carries our credit, so a pending update is
    /// answered by whatever goes out.
    fn sent(&mut self, h: Header) -> Header {
        self.last_fwd_cnt_sent = h.fwd_cnt;
        self.need_credit_update = false;
        h
    }

    /// The next packet for the guest, with up to `buf.len()` bytes of host
    /// data read into `buf`: returns the header and the payload length.
    pub fn recv_pkt(&mut self, buf: &mut [u8], now: Instant) -> Option<(Header, usize)> {
        match self.state {
            ConnState::Killed => {
                if !self.need_rst {
                    return None;
                }
                self.need_rst = false;
                let mut h = self.header(op::RST, 0);
                h.buf_alloc = 0;
                h.fwd_cnt = 0;
                return Some((h, 0));
            }
            ConnState::LocalInit => {
                if !self.need_request {
                    return None;
                }
                self.need_request = false;
                let h = self.header(op::REQUEST, 0);
                return Some((self.sent(h), 0));
            }
            ConnState::Established => {}
        }
        if self.need_response {
            self.need_response = false;
            let h = self.header(op::RESPONSE, 0);
            return Some((self.sent(h), 0));
        }
        if self.data_pending() && self.peer_credit() > 0 && !buf.is_empty() {
            let n = buf.len().min(self.peer_credit() as usize);
            let r = loop {
                match self.stream.read(&mut buf[..n]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            };
            match r {
                Ok(0) => self.on_host_eof(now),
                Ok(n) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    let mut h = self.header(op::RW, 0);
                    h.len = n as u32;
                    return Some((self.sent(h), n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.host_readable = false,
                Err(e) => {
                    tracing::debug!("{DEV}: host read failed on port {}: {e}", self.local_port);
                    self.kill();
                    return self.recv_pkt(buf, now);
                }
            }
            if self.state == ConnState::Killed {
                return self.recv_pkt(buf, now);
            }
        }
        if self.shutdown_to_send != 0 {
            let flags = self.shutdown_to_send;
            self.shutdown_sent |= flags;
            self.shutdown_to_send = 0;
            let h = self.header(op::SHUTDOWN, flags);
            return Some((self.sent(h), 0));
        }
        if self.need_credit_update {
            let h = self.header(op::CREDIT_UPDATE, 0);
            return Some((self.sent(h), 0));
        }
        if self.data_pending() && self.peer_credit() == 0 && !self.credit_requested {
            self.credit_requested = true;
            let h = self.header(op::CREDIT_REQUEST, 0);
            return Some((self.sent(h), 0));
        }
        None
    }

    /// The host socket's descriptor.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

/// Writes as much of `buf` to `fd` as it takes without blocking.
fn write_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match sys::send_nosignal(fd, &buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GUEST: u64 = 3;
    const BUF: u32 = 64 * 1024;
    const T: Duration = Duration::from_secs(3);

    fn guest_hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    /// An established guest-initiated connection and the host end.
    fn established() -> (Connection, UnixStream) {
        established_with_sndbuf(None)
    }

    /// Same, with our socket's send buffer shrunk so the host end fills up
    /// after a few KiB.
    fn established_with_sndbuf(sndbuf: Option<i32>) -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        if let Some(b) = sndbuf {
            set_sndbuf(&ours, b);
        }
        let mut c = Connection::new_peer_init(ours, &guest_hdr(op::REQUEST, 0), BUF, T);
        let (h, n) = c.recv_pkt(&mut [0; 64], Instant::now()).unwrap();
        assert_eq!((h.op, n), (op::RESPONSE, 0));
        assert_eq!((h.src_port, h.dst_port, h.buf_alloc), (52, 1000, BUF));
        assert!(!c.has_pending_rx());
        (c, host)
    }

    fn set_sndbuf(s: &UnixStream, bytes: i32) {
        // SAFETY: setsockopt reads an int from a valid pointer for the call.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn guest_data_reaches_the_host_and_counts_in_fwd_cnt() {
        let (mut c, mut host) = established();
        let mut w = Warned::default();
        c.send_pkt(&guest_hdr(op::RW, 5), b"hello", now(), &mut w);
        let mut b = [0u8; 5];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(c.fwd_cnt(), 5);
        assert_eq!(c.buffered(), 0);
        // Small amounts do not trigger a credit update.
        assert!(!c.has_pending_rx());
    }

    #[test]
    fn credit_update_when_guest_view_gets_low_or_on_request() {
        let (mut c, mut host) = established();
        let mut w = Warned::default();
        let chunk = vec![7u8; (BUF / 2) as usize + 1];
        c.send_pkt(
            &guest_hdr(op::RW, chunk.len() as u32),
            &chunk,
            now(),
            &mut w,
        );
        let mut sink = vec![0u8; chunk.len()];
        host.read_exact(&mut sink).unwrap();
        assert!(c.has_pending_rx());
        let (h, _) = c.recv_pkt(&mut [0; 64], now()).unwrap();
        assert_eq!(h.op, op::CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, chunk.len() as u32);
        assert!(!c.has_pending_rx());
        // CREDIT_REQUEST is always answered.
        c.send_pkt(&guest_hdr(op::CREDIT_REQUEST, 0), &[], now(), &mut w);
        let (h, _) = c.recv_pkt(&mut [0; 64], now()).unwrap();
        assert_eq!((h.op, h.buf_alloc), (op::CREDIT_UPDATE, BUF));
    }

    #[test]
    fn host_that_stops_reading_bounds_our_memory() {
        let (mut c, host) = established_with_sndbuf(Some(4096));
        let mut w = Warned::default();
        // A guest that respects credit: it never has more than BUF bytes
        // outstanding. The host reads nothing.
        let chunk = [1u8; 1024];
        let mut sent = 0u32;
        loop {
            let outstanding = sent - c.fwd_cnt();
            if outstanding + 1024 > BUF {
                break;
            }
            c.send_pkt(&guest_hdr(op::RW, 1024), &chunk, now(), &mut w);
            sent += 1024;
            assert!(c.buffered() <= BUF as usize);
            assert!(sent < 100 * 1024 * 1024, "host socket never filled");
        }
        assert!(c.buffered() > 0);
        assert!(c.interest().contains(EventSet::OUT));
        assert_eq!(c.state(), ConnState::Established);
        // One byte past the credit resets the connection.
        c.send_pkt(&guest_hdr(op::RW, 1024), &chunk, now(), &mut w);
        assert!(w.seen("guest sent past its credit"));
        assert_eq!(c.state(), ConnState::Killed);
        assert_eq!(c.buffered(), 0);
        let (h, _) = c.recv_pkt(&mut [0; 64], now()).unwrap();
        assert_eq!(h.op, op::RST);
        assert!(c.recv_pkt(&mut [0; 64], now()).is_none());
        drop(host);
    }

    #[test]
    fn buffered_data_drains_when_the_host_reads_again() {
        let (mut c, mut host) = established_with_sndbuf(Some(4096));
        let mut w = Warned::default();
        let data: Vec<u8> = (0..BUF).map(|i| i as u8).collect();
        c.send_pkt(&guest_hdr(op::RW, BUF), &data, now(), &mut w);
        assert!(c.buffered() > 0);
        let mut got = Vec::new();
        let mut b = [0u8; 512];
        host.set_nonblocking(true).unwrap();
        while got.len() < data.len() {
            match host.read(&mut b) {
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.notify(EventSet::OUT, now()),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, data);
        assert_eq!(c.buffered(), 0);
        assert_eq!(c.fwd_cnt(), BUF);
        // The guest's view of our space is now wrong by BUF bytes: update.
        let (h, _) = c.recv_pkt(&mut [0; 64], now()).unwrap();
        assert_eq!((h.op, h.fwd_cnt), (op::CREDIT_UPDATE, BUF));
    }

    #[test]
    fn host_data_flows_only_with_guest_credit() {
        let (mut c, mut host) = established();
        let mut w = Warned::default();
        // The guest grants 10 bytes.
        let mut g = guest_hdr(op::CREDIT_UPDATE, 0);
        g.buf_alloc = 10;
        c.send_pkt(&g, &[], now(), &mut w);
        host.write_all(b"0123456789abcdef").unwrap();
        assert!(c.interest().contains(EventSet::IN));
        c.notify(EventSet::IN, now());
        assert!(c.interest().is_empty());
        let mut buf = [0u8; 64];
        let (h, n) = c.recv_pkt(&mut buf, now()).unwrap();
        assert_eq!((h.op, h.len, n), (op::RW, 10, 10));
        assert_eq!(&buf[..10], b"0123456789");
        assert_eq!(c.peer_credit(), 0);
        // Out of credit with data waiting: one CREDIT_REQUEST, then silence.
        let (h, _) = c.recv_pkt(&mut buf, now()).unwrap();
        assert_eq!(h.op, op::CREDIT_REQUEST);
        assert!(!c.has_pending_rx());
        assert!(c.recv_pkt(&mut buf, now()).is_none());
        // The guest consumed 4 bytes: 4 more may go.
        g.fwd_cnt = 4;
        c.send_pkt(&g, &[], now(), &mut w);
        let (h, n) = c.recv_pkt(&mut buf, now()).unwrap();
        assert_eq!((h.op, n), (op::RW, 4));
        assert_eq!(&buf[..4], b"abcd");
    }

    #[test]
    fn lying_credit_never_lets_us_overrun_or_buffer() {
        let (mut c, mut host) = established();
        let mut w = Warned::default();
        // fwd_cnt ahead of what we sent: no credit at all.
        let mut g = guest_hdr(op::CREDIT_UPDATE, 0);
        g.buf_alloc = 100;
        g.fwd_cnt = 50;
        c.send_pkt(&g, &[], now(), &mut w);
        assert_eq!(c.peer_credit(), 0);
        // A huge buf_alloc: reads are still capped by the packet buffer.
        g.buf_alloc = u32::MAX;
        g.fwd_cnt = 0;
        c.send_pkt(&g, &[], now(), &mut w);
        host.write_all(&[9u8; 300]).unwrap();
        c.notify(EventSet::IN, now());
        let mut buf = [0u8; 100];
        let (_, n) = c.recv_pkt(&mut buf, now()).unwrap();
        assert_eq!(n, 100);
    }

    #[test]
    fn guest_shutdown_send_half_closes_the_host_socket() {
        let (mut c, mut host) = established();
        let mut w = Warned::default();
        c.send_pkt(&guest_hdr(op::RW, 3), b"req", now(), &mut w);
        let mut g = guest_hdr(op::SHUTDOWN, 0);
        g.flags = SHUTDOWN_SEND;
        c.send_pkt(&g, &[], now(), &mut w);
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"req");
        assert_eq!(c.state(), ConnState::Established);
        // The host can still answer.
        host.write_all(b"resp").unwrap();
        c.notify(EventSet::IN, now());
        let mut buf = [0u8; 64];
        let (h, n) = c.recv_pkt(&mut buf, now()).unwrap();
        assert_eq!((h.op, &buf[..n]), (op::RW, &b"resp"[..]));
        // More guest data after its SHUTDOWN SEND is a protocol error.
        c.send_pkt(&guest_hdr(op::RW, 1), b"x", now(), &mut w);
        assert_eq!(c.state(), ConnState::Killed);
    }

    #[test]
    fn host_eof_sends_shutdown_and_both_sides_shut_resets() {
        let (mut c, host) = established();
        let mut w = Warned::default();
        host.shutdown(Shutdown::Write).unwrap();
        c.notify(EventSet::IN, now());
        let (h, _) = c.recv_pkt(&mut [0; 64], now()).unwrap();
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        // Half-closed by the host only: no deadline, still established.
        assert_eq!(c.deadline(), None);
        assert_eq!(c.state(), ConnState::Established);
        // The guest says it sends no more either: RST and forget.
        let mut g = guest_hdr(op::SHUTDOWN, 0);
        g.flags = SHUTDOWN_SEND;
        c.send_pkt(&g, &[], now(), &mut w);
        assert_eq!(c.state(), ConnState::Killed);
        let (h, _) = c.recv_pkt(&mut [0; 64], now()).unwrap();
        assert_eq!(h.op, op::RST);
    }

    #[test]
    fn host_close_sends_full_shutdown_and_times_out() {
        let (mut c, host) = established();
        drop(host);
        let t0 = now();
        c.notify(EventSet::IN | EventSet::HANG_UP, t0);
        let (h, _) = c.recv_pkt(&mut [0; 64], t0).unwrap();
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_BOTH));
        let d = c.deadline().expect("shutdown deadline");
        assert!(!c.expire(d - Duration::from_millis(1)));
        // The guest never answers: killed with RST.
        assert!(c.expire(d));
        let (h, _) = c.recv_pkt(&mut [0; 64], d).unwrap();
        assert_eq!(h.op, op::RST);
    }

    #[test]
    fn guest_full_shutdown_with_unflushed_data_waits_then_resets() {
        let (mut c, host) = established_with_sndbuf(Some(4096));
        let mut w = Warned::default();
        c.send_pkt(&guest_hdr(op::RW, BUF), &[0u8; BUF as usize], now(), &mut w);
        assert!(c.buffered() > 0);
        let mut g = guest_hdr(op::SHUTDOWN, 0);
        g.flags = SHUTDOWN_BOTH;
        let t0 = now();
        c.send_pkt(&g, &[], t0, &mut w);
        // Still flushing: not reset yet, but on a clock.
        assert_eq!(c.state(), ConnState::Established);
        let d = c.deadline().unwrap();
        assert!(c.expire(d));
        assert_eq!(c.state(), ConnState::Killed);
        drop(host);
    }

    #[test]
    fn guest_full_shutdown_with_nothing_buffered_resets_at_once() {
        let (mut c, mut host) = established();
        let mut g = guest_hdr(op::SHUTDOWN, 0);
        g.flags = SHUTDOWN_BOTH;
        c.send_pkt(&g, &[], now(), &mut Warned::default());
        assert_eq!(c.state(), ConnState::Killed);
        let mut v = Vec::new();
        host.read_to_end(&mut v).unwrap();
        assert!(v.is_empty());
    }

    #[test]
    fn guest_shutdown_rcv_stops_host_reads() {
        let (mut c, host) = established();
        let mut g = guest_hdr(op::SHUTDOWN, 0);
        g.flags = SHUTDOWN_RCV;
        c.send_pkt(&g, &[], now(), &mut Warned::default());
        assert!(!c.interest().contains(EventSet::IN));
        // The host's writes now fail.
        let e = sys::send_nosignal(host.as_raw_fd(), b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn host_initiated_handshake_and_timeout() {
        let (ours, mut client) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let t0 = now();
        let mut c = Connection::new_local_init(
            ours,
            GUEST,
            1 << 30,
            52,
            BUF,
            T,
            t0 + Duration::from_secs(5),
        );
        let (h, _) = c.recv_pkt(&mut [0; 64], t0).unwrap();
        assert_eq!(h.op, op::REQUEST);
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (2, 3, 1 << 30, 52)
        );
        assert!(c.interest().is_empty());
        let mut r = guest_hdr(op::RESPONSE, 0);
        r.src_port = 52;
        r.dst_port = 1 << 30;
        c.send_pkt(&r, &[], t0, &mut Warned::default());
        assert_eq!(c.state(), ConnState::Established);
        assert_eq!(c.deadline(), None);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");

        let (ours, _client) = UnixStream::pair().unwrap();
        let mut c = Connection::new_local_init(ours, GUEST, 1 << 30, 52, BUF, T, t0);
        assert!(c.expire(t0));
        // The REQUEST was never sent; the RST still is (harmless).
        let (h, _) = c.recv_pkt(&mut [0; 64], t0).unwrap();
        assert_eq!(h.op, op::RST);
    }

    #[test]
    fn protocol_errors_reset() {
        let mut w = Warned::default();
        // RESPONSE on an established connection.
        let (mut c, _h) = established();
        c.send_pkt(&guest_hdr(op::RESPONSE, 0), &[], now(), &mut w);
        assert_eq!(c.state(), ConnState::Killed);
        // RW before the guest accepted a host-initiated connection.
        let (ours, _client) = UnixStream::pair().unwrap();
        let mut c = Connection::new_local_init(ours, GUEST, 1 << 30, 52, BUF, T, now());
        c.send_pkt(&guest_hdr(op::RW, 1), b"x", now(), &mut w);
        assert_eq!(c.state(), ConnState::Killed);
        assert!(w.seen("RW on a connection not open for guest data"));
    }
}
