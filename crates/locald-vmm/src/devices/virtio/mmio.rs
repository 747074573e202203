//! The virtio-mmio transport (virtio 1.2, section 4.2; modern interface,
//! version 2 only): the register file a driver programs, the device status
//! state machine, feature negotiation, queue setup and validation, and
//! device activation and reset. A [`BusDevice`] on the MMIO bus; runs on
//! whichever vCPU thread touches it.
//!
//! Queue notifications normally never get here: the backend registers one
//! ioeventfd per queue on the QueueNotify register (see
//! [`MmioTransport::queue_events`]); a write that does reach the transport
//! is forwarded to the same eventfd. Interrupts go through the device's
//! [`Interrupt`] eventfd (an irqfd under KVM).
//!
//! Driver mistakes are contained: writes in the wrong state are ignored
//! and logged once, a FEATURES_OK with features we never offered is
//! refused (the bit stays clear), and a DRIVER_OK with invalid queues
//! leaves the device inactive with DEVICE_NEEDS_RESET set.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::persist::{PersistError, QueueSnapshot, TransportSnapshot};
use super::worker::Gate;
use super::{Activation, Interrupt, VirtioDevice, Warned, F_RING_EVENT_IDX, F_VERSION_1};
use crate::devices::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;

/// "virt" in little-endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Our vendor id ("LCLD").
pub const VENDOR_ID: u32 = 0x444c_434c;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    name: String,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    warned: Warned,
    /// The VM's worker gate: the device's worker joins it (snapshots).
    gate: Gate,
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        // Sizes come from our own device code, which uses powers of two.
        .map(|&n| Queue::new(n).expect("device declares a power-of-two queue size"))
        .collect()
}

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd wired to its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        name: impl Into<String>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let queues = fresh_queues(device.as_ref());
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            device,
            name: name.into(),
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            warned: Warned::default(),
            gate: Gate::default(),
        })
    }

    /// Puts the device's future workers behind `gate` (the VM's).
    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = gate;
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Saves the transport and its queues. Call only while the vCPUs and
    /// the device's worker are parked (see [`super::persist`]).
    pub fn save(&self) -> Result<TransportSnapshot, PersistError> {
        if let Some(why) = self.device.snapshot_blocker() {
            return Err(PersistError::Unsaveable {
                name: self.name.clone(),
                why,
            });
        }
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                QueueSnapshot::save(q, &self.mem).map_err(|_| PersistError::UsedRing {
                    name: self.name.clone(),
                    index,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TransportSnapshot {
            name: self.name.clone(),
            device_type: self.device.device_type(),
            device_features: self.device.features(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            active: self.active,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues,
        })
    }

    /// Puts this (fresh) transport in the saved state `s` and, if the
    /// device was running, starts it on the saved queues. The device must
    /// be the same kind with the same features as the saved one.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), PersistError> {
        let name = self.name.clone();
        let now = self.device.device_type();
        if s.device_type != now {
            return Err(PersistError::DeviceType {
                name,
                saved: s.device_type,
                now,
            });
        }
        let now = self.device.features();
        if s.device_features != now {
            return Err(PersistError::Features {
                name,
                saved: s.device_features,
                now,
            });
        }
        let sizes = self.device.queue_max_sizes().to_vec();
        if s.queues.len() != sizes.len() {
            return Err(PersistError::QueueCount {
                name,
                saved: s.queues.len(),
                now: sizes.len(),
            });
        }
        let queues = s
            .queues
            .iter()
            .zip(&sizes)
            .enumerate()
            .map(|(index, (q, &max))| {
                let queue = q.to_queue(max).map_err(|reason| PersistError::Queue {
                    name: name.clone(),
                    index,
                    reason,
                })?;
                if queue.ready() && !queue.is_valid(&self.mem) {
                    return Err(PersistError::Queue {
                        name: name.clone(),
                        index,
                        reason: "outside guest memory or misaligned".into(),
                    });
                }
                Ok(queue)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        // The saved interrupt state first: a device raises its own as soon
        // as its worker starts (a vsock transport reset), and that must not
        // be cleared.
        self.interrupt.restore(s.interrupt_status, s.needs_reset);
        if s.active {
            self.start_device(true);
            // Every queue once, as if the driver had just notified it: a
            // notification the old device had not served when it was
            // parked is gone, and with EVENT_IDX the driver will not send
            // it again for the buffers it already made available.
            for (q, evt) in self.queues.iter().zip(&self.queue_events) {
                if q.ready() {
                    let _ = evt.write(1);
                }
            }
        }
        Ok(())
    }

    /// One eventfd per queue; the backend registers each as an ioeventfd on
    /// QueueNotify (offset [`reg::QUEUE_NOTIFY`]) matching the queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Device status as the driver would read it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// Whether the device is running (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn warn(&mut self, cause: &'static str, detail: impl std::fmt::Display) {
        self.warned.warn(&self.name, cause, detail);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may be written only while the driver sets up the
    /// device: after FEATURES_OK, before DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.queues = fresh_queues(self.device.as_ref());
        self.interrupt.clear();
        // Drain notifications that arrived before the reset.
        for e in &self.queue_events {
            let _ = e.read();
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: length all ones means "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & (status::DRIVER | status::FEATURES_OK) != status::DRIVER {
                    let st = self.status;
                    self.warn(
                        "feature write outside negotiation",
                        format_args!("status {st:#x}"),
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v);
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                    sel => self.warn("bad DriverFeaturesSel", sel),
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM | reg::QUEUE_READY | reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH => {
                self.write_queue_reg(offset, v)
            }
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => self.warn("write to a read-only or unknown register", offset),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        if !self.queue_setup_allowed() {
            let st = self.status;
            self.warn(
                "queue register write outside setup",
                format_args!("status {st:#x}"),
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            self.warn("queue register write for a queue that does not exist", sel);
            return;
        };
        let lo = Some(v);
        match offset {
            reg::QUEUE_NUM => {
                let size = u16::try_from(v).ok();
                if size.is_none_or(|n| q.try_set_size(n).is_err()) {
                    self.warn("invalid queue size", v);
                }
            }
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, lo),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, lo),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(lo, None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, lo),
            _ => {}
        }
    }

    fn notify(&mut self, v: u32) {
        if !self.active {
            self.warn("queue notification before DRIVER_OK", v);
            return;
        }
        match self.queue_events.get(v as usize) {
            Some(e) => {
                let _ = e.write(1);
            }
            None => self.warn("notification for a queue that does not exist", v),
        }
    }

    fn write_status(&mut self, v: u32) {
        use status::*;
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // The driver may only add bits (virtio 1.2, 2.1.2), except by reset.
        if v & old != old {
            self.warn(
                "status bits cleared without reset",
                format_args!("{old:#x} -> {v:#x}"),
            );
            return;
        }
        let new_bits = v & !old;
        if new_bits & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        // Each step needs the previous ones.
        let needs = |bit: u32, prior: u32| new_bits & bit == 0 || v & prior == prior;
        if !(needs(DRIVER, ACKNOWLEDGE)
            && needs(FEATURES_OK, ACKNOWLEDGE | DRIVER)
            && needs(DRIVER_OK, ACKNOWLEDGE | DRIVER | FEATURES_OK))
        {
            self.warn(
                "status written out of order",
                format_args!("{old:#x} -> {v:#x}"),
            );
            return;
        }
        let mut accepted = v & (ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        if new_bits & FEATURES_OK != 0 {
            let offered = self.device.features();
            let f = self.driver_features;
            if f & !offered != 0 || f & F_VERSION_1 == 0 {
                self.warn(
                    "driver features refused",
                    format_args!("driver {f:#x}, offered {offered:#x}"),
                );
                accepted &= !FEATURES_OK;
                accepted &= !DRIVER_OK;
            }
        }
        self.status = accepted;
        if new_bits & DRIVER_OK != 0 && accepted & DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        self.start_device(false);
    }

    /// Hands the queues to the device (DRIVER_OK, or a restore).
    fn start_device(&mut self, restored: bool) {
        let event_idx = self.driver_features & F_RING_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                self.warned.warn(
                    &self.name,
                    "queue layout invalid at DRIVER_OK",
                    format_args!("queue {i}: outside guest memory or misaligned"),
                );
                self.interrupt.set_needs_reset();
                return;
            }
        }
        let queue_events = match self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{}: cannot clone queue eventfds: {e}", self.name);
                self.interrupt.set_needs_reset();
                return;
            }
        };
        // The device gets copies; ours keep answering register reads.
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(q) => q,
            Err(e) => {
                self.warned
                    .warn(&self.name, "queue state invalid at DRIVER_OK", e);
                self.interrupt.set_needs_reset();
                return;
            }
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
            restored,
        };
        let gate = self.gate.clone();
        match gate.scope(|| self.device.activate(activation)) {
            Ok(()) => self.active = true,
            Err(e) => {
                tracing::error!("{}: activation failed: {e}", self.name);
                self.interrupt.set_needs_reset();
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.warn("register read not 4 bytes wide and aligned", offset);
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.warn("register write not 4 bytes wide", offset);
            return;
        };
        if !offset.is_multiple_of(4) {
            self.warn("register write not aligned", offset);
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests;
