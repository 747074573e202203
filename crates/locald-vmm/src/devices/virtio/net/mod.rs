//! virtio-net (virtio 1.2, section 5.1; device type 1): an Ethernet card
//! whose frames go to a host [`NetBackend`] — a TAP device ([`tap`]) or a
//! supervised `passt` process for unprivileged user-mode networking
//! ([`passt`]). See `docs/virtio-net.md`.
//!
//! Shape, as for every device:
//! - [`Net`] is the device state (MAC, link status, offered features) and
//!   the [`VirtioDevice`] impl; it runs on the vCPU thread that touched
//!   the transport.
//! - [`process_tx`] and [`process_rx`] are the queue work as plain
//!   functions over a `Queue`, guest memory and a backend (unit-tested
//!   with mock queues and a fake backend, fuzzed by `fuzz/virtio_net`).
//! - [`NetHandler`] is the glue the worker thread ("virtio-net") runs: on
//!   queue notifications and on the backend's descriptor (edge-triggered).
//!
//! Two queues (receive 0, transmit 1), no control queue, one queue pair.
//! Offered: MAC, STATUS, MTU (1500), MRG_RXBUF; guest → host checksum/TSO
//! offloads on a TAP (in its vnet header) and, opt-in (`offload=on`), on
//! passt (completed in software by [`segment`]); host → guest offloads only
//! when the backend carries vnet headers (TAP).

pub mod backend;
/// Network configuration (moved to [`crate::config::net`]).
pub use crate::config::net as config;
pub mod header;
pub mod passt;
pub mod segment;
pub mod tap;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::queue::{run_pass, Broken, Rearm, Ring};
use super::worker::{QueueHandler, Worker, HANDLER_TOKENS};
pub use super::Pass;
use super::{
    device_type, read_config_bytes, ActivateError, Activation, QueueWorker, VirtioDevice, Warned,
    COMMON_FEATURES,
};
pub use backend::{NetBackend, Offloads};
pub use config::{GuestNet, NetBackendConfig, NetConfig};
use header::{features as f, HDR_LEN, MAX_PACKET, NUM_BUFFERS_OFFSET, STATUS_LINK_UP};

const DEV: &str = "virtio-net";
/// Log prefixes of ring breaks, per queue.
const RX_DEV: &str = "virtio-net RX";
const TX_DEV: &str = "virtio-net TX";

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Token of the backend descriptor in the worker's event loop.
const BACKEND_TOKEN: u32 = HANDLER_TOKENS.start;

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP backend failed.
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    /// The passt backend failed.
    #[error(transparent)]
    Passt(#[from] passt::PasstError),
}

/// Device-side state of transmit processing that outlives one pass.
#[derive(Debug)]
pub struct TxState {
    /// Negotiated features.
    pub features: u64,
    /// Scratch for one packet (header + frame).
    pub buf: Vec<u8>,
    /// The backend is gone: packets are consumed and dropped.
    pub dead: bool,
}

impl TxState {
    /// State for a driver that accepted `features`.
    pub fn new(features: u64) -> Self {
        TxState {
            features,
            buf: vec![0; MAX_PACKET],
            dead: false,
        }
    }
}

/// Reads a transmit chain into `buf`; `Err(cause, detail)` if it is not a
/// well-formed device-readable chain within `limit` bytes.
fn read_tx_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
    limit: usize,
) -> Result<usize, (&'static str, String)> {
    let mut len = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err((
                "device-writable descriptor in a TX chain",
                format!("{:#x}", d.addr().0),
            ));
        }
        let n = d.len() as usize;
        let end = len + n;
        if end > limit {
            let err = header::TxError::TooLarge(end.saturating_sub(HDR_LEN), limit - HDR_LEN);
            return Err((err.cause(), err.to_string()));
        }
        mem.read_slice(&mut buf[len..end], d.addr())
            .map_err(|e| ("TX buffer outside guest memory", e.to_string()))?;
        len = end;
    }
    Ok(len)
}

