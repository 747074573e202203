//! virtio-vsock (virtio 1.2, section 5.10; device type 19): stream sockets
//! between the guest and host programs, with the host side on Unix
//! sockets in Firecracker's "hybrid" layout (see `docs/vsock.md`):
//! - guest connects to host port P → we connect to `<uds_path>_P`;
//! - a host program connects to `<uds_path>` and writes `CONNECT P\n` →
//!   the guest's port P is asked to accept; on success the program reads
//!   `OK <host port>\n` and the socket carries the stream.
//!
//! Shape, as for every device:
//! - [`Vsock`] is the device state (guest CID, config space, the muxer
//!   while inactive) and the [`VirtioDevice`] impl; it runs on the vCPU
//!   thread that touched the transport.
//! - [`process_tx`] and [`process_rx`] are the queue work as plain
//!   functions over a `Queue`, guest memory and a [`Muxer`]
//!   (unit-tested with mock queues).
//! - [`VsockHandler`] is the glue the worker thread ("virtio-vsock") runs:
//!   on queue notifications and on the muxer's host events, and at a
//!   device reset, where it drops the host connections on that thread.
//! - [`packet`] parses and writes packets, [`connection`] is one stream's
//!   state machine and flow control, [`connect`] the CONNECT line,
//!   [`muxer`] the routing and host sockets.

/// The CONNECT-line handshake (shared with the VZ bridge: [`crate::hybrid`]).
pub use crate::hybrid as connect;
pub mod connection;
pub mod muxer;
pub mod packet;
mod sys;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::queue::{run_pass, Rearm};
use super::worker::{QueueHandler, Worker, HANDLER_TOKENS};
pub use super::Pass;
use super::{
    device_type, drain_queue, read_config_bytes, ActivateError, Activation, QueueWorker,
    VirtioDevice, Warned, COMMON_FEATURES,
};
pub use muxer::{Muxer, MuxerConfig};
use packet::{Desc, MAX_PKT_PAYLOAD};

const DEV: &str = "virtio-vsock";

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 and 0xffffffff are reserved; the upper 32 bits must be 0.
    #[error("guest CID {0} is reserved or out of range (3..=4294967294)")]
    InvalidCid(u64),
    /// Another process listens on the socket path.
    #[error("{}: a process is already listening on this socket", .0.display())]
    InUse(PathBuf),
    /// The path exists and is not a socket; we never delete it.
    #[error("{}: exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Binding the listening socket failed.
    #[error("cannot listen on {}: {source}", .path.display())]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Creating the muxer's epoll set or timer failed.
    #[error("vsock event loop setup: {0}")]
    Setup(std::io::Error),
}

fn descs(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> impl Iterator<Item = Desc> + '_ {
    chain.map(|d| Desc {
        addr: d.addr(),
        len: d.len(),
        write_only: d.is_write_only(),
    })
}

/// Takes every packet the guest transmitted and hands it to the muxer.
/// `payload` is scratch space (up to [`MAX_PKT_PAYLOAD`] bytes).
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
    warned: &mut Warned,
    payload: &mut Vec<u8>,
) -> Pass {
    drain_queue(DEV, queue, mem, warned, |chain, warned| {
        match packet::read_tx_packet(mem, descs(chain), payload) {
            Ok(hdr) => muxer.send_pkt(&hdr, payload),
            Err(e) => {
                warned.warn(DEV, e.cause(), &e);
                if let Some(h) = e.header() {
                    muxer.reject_pkt(h);
                }
            }
        }
        0
    })
}

/// Fills guest RX buffers with whatever the muxer has for the guest, while
/// both last. `scratch` must hold [`MAX_PKT_PAYLOAD`] bytes.
pub fn process_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
    warned: &mut Warned,
    scratch: &mut [u8],
) -> Pass {
    let mut used: Vec<(u16, u32)> = Vec::new();
    run_pass(DEV, queue, mem, warned, |ring, warned| {
        used.clear();
        {
            let mut iter = ring.iter()?;
            while muxer.has_pending_rx() {
                let Some(chain) = iter.next() else {
                    break;
                };
                let head = chain.head_index();
                let ds: Vec<Desc> = descs(chain).collect();
                let room = match packet::rx_payload_room(mem, &ds) {
                    Ok(r) => r.min(scratch.len()),
                    Err(e) => {
                        warned.warn(DEV, e.cause(), &e);
                        used.push((head, 0));
                        continue;
                    }
                };
                let Some((hdr, n)) = muxer.recv_pkt(&mut scratch[..room]) else {
                    if room == 0 {
                        // Room for a header only, and only data is
                        // pending: the buffer can never carry it. Return
                        // it empty (as a too-small one) rather than leave
                        // it at the head of the ring, where the
                        // enable-notification re-check would find it
                        // again and again: a guest could spin this thread.
                        warned.warn(DEV, "RX buffer has no room for pending data", head);
                        used.push((head, 0));
                        continue;
                    }
                    // Nothing after all: give the buffer back to the ring.
                    iter.go_to_previous_position();
                    break;
                };
                match packet::write_rx_packet(mem, &ds, &hdr, &scratch[..n]) {
                    Ok(len) => used.push((head, len)),
                    Err(e) => {
                        warned.warn(DEV, e.cause(), &e);
                        used.push((head, 0));
                    }
                }
            }
        }
        for &(head, len) in &used {
            ring.complete(head, len)?;
        }
        // Always leave notifications on: the guest must tell us when it
        // adds buffers, in case more packets come. Buffers it added
        // meanwhile are worth another round only if there is more to send.
        Ok(Rearm::Enable {
            again: muxer.has_pending_rx(),
        })
    })
}

