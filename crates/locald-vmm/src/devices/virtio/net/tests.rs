//! Tests of the virtio-net device: queue processing with mock queues and
//! a fake backend (including hostile headers and buffers), the device's
//! identity and worker, and the two real backends without a guest — a TAP
//! and passt, each inside a network namespace the test creates (nothing
//! leaves the machine). Run on the test threads.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::header::{self, features as f, HDR_LEN};
use super::*;
use crate::devices::virtio::Interrupt;

/// Mock queue size. `MockSplitQueue` places the used ring `size` bytes
/// after the avail ring header, overlapping avail entries from `size/2`
/// on: tests keep fewer than 32 chains in flight.
const QSIZE: u16 = 64;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// One side of a driver: a mock queue plus where its next chain goes.
struct DriverQueue<'a> {
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    slot: u16,
    buf: u64,
    seen_used: u16,
}

impl<'a> DriverQueue<'a> {
    fn new(m: &'a GuestMemoryMmap, at: u64, buf_base: u64) -> Self {
        DriverQueue {
            vq: MockSplitQueue::create(m, GuestAddress(at), QSIZE),
            slot: 0,
            buf: buf_base,
            seen_used: 0,
        }
    }

    fn queue(&self) -> Queue {
        self.vq.create_queue().unwrap()
    }

    /// Makes a chain of (addr or next free, len, writable) buffers
    /// available; returns their addresses.
    fn push_at(&mut self, parts: &[(Option<u64>, u32, bool)]) -> Vec<u64> {
        let n = parts.len() as u16;
        let mut addrs = Vec::new();
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(at, len, w))| {
                let addr = at.unwrap_or_else(|| {
                    let a = self.buf;
                    self.buf += u64::from(len).max(1).next_multiple_of(0x1000);
                    a
                });
                addrs.push(addr);
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut next = 0;
                if i + 1 < parts.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    next = self.slot + i as u16 + 1;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&descs, self.slot).unwrap();
        self.slot += n;
        addrs
    }

    fn push(&mut self, parts: &[(u32, bool)]) -> Vec<u64> {
        let p: Vec<_> = parts.iter().map(|&(l, w)| (None, l, w)).collect();
        self.push_at(&p)
    }

    /// Used entries added since the last call: (head, len).
    fn take_used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.vq.used().idx().load();
        let mut out = Vec::new();
        while self.seen_used != idx {
            let e = self
                .vq
                .used()
                .ring()
                .ref_at(usize::from(self.seen_used % QSIZE))
                .unwrap()
                .load();
            out.push((e.id(), e.len()));
            self.seen_used = self.seen_used.wrapping_add(1);
        }
        out
    }
}

/// An in-memory backend: records what is sent, hands out queued packets.
#[derive(Clone, Default)]
struct Fake {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    inbox: Arc<Mutex<VecDeque<Vec<u8>>>>,
    gone: Arc<Mutex<bool>>,
    evt: Option<Arc<EventFd>>,
    offloads: bool,
}

