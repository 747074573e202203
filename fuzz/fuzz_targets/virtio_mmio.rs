//! Fuzzes the virtio-mmio transport's register interface: the input is a
//! sequence of guest register accesses (offset, width, value) against a
//! transport wrapping a thread-free device, over guest memory filled from
//! the input so queue addresses point at arbitrary bytes. The transport
//! must never panic, whatever the order or content of the accesses, and
//! every read must agree with a register model (virtio 1.2 §4.2.2, the
//! parts that do not depend on device state): Magic, Version 2, DeviceID,
//! VendorID; DeviceFeatures by the last DeviceFeaturesSel; QueueNumMax by
//! the last QueueSel; SHM length/base all ones (no regions); QueueReady 0
//! or 1; InterruptStatus only bits 0-1; ConfigGeneration counting config
//! writes; Status 0 and every QueueReady 0 right after a reset (Status 0);
//! config space as the device's bytes; register reads that are not 4 bytes
//! wide and aligned read 0, such writes change nothing the model tracks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::virtio::mmio::{reg, MmioTransport, MAGIC, VENDOR_ID};
use locald_vmm::devices::virtio::{ActivateError, Activation, VirtioDevice, COMMON_FEATURES};
use locald_vmm::devices::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const FEATURES: u64 = COMMON_FEATURES | 1 << 9;
const QUEUES: [u16; 2] = [256, 8];
const CONFIG: [u8; 60] = [1; 60];

/// What the model knows of the transport's state.
#[derive(Default)]
struct Model {
    device_features_sel: u32,
    queue_sel: u32,
    config_generation: u32,
    /// The last register write was a reset (Status = 0).
    just_reset: bool,
}

impl Model {
    /// The value a 4-byte aligned read of register `offset` must return,
    /// or `None` where it depends on state the model does not track.
    fn expect(&self, offset: u64) -> Option<u32> {
        Some(match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => 2,
            reg::DEVICE_ID => 2,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => FEATURES as u32,
                1 => (FEATURES >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => QUEUES
                .get(self.queue_sel as usize)
                .map_or(0, |&n| u32::from(n)),
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            reg::STATUS | reg::QUEUE_READY if self.just_reset => 0,
            _ => return None,
        })
    }

    /// Checks a read of `data.len()` bytes at `offset`.
    fn check_read(&self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            let mut want = vec![0u8; data.len()];
            locald_vmm::devices::virtio::read_config_bytes(
                &CONFIG,
                offset - reg::CONFIG,
                &mut want,
            );
            assert_eq!(data, &want[..], "config read at {offset:#x}");
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            assert!(
                data.iter().all(|&b| b == 0),
                "odd read at {offset:#x}: {data:?}"
            );
            return;
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        if let Some(want) = self.expect(offset) {
            assert_eq!(v, want, "register {offset:#x}");
        }
        match offset {
            reg::QUEUE_READY => assert!(v <= 1, "QueueReady {v}"),
            reg::INTERRUPT_STATUS => assert_eq!(v & !3, 0, "InterruptStatus {v:#x}"),
            _ => {}
        }
    }

    /// Tracks a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return; // ignored by the transport
        }
        let v = u32::from_le_bytes(data.try_into().unwrap());
        self.just_reset = false;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::STATUS if v == 0 => self.just_reset = true,
            _ => {}
        }
    }
}

/// A device that validates what activation hands it, without threads.
struct Probe {
    active: bool,
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 8]
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        locald_vmm::devices::virtio::read_config_bytes(&CONFIG, offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without reset");
        assert_eq!(a.queues.len(), a.queue_events.len());
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        assert!(self.active, "reset of an inactive device");
        self.active = false;
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let (fill, ops) = data.split_at(data.len().min(256));
    let _ = mem.write_slice(fill, GuestAddress(0));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(Probe { active: false }), "fuzz", mem, irq).unwrap();
    // Each op: [kind, offset_lo, offset_hi, width, v0, v1, v2, v3].
    let mut model = Model::default();
    for op in ops.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1fff);
        let width = match op[3] % 4 {
            0 => 1,
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let v = [op[4], op[5], op[6], op[7], op[4], op[5], op[6], op[7]];
        if op[0] & 1 == 0 {
            let mut buf = [0u8; 8];
            t.read(offset, &mut buf[..width]);
            model.check_read(offset, &buf[..width]);
        } else {
            t.write(offset, &v[..width]);
            model.write(offset, &v[..width]);
        }
    }
});
