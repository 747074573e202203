//! Virtio devices: the device-model seam ([`VirtioDevice`]), the interrupt
//! a device raises ([`Interrupt`]), the MMIO transport that exposes a device
//! on the bus ([`mmio::MmioTransport`]), the per-device worker thread
//! ([`worker`]) and the devices themselves.
//!
//! Every device has the same shape:
//! - `mod.rs`/`<name>.rs`: device state (features, config space) and the
//!   [`VirtioDevice`] impl, which runs on the vCPU thread that touched the
//!   transport;
//! - queue processing as a plain function over a `virtio_queue::Queue` and
//!   guest memory, built on the one queue contract ([`queue`]: notification
//!   suppression, the EVENT_IDX re-check, the interrupt decision, the
//!   broken state) and unit-tested with `virtio-queue`'s mock queue;
//! - event-loop glue: a [`worker::QueueHandler`] that the device's worker
//!   thread calls when the guest notifies a queue.
//!
//! Everything read from guest memory is hostile input: devices validate it
//! and answer bad requests with a virtio error status, or set
//! DEVICE_NEEDS_RESET, logging each cause at most once ([`Warned`]).

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod queue;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use queue::{drain_queue, Pass, QueueWorker};

/// Device type ids (virtio 1.2, section 5).
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Network card.
    pub const NET: u32 = 1;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device (vsock).
    pub const VSOCK: u32 = 19;
    /// File system device (virtio-fs).
    pub const FS: u32 = 26;
}

/// VIRTIO_F_VERSION_1: the modern interface (we offer nothing else).
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// Features every device offers (transport and ring features).
pub const COMMON_FEATURES: u64 = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration (or DEVICE_NEEDS_RESET) changed.
pub const INT_CONFIG: u32 = 2;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver gave the wrong number of queues.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// The worker thread or its event loop could not be created.
    #[error("cannot start the device worker: {0}")]
    Worker(WorkerError),
    /// The disk image could not be reopened (its previous worker died).
    #[error("cannot reopen the disk image: {0}")]
    Disk(block::BlockError),
    /// The network backend is gone (its previous worker died with it).
    #[error("the network backend is gone")]
    BackendGone,
    /// The vsock listener could not be set up again (its previous worker
    /// died with it).
    #[error(transparent)]
    Vsock(vsock::VsockError),
}

/// Why a device's worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating the thread, its eventfds or its event loop failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The device refused to start, for a fixed reason of its own.
    #[error("{0}")]
    Refused(&'static str),
}

impl From<&'static str> for WorkerError {
    fn from(reason: &'static str) -> Self {
        WorkerError::Refused(reason)
    }
}

impl From<std::io::Error> for ActivateError {
    /// The worker could not be spawned (`Worker::spawn`).
    fn from(e: std::io::Error) -> Self {
        ActivateError::Worker(WorkerError::Io(e))
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them (validated by the transport).
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the guest notifies it.
    pub queue_events: Vec<EventFd>,
    /// How the device interrupts the guest.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// Features the driver accepted.
    pub features: u64,
    /// The device is resumed from a snapshot rather than started by the
    /// driver: its queues hold the saved ring positions, and the guest
    /// believes it has been running all along.
    pub restored: bool,
}

/// A virtio device behind a transport. Methods run on the vCPU thread that
/// accessed the transport; queue work runs on the device's worker thread,
/// started by `activate` and stopped by `reset`.
pub trait VirtioDevice: Send {
    /// Virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (powers of two); the length is the
    /// number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver, including [`COMMON_FEATURES`].
    fn features(&self) -> u64;
    /// Reads device config space at `offset`; bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; ignored unless the device has writable
    /// fields.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops processing and forgets the queues (driver wrote status 0).
    /// Waits for in-flight requests, so nothing touches guest memory after.
    fn reset(&mut self);
    /// Why this device's state cannot be saved now, if it cannot (see
    /// [`persist`]): state that lives on the host and in the guest at once.
    fn snapshot_blocker(&self) -> Option<String> {
        None
    }
}

/// Copies `config[offset..]` into `data`, zero-filling past the end: the
/// common body of [`VirtioDevice::read_config`].
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus bits
/// the driver reads and acknowledges, the eventfd wired to the guest's
/// interrupt controller (an irqfd under KVM), and the DEVICE_NEEDS_RESET
/// flag a device sets when the driver broke the protocol. Shared by the
/// transport (vCPU threads) and the device's worker.
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq: EventFd,
}