impl Fake {
    fn with_evt() -> Self {
        Fake {
            evt: Some(Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            ..Default::default()
        }
    }
    fn give(&self, p: Vec<u8>) {
        self.inbox.lock().unwrap().push_back(p);
        if let Some(e) = &self.evt {
            e.write(1).unwrap();
        }
    }
}

impl NetBackend for Fake {
    fn describe(&self) -> String {
        "fake".into()
    }
    fn fd(&self) -> RawFd {
        self.evt.as_ref().map_or(-1, |e| e.as_raw_fd())
    }
    fn offloads(&self) -> Offloads {
        Offloads {
            host: self.offloads,
            guest: self.offloads,
        }
    }
    fn send(&mut self, packet: &[u8]) -> std::io::Result<()> {
        self.sent.lock().unwrap().push(packet.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        if *self.gone.lock().unwrap() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(e) = &self.evt {
            let _ = e.read();
        }
        match self.inbox.lock().unwrap().pop_front() {
            Some(p) => {
                buf[..p.len()].copy_from_slice(&p);
                Ok(Some(p.len()))
            }
            None => Ok(None),
        }
    }
}

/// Header + an Ethernet frame of `len` bytes with recognisable content.
fn packet(hdr: [u8; HDR_LEN], len: usize) -> Vec<u8> {
    let mut p = hdr.to_vec();
    p.extend((0..len).map(|i| (i * 7 + 3) as u8));
    p
}

fn guest_tx(m: &GuestMemoryMmap, q: &mut DriverQueue, pkt: &[u8], split: usize) {
    let (a, b) = pkt.split_at(split.min(pkt.len()));
    let mut parts = vec![(a.len() as u32, false)];
    if !b.is_empty() {
        parts.push((b.len() as u32, false));
    }
    let addrs = q.push(&parts);
    m.write_slice(a, GuestAddress(addrs[0])).unwrap();
    if !b.is_empty() {
        m.write_slice(b, GuestAddress(addrs[1])).unwrap();
    }
}

#[test]
fn tx_delivers_valid_packets_split_across_descriptors() {
    let m = mem();
    let mut dq = DriverQueue::new(&m, 0, 0x10_0000);
    let mut q = dq.queue();
    let mut be = Fake::default();
    let mut st = TxState::new(COMMON_FEATURES);
    let mut w = Warned::default();
    let p1 = packet([0; HDR_LEN], 60);
    let p2 = packet([0; HDR_LEN], header::MAX_FRAME);
    guest_tx(&m, &mut dq, &p1, HDR_LEN);
    guest_tx(&m, &mut dq, &p2, 100);
    let pass = process_tx(&mut q, &m, &mut be, &mut st, &mut w);
    assert_eq!(pass.completed, 2);
    assert!(pass.notify && !pass.broken);
    assert_eq!(*be.sent.lock().unwrap(), vec![p1, p2]);
    assert_eq!(dq.take_used(), vec![(0, 0), (2, 0)]);
}

#[test]
fn hostile_tx_packets_are_dropped_and_the_queue_goes_on() {
    let m = mem();
    let mut dq = DriverQueue::new(&m, 0, 0x10_0000);
    let mut q = dq.queue();
    let mut be = Fake::default();
    let mut st = TxState::new(COMMON_FEATURES);
    let mut w = Warned::default();
    // Over the MTU without TSO.
    guest_tx(
        &m,
        &mut dq,
        &packet([0; HDR_LEN], header::MAX_FRAME + 1),
        64,
    );
    // Checksum offload never negotiated.
    let mut h = [0u8; HDR_LEN];
    h[0] = header::FLAG_NEEDS_CSUM;
    guest_tx(&m, &mut dq, &packet(h, 100), 64);
    // TSO header without the feature.
    let mut h = [0u8; HDR_LEN];
    h[1] = header::GSO_TCPV4;
    h[4] = 100;
    guest_tx(&m, &mut dq, &packet(h, 1000), 64);
    // Garbage flags; a runt; a device-writable descriptor; memory outside.
    guest_tx(&m, &mut dq, &packet([0xff; HDR_LEN], 100), 64);
    guest_tx(&m, &mut dq, &[0u8; 7], 64);
    dq.push(&[(100, true)]);
    dq.push_at(&[(Some(0x80_0000), 100, false)]);
    // A 4 GiB descriptor length claim.
    dq.push_at(&[(Some(0x10_0000), u32::MAX, false)]);
    // And a good one at the end still goes through.
    let good = packet([0; HDR_LEN], 200);
    guest_tx(&m, &mut dq, &good, 5);
    let pass = process_tx(&mut q, &m, &mut be, &mut st, &mut w);
    assert!(!pass.broken);
    assert_eq!(pass.completed, 9);
    assert_eq!(*be.sent.lock().unwrap(), vec![good]);
    assert!(dq.take_used().iter().all(|u| u.1 == 0));
    for cause in [
        "frame larger than the negotiated limit",
        "checksum offload not negotiated",
        "segmentation offload not negotiated",
        "unknown header flags",
        "runt packet",
        "device-writable descriptor in a TX chain",
        "TX buffer outside guest memory",
    ] {
        assert!(w.seen(cause), "{cause}");
    }
}

#[test]
fn tso_packets_pass_when_negotiated() {
    let m = mem();
    let mut dq = DriverQueue::new(&m, 0, 0x10_0000);
    let mut q = dq.queue();
    let mut be = Fake::default();
    let mut st = TxState::new(COMMON_FEATURES | f::HOST_OFFLOADS);
    let mut h = [0u8; HDR_LEN];
    h[0] = header::FLAG_NEEDS_CSUM;
    h[1] = header::GSO_TCPV4;
    h[4..6].copy_from_slice(&1448u16.to_le_bytes());
    h[6] = 34;
    h[8] = 16;
    let p = packet(h, 30000);
    guest_tx(&m, &mut dq, &p, 1000);
    let pass = process_tx(&mut q, &m, &mut be, &mut st, &mut Warned::default());
    assert_eq!(pass.completed, 1);
    assert_eq!(be.sent.lock().unwrap().len(), 1);
}

#[test]
fn rx_fills_one_chain_and_sets_num_buffers() {
    let m = mem();
    let mut dq = DriverQueue::new(&m, 0, 0x10_0000);
    let mut q = dq.queue();
    let mut be = Fake::default();
    let mut st = RxState::new(COMMON_FEATURES | f::MRG_RXBUF);
    let p = packet([0; HDR_LEN], 100);
    be.give(p.clone());
    let a = dq.push(&[(2048, true)]);
    let pass = process_rx(&mut q, &m, &mut be, &mut st, &mut Warned::default());
    assert_eq!(pass.completed, 1);
    assert!(pass.notify);
    assert_eq!(dq.take_used(), vec![(0, p.len() as u32)]);
    let mut got = vec![0u8; p.len()];
    m.read_slice(&mut got, GuestAddress(a[0])).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(&got[HDR_LEN..], &p[HDR_LEN..]);
}

#[test]
fn rx_merges_buffers_and_waits_for_more() {
    let m = mem();
    let mut dq = DriverQueue::new(&m, 0, 0x10_0000);
    let mut q = dq.queue();
    let mut be = Fake::default();
    let mut st = RxState::new(COMMON_FEATURES | f::MRG_RXBUF);
    let mut w = Warned::default();
    let p = packet([0; HDR_LEN], 1500);
    be.give(p.clone());
    // Only one 512-byte buffer: the packet waits.
    let a0 = dq.push(&[(512, true)]);
    let pass = process_rx(&mut q, &m, &mut be, &mut st, &mut w);
    assert_eq!(pass.completed, 0);
    assert!(st.pending.is_some());
    assert!(dq.take_used().is_empty());
    // Two more (one split in two descriptors): it now fits in three.
    let a1 = dq.push(&[(512, true)]);
    let a2 = dq.push(&[(300, true), (1000, true)]);
    let pass = process_rx(&mut q, &m, &mut be, &mut st, &mut w);
    // One packet in three chains (`completed` counts chains).
    assert_eq!(pass.completed, 3);
    assert!(st.pending.is_none());
    let used = dq.take_used();
    assert_eq!(used, vec![(0, 512), (1, 512), (2, p.len() as u32 - 1024)]);
    let mut got = vec![0u8; p.len()];
    m.read_slice(&mut got[..512], GuestAddress(a0[0])).unwrap();
    m.read_slice(&mut got[512..1024], GuestAddress(a1[0]))
        .unwrap();
    m.read_slice(&mut got[1024..1324], GuestAddress(a2[0]))
        .unwrap();
    m.read_slice(&mut got[1324..], GuestAddress(a2[1])).unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3);
    assert_eq!(&got[HDR_LEN..], &p[HDR_LEN..]);
    assert!(!w.seen("RX buffers too small for a frame"));
}

#[test]
fn hostile_rx_buffers_drop_the_packet_not_the_device() {
    let m = mem();
    let mut dq = DriverQueue::new(&m, 0, 0x10_0000);
    let mut q = dq.queue();
    let mut be = Fake::default();
    let mut w = Warned::default();
    // Without MRG_RXBUF a chain too small for the frame drops it.
    let mut st = RxState::new(COMMON_FEATURES);
    be.give(packet([0; HDR_LEN], 1500));
    dq.push(&[(256, true)]);
    // A device-readable descriptor in an RX chain.
    be.give(packet([0; HDR_LEN], 60));
    dq.push(&[(2048, false)]);
    // Smaller than the header.
    be.give(packet([0; HDR_LEN], 60));
    dq.push(&[(4, true)]);
    // Outside guest memory.
    be.give(packet([0; HDR_LEN], 60));
    dq.push_at(&[(Some(0x80_0000), 2048, true)]);
    // Then a good one.
    be.give(packet([0; HDR_LEN], 60));
    dq.push(&[(2048, true)]);
    let pass = process_rx(&mut q, &m, &mut be, &mut st, &mut w);
    assert!(!pass.broken);
    assert_eq!(pass.completed, 5);
    let used = dq.take_used();
    assert_eq!(
        used.iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0, 0, 0, 72]
    );
    for cause in [
        "RX buffers too small for a frame",
        "device-readable descriptor in an RX chain",
        "RX buffer smaller than the virtio-net header",
        "RX buffer outside guest memory",
    ] {
        assert!(w.seen(cause), "{cause}");
    }
}

