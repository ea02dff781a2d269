//! Address-range dispatch for port I/O and MMIO.
//!
//! A bus is built once before the vCPUs start and then only read, so lookups
//! need no lock; each device has its own lock because several vCPUs may
//! touch it at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` from the start of the
    /// range registered at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` from the range registered at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device could not be placed on a bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {base:#x} has zero length or wraps around")]
    BadRange { base: u64 },
}

struct Range {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&other, range)) = before {
            if other + range.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let end = base + range.len;
        // The whole access must fall inside the device's range.
        (addr.checked_add(size as u64)? <= end).then_some((base, range))
    }

    /// Dispatches a read. Unclaimed addresses read as all ones, like an
    /// empty ISA or PCI bus. Returns whether a device handled it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, range)) => {
                lock(&range.device).read(base, addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; unclaimed writes are dropped. Returns whether a
    /// device handled it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, range)) => {
                lock(&range.device).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler
/// panicked on one vCPU must not take the whole VM down with it.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access and answers reads with its offset.
    #[derive(Default)]
    struct Probe {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
            self.last = Some((base, offset, vec![]));
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let (a, b) = (probe(), probe());
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x600, 3).unwrap();
        let mut byte = [0u8];
        assert!(bus.read(0x3fd, &mut byte));
        assert_eq!(byte, [5]);
        assert!(bus.write(0x602, &[9]));
        assert_eq!(b.lock().unwrap().last, Some((0x600, 2, vec![9])));
        assert_eq!(a.lock().unwrap().last, Some((0x3f8, 5, vec![])));
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_writes_are_dropped() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xcf8, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0x3f7, &[1]));
        assert!(!bus.write(0x400, &[1]));
    }

    #[test]
    fn accesses_straddling_the_end_are_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x1000, 4).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0x1000, &mut data));
        assert!(!bus.read(0x1002, &mut data));
        assert!(!bus.read(u64::MAX - 1, &mut data));
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x10), (0x10f, 1), (0x0, 0x101)] {
            assert_eq!(
                bus.insert(probe(), base, len),
                Err(BusError::Overlap { base, len })
            );
        }
        bus.insert(probe(), 0x110, 1).unwrap();
        bus.insert(probe(), 0xff, 1).unwrap();
        assert_eq!(
            bus.insert(probe(), 0x200, 0),
            Err(BusError::BadRange { base: 0x200 })
        );
        assert_eq!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::BadRange { base: u64::MAX })
        );
    }
}