/// Sends every packet the guest transmitted to `backend`, validating each
/// header; a bad packet is dropped (its chain is still returned). Stops
/// early, leaving notifications off, while the backend reports
/// `tx_blocked` (resumed when its descriptor becomes writable). A backend
/// that is gone sets `st.dead`.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut dyn NetBackend,
    st: &mut TxState,
    warned: &mut Warned,
) -> Pass {
    let limit = header::max_tx_packet(st.features);
    run_pass(TX_DEV, queue, mem, warned, |ring, warned| {
        loop {
            if !st.dead && backend.tx_blocked() {
                // Resumed when the backend's descriptor becomes writable.
                return Ok(Rearm::Leave);
            }
            let Some(chain) = ring.pop()? else {
                return Ok(Rearm::Enable { again: true });
            };
            let head = chain.head_index();
            match read_tx_chain(mem, chain, &mut st.buf, limit) {
                Ok(n) => match header::check_tx(&st.buf[..n], st.features) {
                    Ok(_) if st.dead => {}
                    Ok(_) => {
                        if let Err(e) = backend.send(&st.buf[..n]) {
                            if e.kind() == std::io::ErrorKind::WouldBlock {
                                // A full host queue drops, as a NIC would.
                            } else if is_gone(&e) {
                                warned.warn(DEV, "backend gone", &e);
                                st.dead = true;
                            } else {
                                warned.warn(DEV, "backend send failed", e);
                            }
                        }
                    }
                    Err(e) => {
                        warned.warn(DEV, e.cause(), &e);
                    }
                },
                Err((cause, detail)) => {
                    warned.warn(DEV, cause, detail);
                }
            }
            ring.complete(head, 0)?;
        }
    })
}

/// Whether a backend error means the backend is gone for good.
fn is_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::NotConnected
    ) || e.raw_os_error() == Some(libc::EBADFD)
}

/// Device-side state of receive processing that outlives one pass.
#[derive(Debug)]
pub struct RxState {
    /// Negotiated features (MRG_RXBUF decides how frames are placed).
    pub features: u64,
    /// One packet from the backend: header + frame.
    pub buf: Vec<u8>,
    /// Length of a packet in `buf` still waiting for guest buffers.
    pub pending: Option<usize>,
    /// The backend's descriptor may have more to read (edge-triggered).
    pub readable: bool,
    /// The backend is gone.
    pub dead: bool,
}

impl RxState {
    /// State for a driver that accepted `features`.
    pub fn new(features: u64) -> Self {
        RxState {
            features,
            buf: vec![0; MAX_PACKET],
            pending: None,
            readable: true,
            dead: false,
        }
    }
}

/// Where one received packet went.
enum Placed {
    /// Written into this many chains.
    Done,
    /// Not enough guest buffers: the ring was rewound, try later. The
    /// avail index the device had seen when it ran out.
    NoBuffers(u16),
    /// Dropped (bad or too small buffers); its chains were returned.
    Dropped,
}

/// The writable (address, length) regions of one receive chain.
type Regions = Vec<(GuestAddress, usize)>;

/// Writable regions of one chain; `Err` for a chain that is not purely
/// device-writable.
fn rx_regions(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Regions, &'static str> {
    let mut v = Vec::new();
    for d in chain {
        if !d.is_write_only() {
            return Err("device-readable descriptor in an RX chain");
        }
        v.push((d.addr(), d.len() as usize));
    }
    Ok(v)
}

