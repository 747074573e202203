//! Device-level tests: the queue functions driven through mock split
//! queues over real guest memory, against real Unix sockets (no KVM), and
//! one run through the real worker thread.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{op, Header, HDR_SIZE, HOST_CID, SHUTDOWN_BOTH, TYPE_STREAM};
use super::*;
use crate::devices::virtio::{Activation, Interrupt, VirtioDevice, Warned};

/// A scratch directory removed on drop (socket paths must stay short).
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "lvsock-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const GUEST: u64 = 3;
const QSIZE: u16 = 32;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// One side of a driver: a mock queue plus where its next chain goes.
struct DriverQueue<'a> {
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    slot: u16,
    buf: u64,
    buf_base: u64,
    seen_used: u16,
}

impl<'a> DriverQueue<'a> {
    fn new(m: &'a GuestMemoryMmap, at: u64, buf_base: u64) -> Self {
        DriverQueue {
            vq: MockSplitQueue::create(m, GuestAddress(at), QSIZE),
            slot: 0,
            buf: buf_base,
            buf_base,
            seen_used: 0,
        }
    }

    fn queue(&self) -> Queue {
        self.vq.create_queue().unwrap()
    }

    /// Makes a chain of (len, writable) buffers available; returns their
    /// addresses.
    fn push(&mut self, parts: &[(u32, bool)]) -> Vec<u64> {
        let n = parts.len() as u16;
        if self.slot + n > QSIZE {
            self.slot = 0;
        }
        if self.buf + 0x2_0000 > self.buf_base + 0xf_0000 {
            self.buf = self.buf_base;
        }
        let mut addrs = Vec::new();
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(len, w))| {
                let addr = self.buf;
                self.buf += u64::from(len).max(1).next_multiple_of(0x1000);
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

fn guest_hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// The device half, driven by hand.
struct Dev {
    muxer: Muxer,
    rxq: Queue,
    txq: Queue,
    warned: Warned,
    payload: Vec<u8>,
    scratch: Vec<u8>,
}

impl Dev {
    fn tx(&mut self, m: &GuestMemoryMmap) -> Pass {
        process_tx(
            &mut self.txq,
            m,
            &mut self.muxer,
            &mut self.warned,
            &mut self.payload,
        )
    }
    fn rx(&mut self, m: &GuestMemoryMmap) -> Pass {
        process_rx(
            &mut self.rxq,
            m,
            &mut self.muxer,
            &mut self.warned,
            &mut self.scratch,
        )
    }
    /// Runs host events until the muxer has something for the guest.
    fn pump(&mut self) {
        let t0 = Instant::now();
        while !self.muxer.has_pending_rx() {
            assert!(t0.elapsed() < Duration::from_secs(5), "no host event");
            let mut p = libc::pollfd {
                fd: self.muxer.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut p, 1, 20) };
            self.muxer.process_events();
        }
    }
}

/// Guest sends one packet (header in its own descriptor, payload in
/// another, or both in one).
fn guest_send(m: &GuestMemoryMmap, tx: &mut DriverQueue, h: &Header, payload: &[u8], split: bool) {
    if split && !payload.is_empty() {
        let a = tx.push(&[(HDR_SIZE as u32, false), (payload.len() as u32, false)]);
        m.write_slice(&h.to_bytes(), GuestAddress(a[0])).unwrap();
        m.write_slice(payload, GuestAddress(a[1])).unwrap();
    } else {
        let a = tx.push(&[((HDR_SIZE + payload.len()) as u32, false)]);
        m.write_slice(&h.to_bytes(), GuestAddress(a[0])).unwrap();
        m.write_slice(payload, GuestAddress(a[0] + HDR_SIZE as u64))
            .unwrap();
    }
}

/// Reads the packet the device put in the RX chain at `addrs` (layout
/// `sizes`), `len` bytes used.
fn guest_recv(m: &GuestMemoryMmap, addrs: &[u64], sizes: &[u32], len: u32) -> (Header, Vec<u8>) {
    let mut bytes = Vec::new();
    for (&a, &s) in addrs.iter().zip(sizes) {
        let mut b = vec![0u8; s as usize];
        m.read_slice(&mut b, GuestAddress(a)).unwrap();
        bytes.extend(b);
    }
    bytes.truncate(len as usize);
    let h = Header::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
    assert_eq!(h.len as usize, bytes.len() - HDR_SIZE);
    (h, bytes[HDR_SIZE..].to_vec())
}

fn setup<'a>(m: &'a GuestMemoryMmap, dir: &TempDir) -> (Dev, DriverQueue<'a>, DriverQueue<'a>) {
    let rx = DriverQueue::new(m, 0x0, RX_BUFS);
    let tx = DriverQueue::new(m, 0x8000, TX_BUFS);
    let cfg = MuxerConfig {
        buf_alloc: 64 * 1024,
        ..MuxerConfig::default()
    };
    let dev = Dev {
        muxer: Muxer::new(GUEST, dir.path().join("v.sock"), cfg).unwrap(),
        rxq: rx.queue(),
        txq: tx.queue(),
        warned: Warned::default(),
        payload: Vec::new(),
        scratch: vec![0; packet::MAX_PKT_PAYLOAD],
    };
    (dev, rx, tx)
}

