//! Identity page tables for the 64-bit entry: the first 4 GiB mapped with
//! 2 MiB pages, so the kernel, zero page, command line and initrd are all
//! reachable at their physical addresses when the kernel starts.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE_PAGE: u64 = 1 << 7;

/// Writes PML4, PDPT and page directories; returns the value for CR3.
pub fn write_identity_tables<M: GuestMemory>(mem: &M) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT_ADDR | PRESENT | WRITABLE, GuestAddress(PML4_ADDR))?;
    for dir in 0..PD_COUNT {
        let pd = PD_ADDR + dir * 0x1000;
        mem.write_obj(pd | PRESENT | WRITABLE, GuestAddress(PDPT_ADDR + dir * 8))?;
        let mut entries = [0u8; 512 * 8];
        for (i, chunk) in entries.chunks_exact_mut(8).enumerate() {
            let phys = ((dir << 30) | ((i as u64) << 21)) | PRESENT | WRITABLE | HUGE_PAGE;
            chunk.copy_from_slice(&phys.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))?;
    }
    Ok(PML4_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Walks the tables the way the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((va >> 39) & 0x1ff) * 8))
            .ok()?;
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
            .ok()?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
            .ok()?;
        if pde & PRESENT == 0 || pde & HUGE_PAGE == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(HUGE_PAGE | WRITABLE | PRESENT)) | (va & 0x1f_ffff))
    }

    #[test]
    fn maps_the_first_four_gib_identically() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        for va in [
            0,
            0x7000,
            0x100_0000,
            0x1234_5678,
            0xbfff_ffff,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
    }
}
