//! Unit tests of the virtio-mmio transport: the register file, the status
//! state machine and driver mistakes, with a fake device (no KVM).

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::{
    ActivateError, Activation, VirtioDevice, COMMON_FEATURES, INT_CONFIG, INT_USED_RING,
};

#[derive(Default)]
struct Log {
    activations: usize,
    resets: usize,
    features: u64,
    config_writes: Vec<(u64, Vec<u8>)>,
    queue_sizes: Vec<u16>,
}

struct Fake {
    log: Arc<Mutex<Log>>,
    fail_activate: bool,
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        COMMON_FEATURES | 1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&[0xa, 0xb, 0xc, 0xd], offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Worker("nope".into()));
        }
        let mut l = self.log.lock().unwrap();
        l.activations += 1;
        l.features = a.features;
        l.queue_sizes = a.queues.iter().map(|q| q.size()).collect();
        Ok(())
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().resets += 1;
    }
}

struct T {
    t: MmioTransport,
    log: Arc<Mutex<Log>>,
    irq: EventFd,
}

fn transport(fail_activate: bool) -> T {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let log = Arc::new(Mutex::new(Log::default()));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = Fake {
        log: log.clone(),
        fail_activate,
    };
    let t = MmioTransport::new(Box::new(dev), "fake", mem, irq.try_clone().unwrap()).unwrap();
    T { t, log, irq }
}

impl T {
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn features(&mut self) -> u64 {
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(reg::DEVICE_FEATURES);
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r(reg::DEVICE_FEATURES);
        u64::from(lo) | u64::from(hi) << 32
    }
    fn negotiate(&mut self, features: u64) {
        self.w(reg::STATUS, status::ACKNOWLEDGE);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, features as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }
    /// Queue `q` of size `n` with rings at `base`.
    fn setup_queue(&mut self, q: u32, n: u32, base: u32) {
        self.w(reg::QUEUE_SEL, q);
        self.w(reg::QUEUE_NUM, n);
        self.w(reg::QUEUE_DESC_LOW, base);
        self.w(reg::QUEUE_DESC_HIGH, 0);
        self.w(reg::QUEUE_DRIVER_LOW, base + 0x1000);
        self.w(reg::QUEUE_DRIVER_HIGH, 0);
        self.w(reg::QUEUE_DEVICE_LOW, base + 0x2000);
        self.w(reg::QUEUE_DEVICE_HIGH, 0);
        self.w(reg::QUEUE_READY, 1);
    }
    fn driver_ok(&mut self) {
        self.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }
}