#[test]
fn guest_to_host_round_trip_through_queues() {
    let m = mem();
    let dir = TempDir::new("dev-g2h");
    let (mut dev, mut rx, mut tx) = setup(&m, &dir);
    let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();

    // The guest posts RX buffers in both layouts Linux uses.
    let mut rx_bufs = vec![];
    for i in 0..4 {
        let sizes: Vec<u32> = if i % 2 == 0 {
            vec![4096]
        } else {
            vec![HDR_SIZE as u32, 4096]
        };
        let parts: Vec<(u32, bool)> = sizes.iter().map(|&s| (s, true)).collect();
        rx_bufs.push((rx.push(&parts), sizes));
    }
    // Nothing pending: no RX buffer is consumed.
    assert_eq!(dev.rx(&m).completed, 0);

    guest_send(
        &m,
        &mut tx,
        &guest_hdr(op::REQUEST, 1000, 52, 0),
        &[],
        false,
    );
    let pass = dev.tx(&m);
    assert_eq!(pass.completed, 1);
    assert!(pass.notify);
    assert_eq!(tx.take_used(), [(0, 0)]);
    let pass = dev.rx(&m);
    assert_eq!(pass.completed, 1);
    let used = rx.take_used();
    assert_eq!(used.len(), 1);
    let (addrs, sizes) = &rx_bufs[0];
    let (h, _) = guest_recv(&m, addrs, sizes, used[0].1);
    assert_eq!(
        (h.op, h.src_cid, h.dst_cid),
        (op::RESPONSE, HOST_CID, GUEST)
    );
    assert_eq!((h.src_port, h.dst_port), (52, 1000));

    let (mut s, _) = host.accept().unwrap();
    // Guest → host, payload in a separate descriptor, then in the same one.
    guest_send(
        &m,
        &mut tx,
        &guest_hdr(op::RW, 1000, 52, 6),
        b"hello ",
        true,
    );
    guest_send(
        &m,
        &mut tx,
        &guest_hdr(op::RW, 1000, 52, 5),
        b"world",
        false,
    );
    assert_eq!(dev.tx(&m).completed, 2);
    let mut b = [0u8; 11];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello world");

    // Host → guest, into the header+payload split buffer.
    s.write_all(b"reply").unwrap();
    dev.pump();
    assert_eq!(dev.rx(&m).completed, 1);
    let used = rx.take_used();
    let (addrs, sizes) = &rx_bufs[1];
    let (h, data) = guest_recv(&m, addrs, sizes, used[0].1);
    assert_eq!((h.op, data.as_slice()), (op::RW, &b"reply"[..]));
    assert_eq!(h.fwd_cnt, 11, "our fwd_cnt counts what the host got");

    // The guest closes: RST back, the host sees EOF.
    let mut sd = guest_hdr(op::SHUTDOWN, 1000, 52, 0);
    sd.flags = SHUTDOWN_BOTH;
    guest_send(&m, &mut tx, &sd, &[], false);
    dev.tx(&m);
    dev.rx(&m);
    let used = rx.take_used();
    let (addrs, sizes) = &rx_bufs[2];
    assert_eq!(guest_recv(&m, addrs, sizes, used[0].1).0.op, op::RST);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(dev.muxer.connection_count(), 0);
}