#[test]
fn runaway_avail_index_breaks_the_queues() {
    let m = mem();
    let dq = DriverQueue::new(&m, 0, 0x10_0000);
    let mut q = dq.queue();
    dq.vq.avail().idx().store(1000);
    let mut be = Fake::default();
    let pass = process_tx(
        &mut q,
        &m,
        &mut be,
        &mut TxState::new(COMMON_FEATURES),
        &mut Warned::default(),
    );
    assert!(pass.broken);
    let mut q = dq.queue();
    be.give(packet([0; HDR_LEN], 60));
    let pass = process_rx(
        &mut q,
        &m,
        &mut be,
        &mut RxState::new(COMMON_FEATURES),
        &mut Warned::default(),
    );
    assert!(pass.broken);
}

#[test]
fn identity_config_and_offloads_follow_the_backend() {
    let mac = [2, 0, 0, 0, 0, 7];
    let d = Net::new(mac, Box::new(Fake::default()));
    assert_eq!(d.device_type(), device_type::NET);
    assert_eq!(d.queue_max_sizes().len(), 2);
    assert_eq!(
        d.features() & f::HOST_OFFLOADS,
        0,
        "passt-like: no offloads"
    );
    assert_ne!(d.features() & f::MRG_RXBUF, 0);
    let mut cfg = [0u8; 12];
    d.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), header::STATUS_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), header::MTU);
    let d = Net::new(
        mac,
        Box::new(Fake {
            offloads: true,
            ..Default::default()
        }),
    );
    assert_eq!(d.features() & f::HOST_OFFLOADS, f::HOST_OFFLOADS);
    assert_eq!(d.features() & f::GUEST_OFFLOADS, f::GUEST_OFFLOADS);
    assert_eq!(d.features() & (f::HOST_UFO | f::GUEST_UFO), 0);
}

