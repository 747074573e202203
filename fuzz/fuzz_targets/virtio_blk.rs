//! Fuzzes virtio-blk request handling end to end without KVM: the input
//! becomes guest memory (descriptor table, avail ring, headers, data) and
//! the queue's size and ring addresses; the device's own queue processing
//! (`process_queue`, the function its worker thread runs) then parses and
//! executes every available chain against an in-memory disk. It must never
//! panic, touch memory outside the guest, or loop forever; a read-only disk
//! must never be changed (no write, discard or write-zeroes reaches its
//! backend, and its bytes are the same afterwards).

#![no_main]

use std::io;

use libfuzzer_sys::fuzz_target;
use locald_vmm::devices::virtio::block::disk::BlockBackend;
use locald_vmm::devices::virtio::block::request::DiskInfo;
use locald_vmm::devices::virtio::block::{process_queue, BlockEngine};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

const MEM: usize = 0x1_0000;
const DISK: usize = 64 * 512;

/// The disk's bytes (shared so they can be checked after the engine has
/// them) and whether the device was told the disk is read-only.
struct MemDisk(std::sync::Arc<std::sync::Mutex<Vec<u8>>>, bool);

impl MemDisk {
    fn mutating(&self, what: &str) {
        assert!(!self.1, "{what} reached the backend of a read-only disk");
    }
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        // The engine validates against the capacity before calling us.
        assert!(
            end <= self.0.lock().unwrap().len(),
            "request past the disk reached the backend"
        );
        Ok(start..end)
    }
}

impl BlockBackend for MemDisk {
    fn read_at(&mut self, mut offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        for b in bufs {
            let r = self.range(offset, b.len())?;
            b.copy_from(&self.0.lock().unwrap()[r]);
            offset += b.len() as u64;
        }
        Ok(())
    }
    fn write_at(&mut self, mut offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.mutating("a write");
        for b in bufs {
            let r = self.range(offset, b.len())?;
            b.copy_to(&mut self.0.lock().unwrap()[r]);
            offset += b.len() as u64;
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.mutating("a discard");
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        self.mutating("a write-zeroes");
        let r = self.range(offset, len as usize)?;
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ctl, rest) = data.split_at(8);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&rest[..rest.len().min(MEM)], GuestAddress(0));
    let Ok(mut q) = Queue::new(256) else { return };
    // Queue layout from the input, as a driver would program it.
    let size = 1u16 << (ctl[0] % 9);
    q.set_size(size);
    q.set_desc_table_address(Some(u32::from(ctl[1]) << 8), Some(0));
    q.set_avail_ring_address(Some(u32::from(ctl[2]) << 8), Some(0));
    q.set_used_ring_address(Some(u32::from(ctl[3]) << 8), Some(0));
    q.set_event_idx(ctl[4] & 1 != 0);
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let info = DiskInfo {
        capacity: (DISK / 512) as u64,
        read_only: ctl[5] & 1 != 0,
        discard: ctl[5] & 2 != 0,
        write_zeroes: ctl[5] & 4 != 0,
        write_zeroes_may_unmap: ctl[5] & 8 != 0,
        serial: *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0",
    };
    let read_only = info.read_only;
    // Not uniform, so a write of the same byte pattern would still show.
    let original: Vec<u8> = (0..DISK).map(|i| (i * 7 + i / 512) as u8).collect();
    let bytes = std::sync::Arc::new(std::sync::Mutex::new(original.clone()));
    let mut engine = BlockEngine::new(MemDisk(bytes.clone(), read_only), info, "fuzz");
    // Twice: the second pass sees whatever state the first left.
    let _ = process_queue(&mut engine, &mut q, &mem);
    let _ = process_queue(&mut engine, &mut q, &mem);
    if read_only {
        assert!(
            *bytes.lock().unwrap() == original,
            "a read-only disk changed"
        );
    }
});