/// A host client connects to guest port 5000 through the hybrid socket
/// and the guest accepts: the REQUEST waits for an RX buffer, the guest's
/// RESPONSE gives the client its `OK <port>` line. Returns the client and
/// the host-side port.
fn host_connects(
    m: &GuestMemoryMmap,
    dir: &TempDir,
    dev: &mut Dev,
    rx: &mut DriverQueue,
    tx: &mut DriverQueue,
) -> (UnixStream, u32) {
    let mut c = UnixStream::connect(dir.path().join("v.sock")).unwrap();
    c.write_all(b"CONNECT 5000\n").unwrap();
    dev.pump();
    // No RX buffer yet: the REQUEST waits.
    assert_eq!(dev.rx(m).completed, 0);
    assert!(dev.muxer.has_pending_rx());
    let a = rx.push(&[(4096, true)]);
    assert_eq!(dev.rx(m).completed, 1);
    let used = rx.take_used();
    let (req, _) = guest_recv(m, &a, &[4096], used[0].1);
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 5000));
    guest_send(
        m,
        tx,
        &guest_hdr(op::RESPONSE, 5000, req.src_port, 0),
        &[],
        false,
    );
    dev.tx(m);
    let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
    c.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
    (c, req.src_port)
}

#[test]
fn host_to_guest_round_trip_through_queues() {
    let m = mem();
    let dir = TempDir::new("dev-h2g");
    let (mut dev, mut rx, mut tx) = setup(&m, &dir);
    let (mut c, src_port) = host_connects(&m, &dir, &mut dev, &mut rx, &mut tx);

    // A large host write arrives in packets no larger than the buffers.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&data).unwrap();
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < data.len() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        let a = rx.push(&[(HDR_SIZE as u32 + 1024, true)]);
        dev.pump();
        dev.rx(&m);
        for (_, len) in rx.take_used() {
            let (h, d) = guest_recv(&m, &a, &[HDR_SIZE as u32 + 1024], len);
            assert_eq!(h.op, op::RW);
            assert!(d.len() <= 1024);
            got.extend(d);
        }
    }
    assert_eq!(got, data);

    // Guest → host.
    guest_send(
        &m,
        &mut tx,
        &guest_hdr(op::RW, 5000, src_port, 3),
        b"abc",
        true,
    );
    dev.tx(&m);
    let mut b = [0u8; 3];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"abc");
}

#[test]
fn hostile_tx_chains_do_not_break_the_device() {
    let m = mem();
    let dir = TempDir::new("dev-hostile");
    let (mut dev, mut rx, mut tx) = setup(&m, &dir);
    // Short header.
    let a = tx.push(&[(20, false)]);
    m.write_slice(&[0xaa; 20], GuestAddress(a[0])).unwrap();
    // len beyond the descriptors, and beyond the maximum.
    guest_send(&m, &mut tx, &guest_hdr(op::RW, 1, 2, 500), &[1; 10], true);
    let a = tx.push(&[(HDR_SIZE as u32, false)]);
    m.write_slice(
        &guest_hdr(op::RW, 1, 3, u32::MAX).to_bytes(),
        GuestAddress(a[0]),
    )
    .unwrap();
    // A writable descriptor in a TX chain.
    tx.push(&[(HDR_SIZE as u32, true)]);
    let pass = dev.tx(&m);
    assert_eq!(pass.completed, 4);
    assert!(!pass.broken);
    for cause in [
        "TX header too short",
        "TX payload longer than its descriptors",
        "TX payload over the limit",
        "device-writable TX descriptor",
    ] {
        assert!(dev.warned.seen(cause), "{cause}");
    }
    // The two packets with readable headers are answered with RSTs.
    let bufs: Vec<_> = (0..3).map(|_| rx.push(&[(4096, true)])).collect();
    assert_eq!(dev.rx(&m).completed, 2);
    for (i, (_, len)) in rx.take_used().into_iter().enumerate() {
        let (h, _) = guest_recv(&m, &bufs[i], &[4096], len);
        assert_eq!(h.op, op::RST);
    }
}

