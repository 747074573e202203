//! The saved state of the virtio-mmio devices, in one shape for every
//! device (Firecracker's per-device `persist` idea): the transport's
//! registers, each queue's layout and ring positions, and what identifies
//! the device behind it. Saved and restored by [`super::mmio::MmioTransport`]
//! on the thread that snapshots or restores the VM, while every vCPU and
//! device worker is parked.
//!
//! Why the device part is small: the devices keep no guest-visible state
//! between two events except in guest memory (which the snapshot holds)
//! and in their queues. A device finishes every chain it takes within one
//! event (rx paths that find no data put the chain back), so while the
//! workers are parked "taken" equals "used": both ring positions are the
//! used ring's index, read from guest memory at save time. What a device
//! keeps on the host side is rebuilt at restore from the VM's
//! configuration: disk files, the share's directory, the vsock socket.
//! Host connections do not survive a restore: the vsock device sends the
//! guest a transport reset, so it drops its stale connections.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One queue's layout and ring positions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// The device's maximum size.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Driver (available) ring address.
    pub avail_ring: u64,
    /// Device (used) ring address.
    pub used_ring: u64,
    /// Next available entry the device takes.
    pub next_avail: u16,
    /// Next used entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
}

/// A virtio-mmio device: the transport's registers and queues, and the
/// identity of the device behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    /// The device's name (`virtio-blk vda`…), for messages.
    pub name: String,
    /// Virtio device type.
    pub device_type: u32,
    /// Features the device offered.
    pub device_features: u64,
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the device was running (DRIVER_OK accepted).
    pub active: bool,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// DEVICE_NEEDS_RESET was set.
    pub needs_reset: bool,
    /// The queues, in device order.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a saved device cannot be restored onto the device built now.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    #[error("{name}: the snapshot has a device of type {saved}, this VM has type {now}")]
    DeviceType { name: String, saved: u32, now: u32 },
    #[error("{name}: the device offers features {now:#x}, the snapshot's offered {saved:#x}")]
    Features { name: String, saved: u64, now: u64 },
    #[error("{name}: the snapshot has {saved} queues, the device has {now}")]
    QueueCount {
        name: String,
        saved: usize,
        now: usize,
    },
    #[error("{name}: queue {index} in the snapshot is invalid: {reason}")]
    Queue {
        name: String,
        index: usize,
        reason: String,
    },
    #[error("{name}: cannot read the used ring of queue {index} from guest memory")]
    UsedRing { name: String, index: usize },
    #[error("{name}: {why}")]
    Unsaveable { name: String, why: String },
}

/// The used ring of a ready queue is outside guest memory.
#[derive(Debug, PartialEq, Eq)]
pub struct UsedRingUnreadable;

impl QueueSnapshot {
    /// Saves `q` (the transport's copy, which holds the layout) with both
    /// ring positions at the used ring's index in `mem` (see the module
    /// docs). A queue that is not ready has no ring to read.
    pub fn save(q: &Queue, mem: &GuestMemoryMmap) -> Result<QueueSnapshot, UsedRingUnreadable> {
        let used_idx = if q.ready() {
            mem.read_obj::<u16>(GuestAddress(q.used_ring().wrapping_add(2)))
                .map(u16::from_le)
                .map_err(|_| UsedRingUnreadable)?
        } else {
            0
        };
        Ok(QueueSnapshot {
            max_size: q.max_size(),
            size: q.size(),
            ready: q.ready(),
            desc_table: q.desc_table(),
            avail_ring: q.avail_ring(),
            used_ring: q.used_ring(),
            next_avail: used_idx,
            next_used: used_idx,
            event_idx: q.event_idx_enabled(),
        })
    }

    /// The queue this snapshot describes; `max_size` must be the device's.
    pub fn to_queue(&self, max_size: u16) -> Result<Queue, String> {
        if self.max_size != max_size {
            return Err(format!(
                "maximum size {} (the device's is {max_size})",
                self.max_size
            ));
        }
        let mut q = Queue::new(max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|e| e.to_string())?;
        q.set_desc_table_address(
            Some(self.desc_table as u32),
            Some((self.desc_table >> 32) as u32),
        );
        q.set_avail_ring_address(
            Some(self.avail_ring as u32),
            Some((self.avail_ring >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(self.used_ring as u32),
            Some((self.used_ring >> 32) as u32),
        );
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        q.set_ready(self.ready);
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn a_queue_round_trips_with_positions_from_the_used_ring() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_event_idx(true);
        // The driver's used index as the device last wrote it.
        mem.write_obj::<u16>(7u16.to_le(), GuestAddress(q.used_ring() + 2))
            .unwrap();
        let s = QueueSnapshot::save(&q, &mem).unwrap();
        assert_eq!((s.next_avail, s.next_used), (7, 7));
        assert!(s.event_idx && s.ready);
        let back = s.to_queue(16).unwrap();
        assert_eq!(back.next_avail(), 7);
        assert_eq!(back.next_used(), 7);
        assert_eq!(back.desc_table(), q.desc_table());
        assert_eq!(back.avail_ring(), q.avail_ring());
        assert_eq!(back.used_ring(), q.used_ring());
        assert_eq!(back.size(), q.size());
        assert!(back.ready() && back.event_idx_enabled());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<QueueSnapshot>(&json).unwrap(), s);
        // Another device's maximum, or a size that is not a power of two.
        assert!(s.to_queue(32).is_err());
        let bad = QueueSnapshot { size: 3, ..s };
        assert!(bad.to_queue(16).is_err());
    }

    #[test]
    fn a_used_ring_outside_memory_cannot_be_saved() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_used_ring_address(Some(0xffff_0000), Some(0x10));
        q.set_ready(true);
        assert!(QueueSnapshot::save(&q, &mem).is_err());
    }
}
