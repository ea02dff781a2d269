//! The PVH boot protocol's start info: the kernel enters in 32-bit mode with
//! RBX pointing at an `hvm_start_info` that names the command line, the
//! modules (our initrd), the memory map and the RSDP.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};

use super::e820::MemoryMapEntry;
use super::layout::{PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR};

pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Start info plus the tables it points to, ready to be written to guest
/// memory at `PVH_START_INFO_ADDR`, `PVH_MEMMAP_ADDR` and `PVH_MODLIST_ADDR`.
pub struct PvhBootInfo {
    pub start_info: hvm_start_info,
    pub memmap: Vec<hvm_memmap_table_entry>,
    pub modules: Vec<hvm_modlist_entry>,
}

pub fn build_start_info(
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    memory_map: &[MemoryMapEntry],
    rsdp_addr: u64,
) -> PvhBootInfo {
    let memmap: Vec<_> = memory_map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        // Version 1 carries the memory map.
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_ADDR
        },
        cmdline_paddr: cmdline_addr,
        rsdp_paddr: rsdp_addr,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    PvhBootInfo {
        start_info,
        memmap,
        modules,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    #[test]
    fn start_info_layout_matches_the_pvh_spec() {
        let map = [MemoryMapEntry {
            addr: 0,
            size: 0x9_fc00,
            kind: 1,
        }];
        let info = build_start_info(0x2_0000, Some((0x1000_0000, 0x1000)), &map, 0xe_0000);
        let bytes = info.start_info.as_slice();
        // xen/include/public/arch-x86/hvm/start_info.h: 56 bytes in version 1.
        assert_eq!(bytes.len(), 56);
        assert_eq!(&bytes[0..4], &0x336e_c578u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &1u32.to_le_bytes());
        assert_eq!(&bytes[12..16], &1u32.to_le_bytes(), "nr_modules");
        assert_eq!(&bytes[16..24], &PVH_MODLIST_ADDR.to_le_bytes());
        assert_eq!(&bytes[24..32], &0x2_0000u64.to_le_bytes(), "cmdline_paddr");
        assert_eq!(&bytes[32..40], &0xe_0000u64.to_le_bytes(), "rsdp_paddr");
        assert_eq!(&bytes[40..48], &PVH_MEMMAP_ADDR.to_le_bytes());
        assert_eq!(&bytes[48..52], &1u32.to_le_bytes(), "memmap_entries");
        assert_eq!(info.modules[0].paddr, 0x1000_0000);
        assert_eq!(info.modules[0].size, 0x1000);
        assert_eq!(info.memmap[0].size, 0x9_fc00);
    }

    #[test]
    fn no_initrd_means_no_module_list() {
        let info = build_start_info(0x2_0000, None, &[], 0);
        assert_eq!(info.start_info.nr_modules, 0);
        assert_eq!(info.start_info.modlist_paddr, 0);
        assert!(info.modules.is_empty());
    }
}
