//! Puts everything the kernel needs at entry into guest memory: the kernel
//! and initrd, the command line, ACPI tables, the memory map, the boot
//! protocol's info block, the GDT and (for 64-bit entry) page tables.

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::acpi::{self, AcpiError, VirtioMmioSlot};
use super::e820::memory_map;
use super::gdt::EntryMode;
use super::kernel::{self, BootFile, KernelError, KernelFormat};
use super::layout::{
    RamRegion, CMDLINE_ADDR, CMDLINE_MAX_SIZE, GDT_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR,
    PVH_START_INFO_ADDR, ZERO_PAGE_ADDR,
};
use super::paging;
use super::pvh;
use super::regs::{gdt_bytes, BootEntry};
use super::zero_page::{build_zero_page, ZeroPageConfig};
use crate::vmm::memory::GuestMemoryMmap;

/// What the boot needs.
pub struct BootConfig<'a> {
    pub kernel: &'a BootFile,
    pub initrd: Option<&'a BootFile>,
    pub cmdline: &'a str,
    pub cpus: u8,
    pub ram: &'a [RamRegion],
    /// virtio-mmio devices to declare in the ACPI tables.
    pub virtio: &'a [VirtioMmioSlot],
}

/// The result: how to start the boot vCPU.
#[derive(Clone, Copy, Debug)]
pub struct BootSetup {
    pub format: KernelFormat,
    pub entry: BootEntry,
    /// CR3 for 64-bit entry (the identity tables), 0 for PVH.
    pub cr3: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Why the guest could not be set up for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("kernel command line is too long ({0}): Linux takes at most {CMDLINE_MAX_SIZE} bytes")]
    Cmdline(linux_loader::cmdline::Error),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("the guest's memory map has too many entries for the zero page")]
    MemoryMap,
    #[error("cannot write boot data to guest memory: {0}")]
    GuestMemory(String),
}

fn memory_error(e: impl std::fmt::Display) -> BootError {
    BootError::GuestMemory(e.to_string())
}

/// Builds the command line vmlab passes, with the user's part last.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    for part in parts.iter().filter(|p| !p.trim().is_empty()) {
        cmdline
            .insert_str(part.trim())
            .map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Loads and lays out everything for the boot vCPU's first instruction.
pub fn setup_boot(mem: &GuestMemoryMmap, config: &BootConfig) -> Result<BootSetup, BootError> {
    let loaded = kernel::load_kernel(mem, config.kernel)?;
    let low_ram_end = config.ram.first().map_or(0, |r| r.0 + r.1);
    let initrd = config
        .initrd
        .map(|initrd| kernel::load_initrd(mem, initrd, &loaded, low_ram_end))
        .transpose()?;

    let cmdline = build_cmdline(&[config.cmdline])?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(memory_error)?;

    let acpi = acpi::build_tables(config.cpus, config.virtio)?;
    for (addr, bytes) in &acpi.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(memory_error)?;
    }
    let map = memory_map(config.ram);

    mem.write_slice(&gdt_bytes(loaded.mode), GuestAddress(GDT_ADDR))
        .map_err(memory_error)?;
    let (boot_info, cr3) = match loaded.mode {
        EntryMode::Protected32 => {
            let info = pvh::build_start_info(CMDLINE_ADDR, initrd, &map, acpi.rsdp_addr);
            let mut params = BootParams::new::<hvm_start_info>(
                &info.start_info,
                GuestAddress(PVH_START_INFO_ADDR),
            );
            params.set_sections::<hvm_memmap_table_entry>(
                &info.memmap,
                GuestAddress(PVH_MEMMAP_ADDR),
            );
            if !info.modules.is_empty() {
                params.set_modules::<hvm_modlist_entry>(
                    &info.modules,
                    GuestAddress(PVH_MODLIST_ADDR),
                );
            }
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(memory_error)?;
            (PVH_START_INFO_ADDR, 0)
        }
        EntryMode::Long => {
            let zero_page = build_zero_page(&ZeroPageConfig {
                setup_header: loaded.setup_header,
                cmdline_addr: CMDLINE_ADDR,
                cmdline_len,
                initrd,
                memory_map: &map,
                rsdp_addr: acpi.rsdp_addr,
            })
            .ok_or(BootError::MemoryMap)?;
            let params = BootParams::new::<boot_params>(&zero_page, GuestAddress(ZERO_PAGE_ADDR));
            LinuxBootConfigurator::write_bootparams(&params, mem).map_err(memory_error)?;
            let cr3 = paging::write_identity_tables(mem).map_err(memory_error)?;
            (ZERO_PAGE_ADDR, cr3)
        }
    };

    Ok(BootSetup {
        format: loaded.format,
        entry: BootEntry {
            mode: loaded.mode,
            entry_point: loaded.entry_point,
            boot_info,
        },
        cr3,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_joins_parts_and_skips_empty_ones() {
        let c = build_cmdline(&["console=ttyS0", "", "  ", "quiet"]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 quiet"
        );
    }

    #[test]
    fn overlong_cmdline_is_a_clear_error() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        let err = build_cmdline(&["console=ttyS0", &long])
            .unwrap_err()
            .to_string();
        assert!(err.contains("too long"), "{err}");
    }
}