fn wait_irq(irq: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: irq.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, 5000) };
    let _ = irq.read();
    n == 1
}

#[test]
fn worker_moves_frames_and_a_dead_backend_takes_the_link_down() {
    let m = mem();
    let mut rx = DriverQueue::new(&m, 0, 0x10_0000);
    let mut tx = DriverQueue::new(&m, 0x8000, 0x20_0000);
    let be = Fake::with_evt();
    let mut dev = Net::new([2, 0, 0, 0, 0, 1], Box::new(be.clone()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let kicks: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    dev.activate(Activation {
        mem: m.clone(),
        queues: vec![rx.queue(), tx.queue()],
        queue_events: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        interrupt: interrupt.clone(),
        features: COMMON_FEATURES | f::MRG_RXBUF | f::STATUS | f::MAC,
        restored: false,
    })
    .unwrap();
    // Guest → backend.
    let p = packet([0; HDR_LEN], 60);
    guest_tx(&m, &mut tx, &p, HDR_LEN);
    kicks[TX_QUEUE].write(1).unwrap();
    let t0 = Instant::now();
    while be.sent.lock().unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    // Backend → guest through the backend-fd path.
    rx.push(&[(2048, true)]);
    kicks[RX_QUEUE].write(1).unwrap();
    be.give(packet([0; HDR_LEN], 80));
    let mut used = Vec::new();
    while used.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        wait_irq(&irq);
        used = rx.take_used();
    }
    assert_eq!(used, vec![(0, 92)]);
    // The backend dies: link down, config interrupt, queues still served.
    *be.gone.lock().unwrap() = true;
    be.evt.as_ref().unwrap().write(1).unwrap();
    while dev.link_up() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(interrupt.status() & crate::devices::virtio::INT_CONFIG, 0);
    let mut cfg = [0u8; 2];
    dev.read_config(6, &mut cfg);
    assert_eq!(cfg, [0, 0]);
    guest_tx(&m, &mut tx, &p, HDR_LEN);
    kicks[TX_QUEUE].write(1).unwrap();
    let mut used = Vec::new();
    while used.len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        wait_irq(&irq);
        used.extend(tx.take_used());
    }
    assert_eq!(be.sent.lock().unwrap().len(), 1, "nothing sent after death");
    dev.reset();
}

