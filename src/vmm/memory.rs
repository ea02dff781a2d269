//! Guest RAM: anonymous host memory mapped into the VM as KVM memory slots,
//! split around the MMIO hole, after checking the host can provide it.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::error::VmmError;
use crate::arch::x86_64::layout::ram_regions;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The smallest guest vmlab agrees to build: room for the boot structures,
/// a kernel and a small initrd.
pub const MIN_MEM_SIZE: u64 = 16 << 20;

/// Bytes of RAM (plus swap) the host could still give, from /proc/meminfo.
pub fn host_available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_available(&meminfo)
}

fn parse_available(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kib| kib * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// Refuses sizes the host cannot back, before anything is allocated.
pub fn check_size(mem_size: u64) -> Result<(), VmmError> {
    if mem_size < MIN_MEM_SIZE {
        return Err(VmmError::MemoryTooSmall(mem_size));
    }
    if let Some(available) = host_available_memory() {
        if mem_size > available {
            return Err(VmmError::MemoryTooLarge {
                requested_mib: mem_size >> 20,
                available_mib: available >> 20,
            });
        }
    }
    Ok(())
}

/// Allocates guest memory (untouched pages cost nothing until used).
pub fn create(mem_size: u64) -> Result<GuestMemoryMmap, VmmError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmmError::GuestMemory(e.to_string()))
}

/// Registers every region of `mem` as a KVM memory slot.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::GuestMemory(e.to_string()))?;
        let slot_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region stays mapped for as long as the VM exists: the
        // VM owns `mem` and drops the VmFd (and with it the slots) first.
        unsafe { vm.set_user_memory_region(slot_desc) }
            .map_err(VmmError::kvm("register guest memory"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_available_memory_and_swap() {
        let meminfo = "MemTotal: 24000000 kB\nMemFree: 1 kB\nMemAvailable: 2048 kB\nSwapTotal: 0 kB\nSwapFree: 1024 kB\n";
        assert_eq!(parse_available(meminfo), Some(3072 * 1024));
        assert_eq!(parse_available("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn refuses_impossible_sizes_with_clear_errors() {
        let err = check_size(1 << 50).unwrap_err().to_string();
        assert!(err.contains("more than this host can give"), "{err}");
        let err = check_size(1 << 20).unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
        check_size(64 << 20).unwrap();
    }

    #[test]
    fn creates_regions_around_the_hole() {
        let mem = create(64 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }
}