#[test]
fn bad_rx_buffers_are_returned_empty() {
    let m = mem();
    let dir = TempDir::new("dev-badrx");
    let (mut dev, mut rx, mut tx) = setup(&m, &dir);
    guest_send(&m, &mut tx, &guest_hdr(op::RW, 1, 2, 0), &[], false);
    dev.tx(&m);
    // Too small, then device-readable, then a good one.
    rx.push(&[(10, true)]);
    rx.push(&[(4096, false)]);
    let good = rx.push(&[(4096, true)]);
    assert_eq!(dev.rx(&m).completed, 3);
    let used = rx.take_used();
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 0);
    assert_eq!(guest_recv(&m, &good, &[4096], used[2].1).0.op, op::RST);
    assert!(dev.warned.seen("RX buffer smaller than a header"));
    assert!(dev.warned.seen("device-readable RX descriptor"));
}

/// A hostile guest posts RX buffers with room for a header only while the
/// host has data for it: each is returned empty, once, and the pass ends
/// (it used to spin forever on the first one).
#[test]
fn header_only_rx_buffers_do_not_spin_the_device() {
    let m = mem();
    let dir = TempDir::new("dev-hdronly");
    let (mut dev, mut rx, mut tx) = setup(&m, &dir);
    let (mut c, _) = host_connects(&m, &dir, &mut dev, &mut rx, &mut tx);
    c.write_all(b"data the guest has no room for").unwrap();
    dev.pump();
    for _ in 0..3 {
        rx.push(&[(HDR_SIZE as u32, true)]);
    }
    let pass = dev.rx(&m);
    assert_eq!(pass.completed, 3);
    assert!(rx.take_used().iter().all(|&(_, len)| len == 0));
    assert!(dev.warned.seen("RX buffer has no room for pending data"));
    // The data is still there for a real buffer.
    assert!(dev.muxer.has_pending_rx());
    let a = rx.push(&[(4096, true)]);
    assert_eq!(dev.rx(&m).completed, 1);
    let (h, d) = guest_recv(&m, &a, &[4096], rx.take_used()[0].1);
    assert_eq!(h.op, op::RW);
    assert_eq!(d, b"data the guest has no room for");
}

#[test]
fn runaway_avail_index_breaks_the_queue() {
    let m = mem();
    let dir = TempDir::new("dev-runaway");
    let (mut dev, _rx, tx) = setup(&m, &dir);
    tx.vq.avail().idx().store(1000);
    assert!(dev.tx(&m).broken);
}