// ---------------------------------------------------------------------------
// Real backends, inside network namespaces the tests create.
// ---------------------------------------------------------------------------

/// A network namespace removed on drop.
pub(crate) struct NetNs(pub(crate) String);

impl NetNs {
    /// Creates `ldnet-<tag>-<pid>`, or None (with a loud message) when we
    /// cannot (not root, no `ip`).
    pub(crate) fn new(tag: &str) -> Option<Self> {
        let name = format!("ldnet-{tag}-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        match std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
        {
            Ok(s) if s.success() => Some(NetNs(name)),
            other => {
                eprintln!("cannot create a network namespace: {other:?}");
                crate::test_support::skip(crate::test_support::Why::NotRoot(
                    "network namespaces (ip netns add)",
                ));
                None
            }
        }
    }

    pub(crate) fn ip(&self, args: &str) {
        let mut a = vec!["-n", &self.0];
        a.extend(args.split_whitespace());
        let st = std::process::Command::new("ip").args(&a).status().unwrap();
        assert!(st.success(), "ip {a:?}");
    }

    /// Runs `f` on a thread inside the namespace (children it spawns and
    /// sockets it opens live there too).
    pub(crate) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on a valid namespace fd; affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// An ARP request "who has `target`? tell `sender`" from `mac`, with a
/// zero virtio-net header in front.
pub(crate) fn arp_request(mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; HDR_LEN];
    p.extend_from_slice(&[0xff; 6]);
    p.extend_from_slice(&mac);
    p.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&mac);
    p.extend_from_slice(&sender);
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target);
    p.resize(HDR_LEN + 60, 0);
    p
}

/// Sends `req` through `be` every half second, up to 10 s, until an ARP
/// reply to `mac` comes back (a TAP that just got its carrier may drop
/// the first ones); returns the sender address of the reply.
pub(crate) fn arp_round_trip(be: &mut dyn NetBackend, req: &[u8], mac: [u8; 6]) -> Option<[u8; 4]> {
    for _ in 0..20 {
        be.send(req).unwrap();
        if let Some(a) = await_arp_reply(be, mac, Duration::from_millis(500)) {
            return Some(a);
        }
    }
    None
}

/// Waits up to `limit` for an ARP reply to `mac` through `be`.
pub(crate) fn await_arp_reply(
    be: &mut dyn NetBackend,
    mac: [u8; 6],
    limit: Duration,
) -> Option<[u8; 4]> {
    let mut buf = vec![0u8; header::MAX_PACKET];
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        match be.recv(&mut buf) {
            Ok(Some(n)) => {
                let fr = &buf[HDR_LEN..n];
                if fr.len() >= 42 && fr[..6] == mac && fr[12..14] == [8, 6] && fr[21] == 2 {
                    return Some([fr[28], fr[29], fr[30], fr[31]]);
                }
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("backend: {e}"),
        }
    }
    None
}

