//! Guest RAM: anonymous host memory mapped into the VM as KVM memory slots,
//! split around the MMIO hole, after checking the host can provide it.
//!
//! One host mapping per region, one KVM slot per region, for the VM's whole
//! life. Inside a region, page ranges may be backed by a file instead of
//! anonymous memory (`map_file_pages`: the ELF kernel's segments, mapped
//! copy-on-write so that pages the guest never touches cost nothing and the
//! ones it only reads stay shared with the host's page cache). Such a range
//! is a separate VMA of the same address range: the region's address, size
//! and KVM slot do not change, guest and VMM see the same bytes through it,
//! and the region's vm-memory flags still say anonymous. Whoever reads guest
//! RAM (footprint, a memory snapshot) reads all of it as one range and gets
//! the file's bytes where the guest has not written; whoever needs to know
//! which pages are file-backed finds them in /proc/self/maps. The file must
//! not be truncated while the VM runs (its pages would fault with SIGBUS):
//! a kernel is replaced by renaming a new file over it, as builds do.

use std::fs::File;
use std::os::fd::AsRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

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

/// The host's base page size on x86-64: the granule of `map_file_pages`.
pub const PAGE_SIZE: u64 = 4096;

/// Why part of guest RAM could not be backed by a file's pages.
#[derive(Debug, thiserror::Error)]
pub enum FileMapError {
    #[error("guest range {addr:#x}+{len:#x} is not page-aligned or not inside one RAM region")]
    Range { addr: u64, len: u64 },
    #[error("file offset {0:#x} is not page-aligned")]
    Offset(u64),
    #[error("mmap failed: {0}")]
    Mmap(std::io::Error),
}

/// The host address of guest range `addr..addr+len`, checked to be
/// page-aligned and inside one region (so one host mapping).
fn host_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Result<*mut u8, FileMapError> {
    let bad = FileMapError::Range { addr: addr.0, len };
    if addr.0 % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
        return Err(bad);
    }
    let region = mem
        .find_region(addr)
        .ok_or(FileMapError::Range { addr: addr.0, len })?;
    let offset = addr.0 - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad);
    }
    region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|_| bad)
}

/// Replaces guest pages `addr..addr+len` of the region's mapping with a new
/// mapping at the same address (so everything holding the region's address,
/// KVM included, goes on seeing guest RAM there).
fn remap(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
    flags: libc::c_int,
    fd: libc::c_int,
    offset: u64,
) -> Result<(), FileMapError> {
    let host = host_range(mem, addr, len)?;
    // SAFETY: `host..host+len` lies inside a mapping that `mem` owns (checked
    // by `host_range`) and that stays mapped until `mem`'s last clone drops;
    // MAP_FIXED replaces exactly those pages with readable, writable ones of
    // the same extent, in one step, so every pointer into guest RAM stays
    // valid. vm-memory and KVM reach guest RAM only through raw pointers
    // (volatile accesses), never Rust references, so no reference sees its
    // bytes change under it; the new contents are what the caller asks for.
    let mapped = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            fd,
            offset as libc::off_t,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(FileMapError::Mmap(std::io::Error::last_os_error()));
    }
    debug_assert_eq!(mapped.cast::<u8>(), host);
    Ok(())
}

/// Backs guest pages `addr..addr+len` with `file`'s bytes from `offset`,
/// copy-on-write: reads see the file (through the host's page cache,
/// shared, loaded on first touch), the first write to a page gives the
/// guest its own copy, and the file never changes. Everything must be
/// page-aligned, the range inside one region, and the file at least
/// `offset + len` bytes long (pages past its end would fault with SIGBUS).
pub fn map_file_pages(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    file: &File,
    offset: u64,
    len: u64,
) -> Result<(), FileMapError> {
    if offset % PAGE_SIZE != 0 || i64::try_from(offset).is_err() {
        return Err(FileMapError::Offset(offset));
    }
    remap(mem, addr, len, 0, file.as_raw_fd(), offset)
}

/// Gives guest pages `addr..addr+len` fresh zero-filled anonymous memory,
/// whatever backed them before (nothing is touched until the guest is).
pub fn zero_pages(mem: &GuestMemoryMmap, addr: GuestAddress, len: u64) -> Result<(), FileMapError> {
    remap(mem, addr, len, libc::MAP_ANONYMOUS, -1, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

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

    fn file_of(bytes: &[u8]) -> File {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn file_pages_read_as_the_file_and_writes_stay_in_the_guest() {
        let bytes: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let file = file_of(&bytes);
        let mem = create(MIN_MEM_SIZE).unwrap();
        mem.write_slice(&[7u8; 16], GuestAddress(0x1_0000 - 16))
            .unwrap();
        map_file_pages(
            &mem,
            GuestAddress(0x1_0000),
            &file,
            PAGE_SIZE,
            2 * PAGE_SIZE,
        )
        .unwrap();
        assert_eq!(
            read(&mem, 0x1_0000, 2 * PAGE_SIZE as usize),
            &bytes[PAGE_SIZE as usize..]
        );
        // The neighbours are untouched.
        assert_eq!(read(&mem, 0x1_0000 - 16, 16), [7u8; 16]);
        assert_eq!(read(&mem, 0x1_0000 + 2 * PAGE_SIZE, 16), [0u8; 16]);
        // A guest write is the guest's own: the file keeps its bytes.
        mem.write_slice(b"guest", GuestAddress(0x1_0000)).unwrap();
        assert_eq!(read(&mem, 0x1_0000, 5), b"guest");
        let mut back = vec![0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, PAGE_SIZE).unwrap();
        assert_eq!(back, &bytes[PAGE_SIZE as usize..PAGE_SIZE as usize + 5]);
        // And back to zero pages.
        zero_pages(&mem, GuestAddress(0x1_0000), 2 * PAGE_SIZE).unwrap();
        assert_eq!(
            read(&mem, 0x1_0000, 2 * PAGE_SIZE as usize),
            vec![0u8; 2 * PAGE_SIZE as usize]
        );
    }

    #[test]
    fn file_pages_are_refused_outside_one_region_or_unaligned() {
        let file = file_of(&[1u8; 2 * PAGE_SIZE as usize]);
        let mem = create(MIN_MEM_SIZE).unwrap();
        let map = |addr: u64, offset: u64, len: u64| {
            map_file_pages(&mem, GuestAddress(addr), &file, offset, len)
        };
        assert!(matches!(
            map(0x1001, 0, PAGE_SIZE),
            Err(FileMapError::Range { .. })
        ));
        assert!(matches!(
            map(0x1000, 0, 100),
            Err(FileMapError::Range { .. })
        ));
        assert!(matches!(map(0x1000, 0, 0), Err(FileMapError::Range { .. })));
        assert!(matches!(
            map(0x1000, 12, PAGE_SIZE),
            Err(FileMapError::Offset(12))
        ));
        assert!(matches!(
            map(MIN_MEM_SIZE - PAGE_SIZE, 0, 2 * PAGE_SIZE),
            Err(FileMapError::Range { .. })
        ));
        assert!(matches!(
            map(MIN_MEM_SIZE, 0, PAGE_SIZE),
            Err(FileMapError::Range { .. })
        ));
        assert!(matches!(
            map(!(PAGE_SIZE - 1), 0, PAGE_SIZE),
            Err(FileMapError::Range { .. })
        ));
    }
}