/// Places `packet` (header + frame) into guest buffers: one chain, or
/// several with MRG_RXBUF (recording how many in `num_buffers`).
fn place_rx(
    ring: &mut Ring<'_, '_>,
    packet: &mut [u8],
    mrg: bool,
    warned: &mut Warned,
) -> Result<Placed, Broken> {
    let mem = ring.mem();
    let start = ring.queue().next_avail();
    // (head, writable regions, bytes placed in this chain)
    let mut chains: Vec<(u16, Regions, usize)> = Vec::new();
    let mut room = 0usize;
    let mut bad: Option<&'static str> = None;
    while room < packet.len() {
        if chains.len() >= usize::from(ring.queue().size()) {
            // The whole ring cannot hold it.
            bad = Some("RX buffers too small for a frame");
            break;
        }
        let Some(chain) = ring.pop()? else {
            let seen = ring.queue().next_avail();
            ring.queue().set_next_avail(start);
            return Ok(Placed::NoBuffers(seen));
        };
        let head = chain.head_index();
        let regions = match rx_regions(chain) {
            Ok(r) => r,
            Err(cause) => {
                bad = Some(cause);
                chains.push((head, Vec::new(), 0));
                break;
            }
        };
        let cap = regions.iter().fold(0usize, |a, r| a.saturating_add(r.1));
        let take = cap.min(packet.len() - room);
        chains.push((head, regions, take));
        room += take;
        if chains.len() == 1 && take < HDR_LEN.min(packet.len()) {
            bad = Some("RX buffer smaller than the virtio-net header");
            break;
        }
        if !mrg && room < packet.len() {
            bad = Some("RX buffers too small for a frame");
            break;
        }
    }
    if bad.is_none() {
        let n = chains.len() as u16;
        packet[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
        let mut off = 0usize;
        'write: for (_, regions, take) in &chains {
            let mut left = *take;
            for &(addr, len) in regions {
                if left == 0 {
                    break;
                }
                let n = len.min(left);
                if let Err(e) = mem.write_slice(&packet[off..off + n], addr) {
                    warned.warn(DEV, "RX buffer outside guest memory", e);
                    bad = Some("RX buffer outside guest memory");
                    break 'write;
                }
                off += n;
                left -= n;
            }
        }
    } else if let Some(cause) = bad {
        warned.warn(DEV, cause, format!("{}-byte packet", packet.len()));
    }
    for (head, _, take) in &chains {
        let len = if bad.is_some() { 0 } else { *take as u32 };
        ring.complete(*head, len)?;
    }
    Ok(if bad.is_some() {
        Placed::Dropped
    } else {
        Placed::Done
    })
}

/// Moves packets from the backend into guest receive buffers while both
/// last. A packet that finds no buffer waits in `st.pending` (the backend
/// is not read meanwhile: backpressure) and notifications are armed for
/// the next buffer. A backend that is gone sets `st.dead`.
pub fn process_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut dyn NetBackend,
    st: &mut RxState,
    warned: &mut Warned,
) -> Pass {
    let mrg = st.features & f::MRG_RXBUF != 0;
    run_pass(RX_DEV, queue, mem, warned, |ring, warned| loop {
        let n = match st.pending {
            Some(n) => n,
            None => {
                if st.dead || !st.readable {
                    return Ok(Rearm::Leave);
                }
                match backend.recv(&mut st.buf) {
                    Ok(Some(n)) if n < HDR_LEN => {
                        warned.warn(DEV, "backend gave a runt packet", n);
                        continue;
                    }
                    Ok(Some(n)) => n,
                    Ok(None) => {
                        st.readable = false;
                        return Ok(Rearm::Leave);
                    }
                    Err(e) => {
                        warned.warn(DEV, "backend gone", e);
                        st.dead = true;
                        return Ok(Rearm::Leave);
                    }
                }
            }
        };
        st.pending = Some(n);
        match place_rx(ring, &mut st.buf[..n], mrg, warned)? {
            Placed::Done | Placed::Dropped => st.pending = None,
            // Tried again if buffers arrived meanwhile.
            Placed::NoBuffers(seen) => return Ok(Rearm::EnablePast { seen }),
        }
    })
}

/// Worker-thread glue.
pub struct NetHandler {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    worker: QueueWorker,
    backend: Box<dyn NetBackend>,
    rx: RxState,
    tx: TxState,
    warned: Warned,
    link: Arc<AtomicU16>,
}

impl NetHandler {
    /// After a pass: the link goes down if the backend died in it.
    fn after(&mut self) {
        if self.rx.dead || self.tx.dead {
            self.link_down();
        }
    }

    fn link_down(&mut self) {
        self.rx.dead = true;
        self.tx.dead = true;
        if self.link.swap(0, Ordering::SeqCst) & STATUS_LINK_UP != 0 {
            tracing::error!(
                "{DEV}: backend {} is gone: link down (the VM keeps running)",
                self.backend.describe()
            );
            self.worker.interrupt().signal_config();
        }
    }

    fn rx(&mut self) {
        let (q, mem, be, st, w) = (
            &mut self.rxq,
            &self.mem,
            self.backend.as_mut(),
            &mut self.rx,
            &mut self.warned,
        );
        self.worker.serve(|| process_rx(q, mem, be, st, w));
        self.after();
    }

    fn tx(&mut self) {
        let (q, mem, be, st, w) = (
            &mut self.txq,
            &self.mem,
            self.backend.as_mut(),
            &mut self.tx,
            &mut self.warned,
        );
        self.worker.serve(|| process_tx(q, mem, be, st, w));
        self.after();
    }
}

