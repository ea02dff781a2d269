//! The guest's physical memory map (e820), shared by both boot protocols:
//! the zero page carries it for the 64-bit protocol, the PVH memmap table
//! for PVH.

use super::layout::{RamRegion, ACPI_END, ACPI_START, EBDA_START, HIMEM_START};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemoryMapEntry {
    const fn new(addr: u64, size: u64, kind: u32) -> Self {
        MemoryMapEntry { addr, size, kind }
    }
}

/// Builds the map for the given RAM regions (the first starting at 0).
///
/// Low memory stops at the EBDA; the BIOS area holding the ACPI tables is
/// reserved so the guest never reuses it; the rest of RAM follows from 1 MiB.
pub fn memory_map(ram: &[RamRegion]) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry::new(0, EBDA_START, E820_RAM),
        MemoryMapEntry::new(EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        MemoryMapEntry::new(ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    for &(start, size) in ram {
        let end = start + size;
        let start = start.max(HIMEM_START);
        if end > start {
            map.push(MemoryMapEntry::new(start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ram_regions;

    #[test]
    fn map_for_512_mib() {
        let map = memory_map(&ram_regions(512 << 20));
        assert_eq!(
            map,
            vec![
                MemoryMapEntry::new(0, 0x9_fc00, E820_RAM),
                MemoryMapEntry::new(0x9_fc00, 0x400, E820_RESERVED),
                MemoryMapEntry::new(0xe_0000, 0x2_0000, E820_RESERVED),
                MemoryMapEntry::new(0x10_0000, (512 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn map_for_memory_above_4_gib() {
        let map = memory_map(&ram_regions(6 << 30));
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[3],
            MemoryMapEntry::new(0x10_0000, (3 << 30) - 0x10_0000, E820_RAM)
        );
        assert_eq!(map[4], MemoryMapEntry::new(4 << 30, 3 << 30, E820_RAM));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Everything except the 384 KiB between the EBDA and 1 MiB.
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
    }
}