#[test]
fn device_identity_and_config() {
    let dir = TempDir::new("dev-id");
    let path = dir.path().join("v.sock");
    let d = Vsock::new(0x1_2345, path.clone()).unwrap();
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(d.features(), crate::devices::virtio::COMMON_FEATURES);
    let mut b = [0xffu8; 12];
    d.read_config(0, &mut b);
    assert_eq!(b, [0x45, 0x23, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut b = [0u8; 4];
    d.read_config(4, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!((d.guest_cid(), d.uds_path()), (0x1_2345, path.as_path()));
    assert!(path.exists());
    drop(d);
    assert!(!path.exists());
    for bad in [0, 1, 2, 0xffff_ffff, 1 << 32] {
        assert!(matches!(
            Vsock::new(bad, dir.path().join("w.sock")),
            Err(VsockError::InvalidCid(_))
        ));
    }
}

/// Waits until the interrupt eventfd fires.
fn wait_irq(irq: &EventFd) {
    let mut p = libc::pollfd {
        fd: irq.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(n, 1, "no interrupt");
    irq.read().unwrap();
}

#[test]
fn worker_serves_queues_and_host_sockets() {
    let m = mem();
    let dir = TempDir::new("dev-worker");
    let mut rx = DriverQueue::new(&m, 0x0, RX_BUFS);
    let mut tx = DriverQueue::new(&m, 0x8000, TX_BUFS);
    let ev = DriverQueue::new(&m, 0x10000, 0x30_0000);
    let mut dev = Vsock::new(GUEST, dir.path().join("v.sock")).unwrap();
    let host = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
    let kicks: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    dev.activate(Activation {
        mem: m.clone(),
        queues: vec![rx.queue(), tx.queue(), ev.queue()],
        queue_events: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
        interrupt: interrupt.clone(),
        features: crate::devices::virtio::COMMON_FEATURES,
        restored: false,
    })
    .unwrap();

    let rx_a = rx.push(&[(4096, true)]);
    kicks[RX_QUEUE].write(1).unwrap();
    guest_send(
        &m,
        &mut tx,
        &guest_hdr(op::REQUEST, 1000, 52, 0),
        &[],
        false,
    );
    kicks[TX_QUEUE].write(1).unwrap();
    let t0 = Instant::now();
    let mut used = Vec::new();
    while used.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        wait_irq(&irq);
        used = rx.take_used();
    }
    assert_eq!(guest_recv(&m, &rx_a, &[4096], used[0].1).0.op, op::RESPONSE);

    // Host data reaches the guest through the worker's host-event path.
    let (mut s, _) = host.accept().unwrap();
    let rx_b = rx.push(&[(4096, true)]);
    kicks[RX_QUEUE].write(1).unwrap();
    s.write_all(b"from host").unwrap();
    let mut used = Vec::new();
    while used.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5));
        wait_irq(&irq);
        used = rx.take_used();
    }
    let (h, d) = guest_recv(&m, &rx_b, &[4096], used[0].1);
    assert_eq!((h.op, d.as_slice()), (op::RW, &b"from host"[..]));

    // Reset forgets the connection; the listener survives for the next run.
    dev.reset();
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    assert!(dir.path().join("v.sock").exists());
    assert!(UnixStream::connect(dir.path().join("v.sock")).is_ok());
    drop(dev);
    assert!(!dir.path().join("v.sock").exists());
}

/// One split ring as a Linux driver runs it, over guest memory: a free
/// list of descriptors, the avail ring written modulo its size, kicks only
/// when the device's `avail_event` asks for one, and `used_event` set to
/// what it has consumed (as `virtqueue_enable_cb` does) under EVENT_IDX.
struct LinuxRing {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    free: Vec<u16>,
    avail_idx: u16,
    kicked_at: u16,
    last_used: u16,
}

impl LinuxRing {
    const BUF: u32 = 0x2000;

    /// A ring of `size` entries at `at` (zeroed, as freshly allocated ring
    /// pages are), with one `BUF`-byte buffer per descriptor from `bufs`.
    fn new(m: &GuestMemoryMmap, at: u64, bufs: u64, size: u16) -> Self {
        let desc = at;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let end = used + 6 + 8 * u64::from(size);
        m.write_slice(&vec![0u8; (end - at) as usize], GuestAddress(at))
            .unwrap();
        LinuxRing {
            size,
            desc,
            avail,
            used,
            bufs,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            kicked_at: 0,
            last_used: 0,
        }
    }

    /// The device's view, as the transport builds it at DRIVER_OK.
    fn queue(&self) -> Queue {
        use virtio_queue::QueueT;
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(true);
        q.set_ready(true);
        q
    }

    fn buf_addr(&self, d: u16) -> u64 {
        self.bufs + u64::from(d) * u64::from(Self::BUF)
    }