impl Interrupt {
    /// An interrupt that signals `irq`.
    pub fn new(irq: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq,
        }
    }

    /// Tells the driver that used buffers are ready.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver that the device configuration changed (e.g. a
    /// network link went down).
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// Marks the device as needing a reset and tells the driver.
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    /// Whether the device asked for a reset since the last one.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// InterruptStatus as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restores the saved InterruptStatus and reset flag; a pending status
    /// raises the line again (a spurious interrupt is harmless, a lost one
    /// is not).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
        if status != 0 {
            self.raise(status);
        }
    }

    /// Device reset: no pending interrupt, no reset request.
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The eventfd the backend wires to the guest interrupt line.
    pub fn eventfd(&self) -> &EventFd {
        &self.irq
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            // Only an overflowing counter fails; the guest is interrupted anyway.
            tracing::debug!("virtio interrupt eventfd: {e}");
        }
    }
}

/// Remembers which causes of guest misbehaviour were already logged, so a
/// hostile guest cannot flood the log: each cause is logged once per device.
#[derive(Debug, Default)]
pub struct Warned(HashSet<&'static str>);

impl Warned {
    /// Logs `detail` under `cause` unless that cause was logged before.
    /// Returns whether it logged.
    pub fn warn(
        &mut self,
        device: &str,
        cause: &'static str,
        detail: impl std::fmt::Display,
    ) -> bool {
        if self.0.insert(cause) {
            if guest_warning_allowed(std::time::Instant::now()) {
                tracing::warn!("{device}: {cause}: {detail} (further occurrences not logged)");
            }
            true
        } else {
            false
        }
    }

    /// Whether `cause` has been logged.
    pub fn seen(&self, cause: &'static str) -> bool {
        self.0.contains(cause)
    }
}

/// Most guest-misbehaviour warnings logged per [`WARN_WINDOW`], process-wide.
/// [`Warned`] logs each cause once per activation; a guest that resets its
/// devices in a loop gets fresh `Warned` sets, and this bound keeps it from
/// filling the host's log anyway.
pub const WARN_BURST: u32 = 50;
/// The window of [`WARN_BURST`].
pub const WARN_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// The process-wide budget of [`WARN_BURST`] warnings per [`WARN_WINDOW`];
/// when a window with suppressed warnings ends, one line says how many.
fn guest_warning_allowed(now: std::time::Instant) -> bool {
    static STATE: std::sync::Mutex<Option<(std::time::Instant, u32, u64)>> =
        std::sync::Mutex::new(None);
    let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let (start, count, suppressed) = st.get_or_insert((now, 0, 0));
    if now.duration_since(*start) >= WARN_WINDOW {
        if *suppressed > 0 {
            tracing::warn!(
                "{suppressed} more guest-misbehaviour warnings were not logged in the last {} s",
                now.duration_since(*start).as_secs()
            );
        }
        (*start, *count, *suppressed) = (now, 0, 0);
    }
    if *count < WARN_BURST {
        *count += 1;
        true
    } else {
        *suppressed += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_warnings_are_bounded_per_window() {
        // Far in the future so other tests' warnings share no window.
        let t0 = std::time::Instant::now() + std::time::Duration::from_secs(1 << 20);
        let allowed = (0..WARN_BURST * 4)
            .filter(|_| guest_warning_allowed(t0))
            .count();
        assert!(allowed as u32 <= WARN_BURST, "{allowed}");
        assert!(!guest_warning_allowed(t0 + WARN_WINDOW / 2));
        assert!(guest_warning_allowed(t0 + WARN_WINDOW));
    }

    #[test]
    fn config_reads_zero_fill_past_end() {
        let cfg = [1u8, 2, 3, 4];
        let mut b = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut b);
        assert_eq!(b, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 4, &mut b);
        assert_eq!(b, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn interrupt_bits_and_reset_flag() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = Interrupt::new(irq.try_clone().unwrap());
        i.signal_used();
        assert_eq!(i.status(), INT_USED_RING);
        assert_eq!(irq.read().unwrap(), 1);
        i.set_needs_reset();
        assert!(i.needs_reset());
        assert_eq!(i.status(), INT_USED_RING | INT_CONFIG);
        i.ack(INT_USED_RING);
        assert_eq!(i.status(), INT_CONFIG);
        i.clear();
        assert_eq!(i.status(), 0);
        assert!(!i.needs_reset());
    }

    #[test]
    fn warned_logs_each_cause_once() {
        let mut w = Warned::default();
        assert!(w.warn("dev", "a", 1));
        assert!(!w.warn("dev", "a", 2));
        assert!(w.warn("dev", "b", 3));
        assert!(w.seen("a") && !w.seen("c"));
    }
}
