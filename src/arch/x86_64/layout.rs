//! Guest physical memory layout: where vmlab puts each boot structure.
//!
//! Everything vmlab writes before the kernel runs lives in the first MiB,
//! below the kernel (loaded at 1 MiB or 16 MiB), so no structure can overlap
//! the kernel or the initrd (placed as high as the kernel allows).

/// The first 8 GDT slots: null, unused, code, data, TSS (Linux's boot layout).
pub const GDT_ADDR: u64 = 0x500;
/// Start info for the PVH boot protocol (`hvm_start_info`).
pub const PVH_START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6100;
/// PVH memory map (`hvm_memmap_table_entry`s).
pub const PVH_MEMMAP_ADDR: u64 = 0x6200;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack for the boot vCPU; Linux switches away at once.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four page directories of 2 MiB
/// pages mapping the first 4 GiB.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line vmlab passes (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM below it is usable low memory.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first, where Linux's legacy scan also finds it).
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Start of "high" memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: RAM stops at 3 GiB and resumes at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one 4 KiB page each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Addresses KVM needs for its own use on Intel (TSS and identity map).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// I/O ports of vmlab's own platform devices.
///
/// The boot timer: the guest writes one byte here when its userspace has
/// started. 0xe9 is the Bochs/QEMU debug console port, so the same write is
/// visible to QEMU with `-device isa-debugcon,iobase=0xe9`.
pub const BOOT_TIMER_PORT: u16 = 0xe9;
/// pvpanic (ACPI QEMU0001): the guest writes 1 here when it panics.
pub const PVPANIC_PORT: u16 = 0x505;
/// The host's wall clock, read-only (`devices::legacy::HostClock`).
pub const HOST_CLOCK_PORT: u16 = 0x520;
/// The CMOS real-time clock's index and data ports.
pub const CMOS_RTC_PORT: u16 = 0x70;
/// The CMOS byte that holds the century (the FADT names it), as on PCs.
pub const CMOS_CENTURY: u8 = 0x32;
/// ACPI hardware-reduced sleep control (SLP_TYP/SLP_EN), sleep status and
/// reset registers, one byte each.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value the guest writes to the reset register to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// SLP_TYP of the S5 (soft-off) state, as declared by the DSDT's `_S5_`.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// The i8042 controller's data and command ports (reset through 0x64).
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// First UART.
pub const SERIAL_PORT: u16 = 0x3f8;

/// Number of IOAPIC pins in KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// IRQ of the first UART (ISA convention).
pub const SERIAL_IRQ: u32 = 4;
/// First GSI handed to virtio devices: legacy ISA IRQs stay below.
pub const FIRST_DEVICE_GSI: u32 = 5;
/// GSI of the ACPI Generic Event Device (power button).
pub const GED_GSI: u32 = 23;
/// The GED's second GSI: the VM Generation ID changed (`vmm::vmgenid`).
pub const VMGENID_GSI: u32 = 22;
/// The VM Generation ID page, the last of the reserved ACPI area (below
/// 1 MiB, where Linux's /dev/mem lets root read reserved pages): the
/// 16-byte generation ID first, vmlab's identity note at
/// `VMGENID_NOTE_OFFSET`.
pub const VMGENID_ADDR: u64 = ACPI_END - 0x1000;
pub const VMGENID_NOTE_OFFSET: u64 = 0x100;
/// The BIOS reset entry (real-mode f000:fff0), the last 16 bytes below
/// 1 MiB and of the generation ID's page, whose note stops before it
/// (`arch::x86_64::reset_vector`).
pub const RESET_VECTOR_ADDR: u64 = ACPI_END - 0x10;

/// A guest RAM region: start address and length.
pub type RamRegion = (u64, u64);

/// Splits `mem_size` bytes of RAM around the MMIO hole.
pub fn ram_regions(mem_size: u64) -> Vec<RamRegion> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (GDT_ADDR, 8 * 8),
            (PVH_START_INFO_ADDR, 0x100),
            (PVH_MODLIST_ADDR, 0x100),
            (PVH_MEMMAP_ADDR, ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR),
            (ZERO_PAGE_ADDR, 0x1000),
            (BOOT_STACK_POINTER - 0x100, 0x100),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, PD_COUNT * 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END - ACPI_START),
        ];
        areas.sort();
        for pair in areas.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
        assert!(areas.last().map(|a| a.0 + a.1).unwrap() <= HIMEM_START);
        assert!(CMDLINE_ADDR + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    }
}
