//! Fuzzes the virtio-mmio transport's register interface: the input is a
//! sequence of guest register accesses (offset, width, value) against a
//! transport wrapping a thread-free device, over guest memory filled from
//! the input so queue addresses point at arbitrary bytes. The transport
//! must never panic, whatever the order or content of the accesses.

#![no_main]

use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::virtio::mmio::MmioTransport;
use locald_vmm::devices::virtio::{ActivateError, Activation, VirtioDevice, COMMON_FEATURES};
use locald_vmm::devices::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

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
        COMMON_FEATURES | 1 << 9
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        locald_vmm::devices::virtio::read_config_bytes(&[1; 60], offset, data);
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
        } else {
            t.write(offset, &v[..width]);
        }
    }
});