/// Worker-thread glue: the queues, guest memory and the muxer.
pub struct VsockHandler {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    /// Event queue: used once after a restore, for the transport reset.
    evq: Queue,
    /// Where a restored device is with the guest's transport reset.
    reset: ResetState,
    muxer: Muxer,
    worker: QueueWorker,
    warned: Warned,
    payload: Vec<u8>,
    scratch: Vec<u8>,
}

/// The driver's avail index of `q` in guest memory.
fn avail_index(q: &Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    use virtio_queue::QueueT;
    use vm_memory::Bytes;
    mem.read_obj::<u16>(vm_memory::GuestAddress(q.avail_ring().wrapping_add(2)))
        .ok()
        .map(u16::from_le)
}

/// A restored device's transport reset (see [`send_transport_reset`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResetState {
    /// Nothing owed (a device the driver started).
    None,
    /// Owed: waiting for an event buffer.
    Pending,
    /// Sent when the driver's avail index was this: host clients wait
    /// until the driver refills the event queue (its index moves, and it
    /// kicks), which it does after dropping its stale connections.
    Sent(u16),
}

/// Longest time host clients wait for a restored guest's reset.
pub const RESET_ACK_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (virtio 1.2, 5.10.6.7).
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Puts one transport-reset event (a `u32` id) into the first buffer of
/// `evq`. `Ok(false)`: the driver has given no buffer yet.
pub fn send_transport_reset(evq: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, String> {
    use virtio_queue::{QueueOwnedT, QueueT};
    use vm_memory::Bytes;
    let Some(chain) = evq.iter(mem).map_err(|e| e.to_string())?.next() else {
        return Ok(false);
    };
    let head = chain.head_index();
    let mut written = 0u32;
    for d in chain.writable() {
        if d.len() >= 4 {
            mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                .map_err(|e| e.to_string())?;
            written = 4;
            break;
        }
    }
    evq.add_used(mem, head, written)
        .map_err(|e| e.to_string())?;
    // Ask for a kick on the driver's next buffer: it refills the event
    // queue (and kicks) right after handling the reset. With EVENT_IDX
    // that takes avail_event = the avail index now.
    let avail_idx = avail_index(evq, mem).ok_or("avail ring outside guest memory")?;
    let avail_event = evq.used_ring().wrapping_add(4 + 8 * u64::from(evq.size()));
    mem.write_obj(avail_idx.to_le(), vm_memory::GuestAddress(avail_event))
        .map_err(|e| e.to_string())?;
    Ok(true)
}

impl VsockHandler {
    /// Sends the transport reset a restored device owes, once the driver
    /// has an event buffer: the guest then drops the connections it had
    /// when the snapshot was taken (their host ends are gone). Goes
    /// through the queue contract: one completion to signal, or a break.
    fn send_pending_reset(&mut self) {
        if self.worker.is_broken() {
            return;
        }
        match self.reset {
            ResetState::None => return,
            // The driver's kick after the reset: it has dropped its
            // stale connections; new ones are safe now.
            ResetState::Sent(avail) => {
                // A notification without a refill (the restore's own
                // replayed one) is not the acknowledgement.
                if avail_index(&self.evq, &self.mem) != Some(avail) {
                    self.reset = ResetState::None;
                    self.muxer.release_host_clients();
                }
                return;
            }
            ResetState::Pending => {}
        }
        let pass = match send_transport_reset(&mut self.evq, &self.mem) {
            Ok(true) => {
                self.reset =
                    ResetState::Sent(avail_index(&self.evq, &self.mem).unwrap_or_default());
                Pass {
                    completed: 1,
                    notify: true,
                    broken: false,
                }
            }
            Ok(false) => Pass::default(),
            Err(e) => {
                self.warned.warn(DEV, "event queue unusable", e);
                self.reset = ResetState::None;
                self.muxer.release_host_clients();
                Pass {
                    broken: true,
                    ..Pass::default()
                }
            }
        };
        self.worker.finish(&pass);
    }

    fn run_rx(&mut self) -> Pass {
        process_rx(
            &mut self.rxq,
            &self.mem,
            &mut self.muxer,
            &mut self.warned,
            &mut self.scratch,
        )
    }

    fn run_tx(&mut self) -> Pass {
        process_tx(
            &mut self.txq,
            &self.mem,
            &mut self.muxer,
            &mut self.warned,
            &mut self.payload,
        )
    }

    /// One RX pass, unless the device is broken; interrupts per the
    /// contract.
    fn serve_rx(&mut self) {
        if self.worker.is_broken() {
            return;
        }
        let pass = self.run_rx();
        self.worker.finish(&pass);
    }
}

impl QueueHandler for VsockHandler {
    fn process_queue(&mut self, index: usize) {
        if self.worker.is_broken() {
            return;
        }
        match index {
            TX_QUEUE => {
                // TX first: it may produce answers for RX. One interrupt
                // for both.
                let t = self.run_tx();
                let r = if t.broken {
                    Pass::default()
                } else {
                    self.run_rx()
                };
                self.worker.finish(&t.merge(r));
            }
            RX_QUEUE => self.serve_rx(),
            EVENT_QUEUE => self.send_pending_reset(),
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.send_pending_reset();
        if let Err(e) = ops.add(Events::with_data(
            &self.muxer,
            HANDLER_TOKENS.start,
            EventSet::IN,
        )) {
            tracing::error!("{DEV}: cannot watch host sockets: {e:?}");
        }
    }

    fn process_event(&mut self, _events: Events, _ops: &mut EventOps) {
        self.muxer.process_events();
        self.serve_rx();
    }

    /// Device reset: drop every host connection (shutdown, epoll_ctl), on
    /// this worker thread, whose filter allows it. The listener stays.
    fn on_stop(&mut self) {
        self.muxer.reset();
    }
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    cfg: MuxerConfig,
    muxer: Option<Muxer>,
    worker: Option<Worker<VsockHandler>>,
}

impl Vsock {
    /// A vsock device for a guest with context id `guest_cid`, listening
    /// for host-initiated connections on the Unix socket `uds_path` (bound
    /// now: an error if another process listens there; a stale socket file
    /// is replaced; the file is removed when the device is dropped).
    /// Guest-initiated connections to port P go to `<uds_path>_P`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        Self::with_config(guest_cid, uds_path, MuxerConfig::default())
    }

    /// [`Vsock::new`] with non-default limits.
    pub fn with_config(
        guest_cid: u64,
        uds_path: PathBuf,
        cfg: MuxerConfig,
    ) -> Result<Self, VsockError> {
        if !(3..=0xffff_fffe).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let muxer = Muxer::new(guest_cid, uds_path.clone(), cfg)?;
        Ok(Vsock {
            cid: guest_cid,
            uds_path,
            cfg,
            muxer: Some(muxer),
            worker: None,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.cid
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        // Stream sockets only (no VIRTIO_VSOCK_F_SEQPACKET).
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let got = a.queues.len();
        if got != 3 || a.queue_events.len() != 3 {
            return Err(ActivateError::QueueCount { expected: 3, got });
        }
        let muxer = match self.muxer.take() {
            Some(m) => m,
            // The previous worker died with the muxer: listen again.
            None => Muxer::new(self.cid, self.uds_path.clone(), self.cfg)
                .map_err(ActivateError::Vsock)?,
        };
        let mut queues = a.queues.into_iter();
        let (Some(rxq), Some(txq), Some(evq)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount { expected: 3, got });
        };
        let mut muxer = muxer;
        if a.restored {
            muxer.hold_host_clients(RESET_ACK_LIMIT);
        }
        let handler = VsockHandler {
            mem: a.mem,
            rxq,
            txq,
            evq,
            reset: if a.restored {
                ResetState::Pending
            } else {
                ResetState::None
            },
            muxer,
            worker: QueueWorker::new(a.interrupt),
            warned: Warned::default(),
            payload: Vec::with_capacity(MAX_PKT_PAYLOAD),
            scratch: vec![0; MAX_PKT_PAYLOAD],
        };
        let worker = Worker::spawn(DEV, a.queue_events, handler)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            // The worker reset the muxer before handing it back
            // (`VsockHandler::on_stop`).
            if let Some(h) = w.stop() {
                self.muxer = Some(h.muxer);
            }
        }
    }
}
