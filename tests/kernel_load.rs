//! The default guest kernel, loaded natively (no VM needed): vmlab's loader,
//! which maps the vmlinux's segments copy-on-write, leaves guest memory
//! byte for byte as linux-loader's copying loader does, and finds the same
//! entry points, for the real segment layout (partial pages, BSS, a
//! per-CPU segment at an unrelated address).

mod rig;

use std::fs::File;

use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmlab::arch::x86_64::elf;
use vmlab::arch::x86_64::layout::HIMEM_START;
use vmlab::vmm::memory::{self, GuestMemoryMmap};

const MEM: u64 = 256 << 20;

fn guest_bytes(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; MEM as usize];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

#[test]
fn default_vmlinux_maps_to_the_bytes_a_copy_gives() {
    let artifacts = rig::artifacts().unwrap_or_else(|e| panic!("{e}"));
    maps_like_a_copy(&artifacts.vmlinux);
}

/// The ELF guest/debian-kernel.sh extracts from Debian's bzImage: a real
/// vmlinux, entered through its PVH note.
#[test]
fn debians_extracted_vmlinux_maps_to_the_bytes_a_copy_gives() {
    let vmlinuz = rig::debian_guest().unwrap_or_else(|e| panic!("{e}"));
    let path = vmlinuz.with_file_name("vmlinux");
    let kernel = maps_like_a_copy(&path);
    assert!(
        kernel.pvh_entry.is_some(),
        "Debian's kernel has a PVH entry"
    );
}

fn maps_like_a_copy(path: &std::path::Path) -> elf::ElfKernel {
    let open = || File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    let mapped = memory::create(MEM).unwrap();
    let kernel = elf::load(&mapped, &mut open(), HIMEM_START).unwrap();
    let copied = memory::create(MEM).unwrap();
    let reference = Elf::load(&copied, None, &mut open(), Some(GuestAddress(HIMEM_START))).unwrap();

    // Most of the kernel is mapped, not copied.
    let file_len = open().metadata().unwrap().len();
    assert!(
        kernel.mapped_bytes > file_len / 2,
        "only {} of {file_len} bytes mapped",
        kernel.mapped_bytes
    );
    assert_eq!(kernel.entry, reference.kernel_load.0);
    assert_eq!(kernel.end, reference.kernel_end);
    let pvh = match reference.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
        _ => None,
    };
    assert_eq!(kernel.pvh_entry, pvh);
    let (a, b) = (guest_bytes(&mapped), guest_bytes(&copied));
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("guest memory differs first at {at:#x}");
    }
    kernel
}