fn have_tun() -> bool {
    if std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    crate::test_support::skip(crate::test_support::Why::Missing("/dev/net/tun"));
    false
}

#[test]
fn tap_backend_round_trips_frames_in_a_private_netns() {
    if !have_tun() {
        return;
    }
    let Some(ns) = NetNs::new("tap") else {
        return;
    };
    // A missing TAP is a clear error (and is not created behind our back).
    let err = ns.run(|| tap::Tap::open(Some("ldnope0")).unwrap_err().to_string());
    assert!(err.contains("does not exist"), "{err}");
    // An existing, named TAP with an address: the kernel answers ARP.
    ns.ip("tuntap add ldtest0 mode tap");
    ns.ip("addr add 10.231.0.1/24 dev ldtest0");
    ns.ip("link set ldtest0 up");
    let mac = [2, 0, 0, 0, 0, 0x42];
    let reply = ns.run(move || {
        let mut t = tap::Tap::open(Some("ldtest0")).unwrap();
        assert!(t.offloads().host);
        t.set_guest_features(f::GUEST_CSUM | f::GUEST_TSO4).unwrap();
        arp_round_trip(
            &mut t,
            &arp_request(mac, [10, 231, 0, 2], [10, 231, 0, 1]),
            mac,
        )
    });
    assert_eq!(reply, Some([10, 231, 0, 1]));
    // A created TAP gets a kernel-chosen name and is up. (Its flags are
    // read with `ip` run from inside the namespace: /sys/class/net shows
    // the namespace sysfs was mounted in, not this thread's.)
    let (name, link) = ns.run(|| {
        let t = tap::Tap::open(None).unwrap();
        let n = t.name().to_string();
        let out = std::process::Command::new("ip")
            .args(["-o", "link", "show", "dev", &n])
            .output()
            .unwrap();
        (n, String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(name.starts_with("ldtap"), "{name:?}");
    // `5: ldtap0: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu …`: UP is IFF_UP.
    let flags = link
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f.split(',').map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_else(|| panic!("no flags for {name} in {link:?}"));
    assert!(
        flags.iter().any(|f| f == "UP"),
        "created TAP {name} is not up: {link:?}"
    );
}

fn have_passt() -> bool {
    let ok = std::process::Command::new("passt")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !ok {
        crate::test_support::skip(crate::test_support::Why::Missing(
            "passt (apt install passt)",
        ));
    }
    ok
}

/// A namespace where passt has a template interface but nothing beyond:
/// `ldv0` (10.232.0.2/24, default route via 10.232.0.1) is one end of a
/// veth pair whose other end, in the same namespace, has no address and
/// forwards nothing: every packet not for loopback dies there.
pub(crate) fn passt_netns(tag: &str) -> Option<NetNs> {
    let ns = NetNs::new(tag)?;
    ns.ip("link set lo up");
    ns.ip("link add ldv0 type veth peer name ldv1");
    ns.ip("addr add 10.232.0.2/24 dev ldv0");
    ns.ip("link set ldv0 up");
    ns.ip("link set ldv1 up");
    ns.ip("route add default via 10.232.0.1 dev ldv0");
    Some(ns)
}

#[test]
fn passt_backend_round_trips_frames_and_its_death_is_reported() {
    // A missing binary names the package.
    let err = passt::Passt::spawn(&passt::PasstOptions {
        binary: Some("/nonexistent/passt".into()),
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("`passt`"), "{err}");
    if !have_passt() {
        return;
    }
    let Some(ns) = passt_netns("passt") else {
        return;
    };
    let mac = [2, 0, 0, 0, 0, 0x43];
    let (reply, died) = ns.run(move || {
        let mut p = passt::Passt::spawn(&passt::PasstOptions::default()).unwrap();
        // No offloads unless asked for (`offload=on`); never toward the
        // guest (passt's frames carry no header).
        assert!(!p.offloads().host && !p.offloads().guest);
        // passt answers ARP for the gateway.
        let reply = arp_round_trip(
            &mut p,
            &arp_request(mac, [10, 232, 0, 2], [10, 232, 0, 1]),
            mac,
        );
        // Kill it: the next receive reports it gone, with its status.
        // SAFETY: signalling the passt child we spawned.
        unsafe { libc::kill(p.pid() as libc::pid_t, libc::SIGKILL) };
        let mut buf = vec![0u8; header::MAX_PACKET];
        let t0 = Instant::now();
        let died = loop {
            match p.recv(&mut buf) {
                Err(e) => break e.to_string(),
                Ok(_) if t0.elapsed() > Duration::from_secs(5) => break "still alive".into(),
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        (reply, died)
    });
    assert_eq!(reply, Some([10, 232, 0, 1]));
    assert!(died.contains("passt"), "{died}");
}

/// A TCP SYN from `mac`/`src` port 40001 to `dst`:`port`, with a zero
/// virtio-net header in front and both checksums computed here (a plain
/// RFC 1071 sum, independent of `segment.rs`).
fn tcp_syn(mac: [u8; 6], src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
    fn csum(words: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for w in words.chunks(2) {
            s += u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
    let mut f = vec![0u8; 14 + 20 + 20];
    f[..6].fill(0xff); // passt takes any destination MAC
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&40u16.to_be_bytes());
    f[20] = 0x40;
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    let c = csum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&40001u16.to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f[38..42].copy_from_slice(&0x1000u32.to_be_bytes());
    f[46] = 5 << 4;
    f[47] = 0x02; // SYN
    f[48..50].copy_from_slice(&65535u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&f[34..54]);
    let c = csum(&pseudo);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0u8; HDR_LEN];
    p.extend_from_slice(&f);
    p
}

/// Whether a guest TCP connect to the gateway reaches a listener on the
/// namespace's 127.0.0.1, through a passt started with `host_loopback`.
fn gateway_reaches_host_loopback(ns: &NetNs, host_loopback: bool) -> bool {
    ns.run(move || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let mut p = passt::Passt::spawn(&passt::PasstOptions {
            host_loopback,
            ..Default::default()
        })
        .unwrap();
        let mac = [2, 0, 0, 0, 0, 0x44];
        // passt learns the guest's MAC from its first frame.
        let arp = arp_request(mac, [10, 232, 0, 2], [10, 232, 0, 1]);
        assert_eq!(arp_round_trip(&mut p, &arp, mac), Some([10, 232, 0, 1]));
        let syn = tcp_syn(mac, [10, 232, 0, 2], [10, 232, 0, 1], port);
        let mut buf = vec![0u8; header::MAX_PACKET];
        let t0 = Instant::now();
        let mut sent = Instant::now() - Duration::from_secs(1);
        while t0.elapsed() < Duration::from_secs(4) {
            if sent.elapsed() >= Duration::from_millis(500) {
                p.send(&syn).unwrap();
                sent = Instant::now();
            }
            if l.accept().is_ok() {
                return true;
            }
            // Drain what passt sends the guest (SYN-ACK, ARP, RST).
            while let Ok(Some(_)) = p.recv(&mut buf) {}
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })
}

/// Issue 14 item 12: passt's gateway mapping gives the guest every
/// service on the host's 127.0.0.1; it is off unless `host-loopback=on`.
#[test]
fn passt_gateway_reaches_host_loopback_only_when_asked() {
    let off = passt::passt_args(&passt::PasstOptions::default(), 7);
    assert!(off.iter().any(|a| a == "--no-map-gw"), "{off:?}");
    let on = passt::passt_args(
        &passt::PasstOptions {
            host_loopback: true,
            ..Default::default()
        },
        7,
    );
    assert!(!on.iter().any(|a| a == "--no-map-gw"), "{on:?}");
    if !have_passt() {
        return;
    }
    let Some(ns) = passt_netns("hostlo") else {
        return;
    };
    assert!(
        !gateway_reaches_host_loopback(&ns, false),
        "default: the guest reached host loopback through the gateway"
    );
    assert!(
        gateway_reaches_host_loopback(&ns, true),
        "host-loopback=on: the guest did not reach host loopback"
    );
}