    /// Posts a one-descriptor chain holding `data` (device-readable) or
    /// `len` writable bytes; None when the ring is full.
    fn post(&mut self, m: &GuestMemoryMmap, data: Option<&[u8]>, len: u32) -> Option<u16> {
        let d = self.free.pop()?;
        let addr = self.buf_addr(d);
        let (len, flags) = match data {
            Some(b) => {
                m.write_slice(b, GuestAddress(addr)).unwrap();
                (b.len() as u32, 0)
            }
            None => (len, VRING_DESC_F_WRITE as u16),
        };
        let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
        m.write_obj(raw, GuestAddress(self.desc + 16 * u64::from(d)))
            .unwrap();
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        m.write_obj(d, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        m.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        Some(d)
    }

    /// `virtqueue_kick`: notifies `kick` only if the device's avail_event
    /// says so (`vring_need_event`).
    fn kick(&mut self, m: &GuestMemoryMmap, kick: &EventFd) {
        std::sync::atomic::fence(Ordering::SeqCst);
        let event: u16 = m
            .read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size)))
            .unwrap();
        let (new, old) = (self.avail_idx, self.kicked_at);
        self.kicked_at = new;
        if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old) {
            kick.write(1).unwrap();
        }
    }

    /// Used entries not seen yet: (descriptor, length, its buffer's
    /// bytes); their descriptors go back to the free list, and
    /// `used_event` asks for an interrupt at the next one.
    fn take_used(&mut self, m: &GuestMemoryMmap) -> Vec<(u32, Vec<u8>)> {
        let idx: u16 = m.read_obj(GuestAddress(self.used + 2)).unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut out = Vec::new();
        while self.last_used != idx {
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = m.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(e + 4)).unwrap();
            let mut b = vec![0u8; len.min(Self::BUF) as usize];
            m.read_slice(&mut b, GuestAddress(self.buf_addr(id as u16)))
                .unwrap();
            self.free.push(id as u16);
            out.push((len, b));
            self.last_used = self.last_used.wrapping_add(1);
        }
        let used_event = self.avail + 4 + 2 * u64::from(self.size);
        m.write_obj(self.last_used, GuestAddress(used_event))
            .unwrap();
        out
    }
}

/// The guest side of one activation: three rings, their kick eventfds and
/// the interrupt the device raises.
struct LinuxGuest {
    rings: [LinuxRing; 3],
    kicks: Vec<EventFd>,
    irq: EventFd,
}

impl LinuxGuest {
    /// Rings at `base` (buffers above them), then DRIVER_OK: the device is
    /// activated with EVENT_IDX, and the RX ring is filled and kicked.
    fn activate(m: &GuestMemoryMmap, dev: &mut Vsock, base: u64) -> Self {
        const SIZE: u16 = 64;
        let rings = [0u64, 1, 2].map(|i| {
            LinuxRing::new(
                m,
                base + i * 0x4000,
                base + 0x1_0000 + i * u64::from(SIZE) * u64::from(LinuxRing::BUF),
                SIZE,
            )
        });
        let kicks: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        dev.activate(Activation {
            mem: m.clone(),
            queues: rings.iter().map(LinuxRing::queue).collect(),
            queue_events: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            features: crate::devices::virtio::COMMON_FEATURES,
            restored: false,
        })
        .unwrap();
        let mut g = LinuxGuest { rings, kicks, irq };
        g.fill_rx(m);
        g
    }

    fn fill_rx(&mut self, m: &GuestMemoryMmap) {
        let r = &mut self.rings[RX_QUEUE];
        while r.post(m, None, LinuxRing::BUF).is_some() {}
        r.kick(m, &self.kicks[RX_QUEUE]);
    }

    /// Sends one packet; false when the TX ring is full.
    fn send(&mut self, m: &GuestMemoryMmap, h: &Header, payload: &[u8]) -> bool {
        let mut b = h.to_bytes().to_vec();
        b.extend_from_slice(payload);
        let r = &mut self.rings[TX_QUEUE];
        r.take_used(m);
        if r.post(m, Some(&b), 0).is_none() {
            return false;
        }
        r.kick(m, &self.kicks[TX_QUEUE]);
        true
    }