impl QueueHandler for NetHandler {
    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.rx(),
            TX_QUEUE => self.tx(),
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.backend.fd();
        let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP;
        if let Err(e) = ops.add(Events::with_data_raw(fd, BACKEND_TOKEN, set)) {
            tracing::error!("{DEV}: cannot watch the backend (fd {fd}): {e:?}");
        }
        // Frames may already be waiting, and the guest may have queued
        // packets before the worker started.
        self.rx();
        self.tx();
    }

    fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() != BACKEND_TOKEN {
            return;
        }
        let set = events.event_set();
        if set
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR)
        {
            self.rx.readable = true;
            self.rx();
        }
        if set.contains(EventSet::OUT) && !self.tx.dead {
            if let Err(e) = self.backend.flush() {
                tracing::debug!("{DEV}: flush: {e}");
            }
            self.tx();
        }
        if self.rx.dead {
            let _ = ops.remove(Events::with_data_raw(self.backend.fd(), BACKEND_TOKEN, set));
        }
    }
}

/// The network device.
pub struct Net {
    config: [u8; 12],
    features: u64,
    link: Arc<AtomicU16>,
    backend: Option<Box<dyn NetBackend>>,
    worker: Option<Worker<NetHandler>>,
}

impl Net {
    /// A device with MAC `mac` in front of `backend`.
    pub fn new(mac: [u8; 6], backend: Box<dyn NetBackend>) -> Self {
        let off = backend.offloads();
        let mut features = COMMON_FEATURES | f::MAC | f::STATUS | f::MTU | f::MRG_RXBUF;
        if off.host {
            features |= f::HOST_OFFLOADS;
        }
        if off.guest {
            features |= f::GUEST_OFFLOADS;
        }
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&mac);
        // max_virtqueue_pairs (only meaningful with MQ) = 1, mtu.
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&header::MTU.to_le_bytes());
        Net {
            config,
            features,
            link: Arc::new(AtomicU16::new(STATUS_LINK_UP)),
            backend: Some(backend),
            worker: None,
        }
    }

    /// Opens the backend `cfg` names and builds the device.
    pub fn from_config(cfg: &NetConfig) -> Result<Self, NetError> {
        let backend: Box<dyn NetBackend> = match &cfg.backend {
            NetBackendConfig::Tap { name } => Box::new(tap::Tap::open(name.as_deref())?),
            NetBackendConfig::User {
                publish,
                offload,
                host_loopback,
            } => Box::new(passt::Passt::spawn(&passt::PasstOptions {
                publish: publish.clone(),
                offload: *offload,
                host_loopback: *host_loopback,
                ..Default::default()
            })?),
        };
        tracing::info!(
            "{DEV}: MAC {} on {}",
            config::format_mac(&cfg.mac),
            backend.describe()
        );
        Ok(Net::new(cfg.mac, backend))
    }

    /// Whether the link is up (false once the backend is gone).
    pub fn link_up(&self) -> bool {
        self.link.load(Ordering::SeqCst) & STATUS_LINK_UP != 0
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = self.config;
        cfg[6..8].copy_from_slice(&self.link.load(Ordering::SeqCst).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        if got != 2 || a.queue_events.len() != 2 {
            return Err(ActivateError::QueueCount { expected: 2, got });
        }
        let Some(mut backend) = self.backend.take() else {
            return Err(ActivateError::BackendGone);
        };
        if let Err(e) = backend.set_guest_features(a.features) {
            tracing::warn!("{DEV}: cannot set receive offloads: {e}");
        }
        let mut queues = a.queues.into_iter();
        let (Some(rxq), Some(txq)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        let mut handler = NetHandler {
            mem: a.mem,
            rxq,
            txq,
            worker: QueueWorker::new(a.interrupt),
            backend,
            rx: RxState::new(a.features),
            tx: TxState::new(a.features),
            warned: Warned::default(),
            link: self.link.clone(),
        };
        if !self.link_up() {
            handler.rx.dead = true;
            handler.tx.dead = true;
        }
        let worker = Worker::spawn(DEV, a.queue_events, handler)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Some(h) = w.stop() {
                // Keep the backend for the next activation.
                self.backend = Some(h.backend);
            }
        }
    }
}