#[test]
fn identity_registers() {
    let mut t = transport(false);
    assert_eq!(t.r(reg::MAGIC), MAGIC);
    assert_eq!(t.r(reg::VERSION), 2);
    assert_eq!(t.r(reg::DEVICE_ID), 42);
    assert_eq!(t.r(reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(t.features(), COMMON_FEATURES | 1 << 3);
    t.w(reg::DEVICE_FEATURES_SEL, 7);
    assert_eq!(t.r(reg::DEVICE_FEATURES), 0);
    t.w(reg::QUEUE_SEL, 0);
    assert_eq!(t.r(reg::QUEUE_NUM_MAX), 16);
    t.w(reg::QUEUE_SEL, 1);
    assert_eq!(t.r(reg::QUEUE_NUM_MAX), 8);
    t.w(reg::QUEUE_SEL, 2);
    assert_eq!(t.r(reg::QUEUE_NUM_MAX), 0);
    assert_eq!(t.r(reg::SHM_LEN_LOW), u32::MAX);
}

#[test]
fn full_handshake_activates_with_negotiated_features() {
    let mut t = transport(false);
    let f = F_VERSION_1 | F_RING_EVENT_IDX;
    t.negotiate(f);
    assert_eq!(
        t.r(reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    t.setup_queue(0, 8, 0x1_0000);
    t.setup_queue(1, 4, 0x2_0000);
    t.w(reg::QUEUE_SEL, 0);
    assert_eq!(t.r(reg::QUEUE_READY), 1);
    t.driver_ok();
    assert!(t.t.is_active());
    let l = t.log.lock().unwrap();
    assert_eq!(l.activations, 1);
    assert_eq!(l.features, f);
    assert_eq!(l.queue_sizes, [8, 4]);
}

#[test]
fn features_never_offered_are_refused() {
    let mut t = transport(false);
    t.negotiate(F_VERSION_1 | 1 << 5);
    assert_eq!(t.r(reg::STATUS) & status::FEATURES_OK, 0);
    // Without VERSION_1 (legacy driver) too.
    let mut t = transport(false);
    t.negotiate(1 << 3);
    assert_eq!(t.r(reg::STATUS) & status::FEATURES_OK, 0);
    // DRIVER_OK without FEATURES_OK is out of order and ignored.
    t.driver_ok();
    assert!(!t.t.is_active());
    assert_eq!(t.log.lock().unwrap().activations, 0);
}

#[test]
fn status_out_of_order_or_clearing_bits_is_ignored() {
    let mut t = transport(false);
    t.w(reg::STATUS, status::DRIVER);
    assert_eq!(t.r(reg::STATUS), 0);
    t.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    t.w(reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(t.r(reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
    t.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_ne!(t.r(reg::STATUS) & status::FAILED, 0);
}

#[test]
fn queue_registers_only_during_setup() {
    let mut t = transport(false);
    // Before FEATURES_OK: ignored.
    t.w(reg::QUEUE_SEL, 0);
    t.w(reg::QUEUE_READY, 1);
    assert_eq!(t.r(reg::QUEUE_READY), 0);
    t.negotiate(F_VERSION_1);
    // Not a power of two: rejected, the queue keeps its size.
    t.w(reg::QUEUE_NUM, 3);
    t.w(reg::QUEUE_NUM, 0x1_0000);
    t.w(reg::QUEUE_NUM, 32); // above the maximum
    t.setup_queue(0, 16, 0x1_0000);
    t.driver_ok();
    assert_eq!(t.log.lock().unwrap().queue_sizes[0], 16);
    // After DRIVER_OK: ignored.
    t.w(reg::QUEUE_SEL, 0);
    t.w(reg::QUEUE_READY, 0);
    assert_eq!(t.r(reg::QUEUE_READY), 1);
    // Writes for a queue that does not exist are ignored.
    let mut t = transport(false);
    t.negotiate(F_VERSION_1);
    t.w(reg::QUEUE_SEL, 9);
    t.w(reg::QUEUE_READY, 1);
    assert_eq!(t.r(reg::QUEUE_READY), 0);
}

#[test]
fn queue_outside_guest_memory_needs_reset() {
    let mut t = transport(false);
    t.negotiate(F_VERSION_1);
    t.setup_queue(0, 16, 0x7fff_0000);
    t.driver_ok();
    assert!(!t.t.is_active());
    assert_ne!(t.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(t.r(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    assert_eq!(t.log.lock().unwrap().activations, 0);
    // A reset brings it back.
    t.w(reg::STATUS, 0);
    assert_eq!(t.r(reg::STATUS), 0);
    assert_eq!(t.r(reg::INTERRUPT_STATUS), 0);
    t.negotiate(F_VERSION_1);
    t.setup_queue(0, 16, 0x1_0000);
    t.driver_ok();
    assert!(t.t.is_active());
}

#[test]
fn failed_activation_sets_needs_reset() {
    let mut t = transport(true);
    t.negotiate(F_VERSION_1);
    t.setup_queue(0, 16, 0x1_0000);
    t.driver_ok();
    assert!(!t.t.is_active());
    assert_ne!(t.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn notify_forwards_only_when_active() {
    let mut t = transport(false);
    let q0 = t.t.queue_events()[0].try_clone().unwrap();
    t.w(reg::QUEUE_NOTIFY, 0);
    assert!(q0.read().is_err(), "no event before DRIVER_OK");
    t.negotiate(F_VERSION_1);
    t.setup_queue(0, 16, 0x1_0000);
    t.driver_ok();
    t.w(reg::QUEUE_NOTIFY, 0);
    assert_eq!(q0.read().unwrap(), 1);
    t.w(reg::QUEUE_NOTIFY, 5); // no such queue: ignored
}

#[test]
fn reset_stops_the_device_and_clears_state() {
    let mut t = transport(false);
    t.negotiate(F_VERSION_1);
    t.setup_queue(0, 16, 0x1_0000);
    t.driver_ok();
    t.t.interrupt().signal_used();
    assert_eq!(t.irq.read().unwrap(), 1);
    assert_eq!(t.r(reg::INTERRUPT_STATUS), INT_USED_RING);
    t.w(reg::INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(t.r(reg::INTERRUPT_STATUS), 0);
    t.w(reg::STATUS, 0);
    assert!(!t.t.is_active());
    assert_eq!(t.log.lock().unwrap().resets, 1);
    t.w(reg::QUEUE_SEL, 0);
    assert_eq!(t.r(reg::QUEUE_READY), 0);
    // Reset of an inactive device does not call the device.
    t.w(reg::STATUS, 0);
    assert_eq!(t.log.lock().unwrap().resets, 1);
}

#[test]
fn odd_accesses_are_contained() {
    let mut t = transport(false);
    let mut b = [0xffu8; 2];
    t.t.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.t.read(reg::MAGIC + 1, &mut b);
    assert_eq!(b, [0; 4]);
    t.t.write(reg::STATUS, &[1]); // narrow write: ignored
    assert_eq!(t.r(reg::STATUS), 0);
    t.t.write(reg::STATUS + 2, &[1, 0, 0, 0]); // unaligned: ignored
    assert_eq!(t.r(reg::STATUS), 0);
    t.w(reg::MAGIC, 5); // read-only register
    assert_eq!(t.r(reg::MAGIC), MAGIC);
    // Config space: any width, past the end reads zero, writes reach the device.
    let mut c = [0u8; 8];
    t.t.read(reg::CONFIG + 1, &mut c);
    assert_eq!(c, [0xb, 0xc, 0xd, 0, 0, 0, 0, 0]);
    let gen = t.r(reg::CONFIG_GENERATION);
    t.t.write(reg::CONFIG + 2, &[7]);
    assert_eq!(t.log.lock().unwrap().config_writes, [(2, vec![7])]);
    assert_ne!(t.r(reg::CONFIG_GENERATION), gen);
    let mut c = [0u8; 4];
    t.t.read(0xfff, &mut c[..1]);
    assert_eq!(c[0], 0);
}