    /// Waits for an interrupt (a stall fails the test), then returns the
    /// packets received and gives their buffers back to the device.
    fn recv(&mut self, m: &GuestMemoryMmap, what: &str) -> Vec<(Header, Vec<u8>)> {
        let mut p = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, 5000) };
        assert_eq!(n, 1, "stalled: no interrupt in 5 s ({what})");
        let _ = self.irq.read();
        let got: Vec<(Header, Vec<u8>)> = self.rings[RX_QUEUE]
            .take_used(m)
            .into_iter()
            .map(|(len, b)| {
                assert!(len as usize >= HDR_SIZE);
                let h = Header::from_bytes(b[..HDR_SIZE].try_into().unwrap());
                (h, b[HDR_SIZE..len as usize].to_vec())
            })
            .collect();
        self.rings[TX_QUEUE].take_used(m);
        self.fill_rx(m);
        got
    }
}

/// One guest socket's flow control as Linux keeps it.
struct GuestConn {
    port: u32,
    host_port: u32,
    buf_alloc: u32,
    /// Bytes the application consumed, and the fwd_cnt last told the host.
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    /// Bytes sent to the host, and its latest credit fields.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl GuestConn {
    fn hdr(&mut self, op: u16, len: u32) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..guest_hdr(op, self.port, self.host_port, len)
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// Issue: after the guest rebinds its vsock driver (device reset, then a
/// new activation with new rings), a new host-initiated stream delivered
/// its first packets and then stalled. A Linux-like driver (EVENT_IDX,
/// kicks and interrupts suppressed as Linux does) runs one connection,
/// resets the device in the middle of it, re-activates with fresh rings,
/// and a new connection must then move several credit windows each way.
#[test]
fn reset_and_reactivation_then_a_new_stream_moves_several_credit_windows() {
    const BUF_ALLOC: u32 = 64 * 1024;
    const TOTAL: usize = 4 * BUF_ALLOC as usize + 12_345;
    const AGENT: u32 = 1024;
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x200_0000)]).unwrap();
    let dir = TempDir::new("dev-rebind");
    let cfg = MuxerConfig {
        buf_alloc: BUF_ALLOC,
        ..MuxerConfig::default()
    };
    let mut dev = Vsock::with_config(GUEST, dir.path().join("v.sock"), cfg).unwrap();
    let data: Vec<u8> = (0..TOTAL as u32).map(|i| (i % 253) as u8).collect();

    let run = |dev_guest: &mut LinuxGuest, reset_midway: bool| -> UnixStream {
        // exec: the host connects and asks for the agent's port.
        let mut c = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        c.write_all(format!("CONNECT {AGENT}\n").as_bytes())
            .unwrap();
        let req = loop {
            let got = dev_guest.recv(&m, "REQUEST");
            if let Some((h, _)) = got.into_iter().find(|(h, _)| h.op == op::REQUEST) {
                break h;
            }
        };
        assert_eq!(req.dst_port, AGENT);
        let mut g = GuestConn {
            port: AGENT,
            host_port: req.src_port,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: req.buf_alloc,
            peer_fwd_cnt: req.fwd_cnt,
        };
        let h = g.hdr(op::RESPONSE, 0);
        assert!(dev_guest.send(&m, &h, &[]));
        let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
        c.read_exact(&mut line).unwrap();
        // Both directions at once: a host thread writes `data` and reads
        // back what the guest echoes.
        let total = if reset_midway { TOTAL / 3 } else { TOTAL };
        let mut wc = c.try_clone().unwrap();
        let out = data[..total].to_vec();
        let writer = std::thread::spawn(move || {
            let _ = wc.write_all(&out);
        });
        let mut rc = c.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut back = vec![0u8; total];
            rc.read_exact(&mut back).map(|_| back)
        });
        let (mut got, mut echoed) = (Vec::new(), 0usize);
        while got.len() < total || echoed < total {
            // Echo what we have, within the host's credit.
            while echoed < got.len() {
                let n = (got.len() - echoed).min(4096).min(g.credit() as usize);
                if n == 0 {
                    break;
                }
                let h = g.hdr(op::RW, n as u32);
                if !dev_guest.send(&m, &h, &got[echoed..echoed + n]) {
                    break;
                }
                g.tx_cnt = g.tx_cnt.wrapping_add(n as u32);
                echoed += n;
            }
            if got.len() >= total && echoed >= total {
                break;
            }
            let what = format!(
                "stream: {} of {total} received, {echoed} echoed, credit {}",
                got.len(),
                g.credit()
            );
            for (h, d) in dev_guest.recv(&m, &what) {
                assert_eq!(h.dst_port, AGENT);
                g.peer_buf_alloc = h.buf_alloc;
                g.peer_fwd_cnt = h.fwd_cnt;
                match h.op {
                    op::RW => {
                        got.extend_from_slice(&d);
                        assert!(got.len() - g.fwd_cnt as usize <= BUF_ALLOC as usize);
                    }
                    op::CREDIT_UPDATE => {}
                    op::CREDIT_REQUEST => {
                        let h = g.hdr(op::CREDIT_UPDATE, 0);
                        dev_guest.send(&m, &h, &[]);
                    }
                    o => panic!("unexpected op {o}"),
                }
            }
            // The application reads everything; Linux tells the host once
            // its free space has moved by half a window.
            g.fwd_cnt = got.len() as u32;
            if g.fwd_cnt - g.fwd_cnt_sent >= BUF_ALLOC / 2 {
                let h = g.hdr(op::CREDIT_UPDATE, 0);
                dev_guest.send(&m, &h, &[]);
            }
        }
        writer.join().unwrap();
        assert!(got == data[..total], "host -> guest bytes differ");
        let back = reader.join().unwrap().unwrap();
        assert!(back == data[..total], "guest -> host bytes differ");
        c
    };

    // First activation: a connection is still open when the driver goes.
    let mut guest = LinuxGuest::activate(&m, &mut dev, 0x10_0000);
    let open = run(&mut guest, true);
    dev.reset();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rest = Vec::new();
    assert!(
        (&open).read_to_end(&mut rest).is_ok(),
        "the reset closes the open stream's host side"
    );
    // The driver comes back with new rings; a new stream must not stall.
    let mut guest = LinuxGuest::activate(&m, &mut dev, 0x80_0000);
    run(&mut guest, false);
    // And once more, at the first rings' addresses.
    dev.reset();
    let mut guest = LinuxGuest::activate(&m, &mut dev, 0x10_0000);
    run(&mut guest, false);
}

