//! An address bus (used for both port I/O and MMIO): maps address ranges to
//! devices and dispatches accesses. Built on the setup thread, then shared
//! read-only by all vCPU threads; each device sits behind its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes at offsets within its range.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` from the range's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` from the range's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Setting up the bus failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

/// Address → device map.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (Range, Arc<Mutex<dyn BusDevice>>)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Places `device` at `[base, base+len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        // The previous range must end before us; the next must start at or after our end.
        if let Some((_, (r, _))) = self.devices.range(..=base).next_back() {
            if r.base + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        if let Some((&next, _)) = self.devices.range(base..).next() {
            if next < end {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (Range { base, len }, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (_, (r, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - r.base;
        // The whole access must fall inside the device's range.
        if offset.checked_add(size as u64)? <= r.len {
            Some((offset, dev))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff, like an
    /// unclaimed ISA bus) when no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![0x41])]);
        // Outside any range: unclaimed, reads float high.
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff]);
        assert!(!bus.write(0x3f7, &[1]));
        // An access straddling the end of the range is not claimed.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(d(), 0x108, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0xf8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x100, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x0, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(d(), 0x110, 0x10).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