/// After a restore the device puts one TRANSPORT_RESET event (id 0, 4
/// bytes) into the driver's first event buffer and asks for a kick on the
/// driver's next buffer (EVENT_IDX avail_event = the avail index now).
#[test]
fn a_transport_reset_event_fills_one_buffer_and_asks_for_the_refill_kick() {
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut evq = DriverQueue::new(&m, 0x1_0000, 0x10_0000);
    // No buffer yet: nothing sent.
    let mut q = evq.queue();
    virtio_queue::QueueT::set_event_idx(&mut q, true);
    assert_eq!(super::send_transport_reset(&mut q, &m), Ok(false));
    m.write_obj(0xffff_ffffu32, GuestAddress(0x10_0000))
        .unwrap();
    let a = evq.push(&[(8, true)]);
    let b = evq.push(&[(8, true)]);
    assert_eq!(super::send_transport_reset(&mut q, &m), Ok(true));
    assert_eq!(evq.take_used(), vec![(0, 4)]);
    assert_eq!(m.read_obj::<u32>(GuestAddress(a[0])).unwrap(), 0);
    // The second buffer stays the driver's.
    assert_ne!(a[0], b[0]);
    let avail_idx: u16 = m.read_obj(GuestAddress(evq.vq.avail_addr().0 + 2)).unwrap();
    let avail_event: u16 = m
        .read_obj(GuestAddress(
            evq.vq.used_addr().0 + 4 + 8 * u64::from(QSIZE),
        ))
        .unwrap();
    assert_eq!(avail_event, avail_idx);
}
