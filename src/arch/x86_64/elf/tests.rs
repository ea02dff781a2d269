use std::io::Write;

use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{Elf, KernelLoader};

use super::*;

const MEM: u64 = 32 << 20;
const HIMEM: u64 = 0x10_0000;

/// A PT_LOAD segment or a PT_NOTE for `elf_file`.
#[derive(Clone, Copy)]
enum Header {
    Load {
        offset: u64,
        addr: u64,
        file_len: u64,
        mem_len: u64,
    },
    Note {
        offset: u64,
        len: u64,
    },
}

fn load_at(offset: u64, addr: u64, file_len: u64, mem_len: u64) -> Header {
    Header::Load {
        offset,
        addr,
        file_len,
        mem_len,
    }
}

/// An ELF file of `len` bytes: a byte pattern everywhere (so a page that
/// shows a segment's neighbours is told apart from zeros), the headers at
/// the start, `extra` written at its offsets.
fn elf_file(entry: u64, headers: &[Header], len: u64, extra: &[(u64, &[u8])]) -> File {
    let mut bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8 + 1).collect();
    let mut ehdr = Elf64_Ehdr::default();
    ehdr.e_ident[..4].copy_from_slice(ELFMAG);
    ehdr.e_ident[EI_CLASS] = ELFCLASS64;
    ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
    ehdr.e_ident[6] = 1;
    ehdr.e_type = 2;
    ehdr.e_machine = 62;
    ehdr.e_version = 1;
    ehdr.e_entry = entry;
    ehdr.e_phoff = 64;
    ehdr.e_ehsize = 64;
    ehdr.e_phentsize = 56;
    ehdr.e_phnum = headers.len() as u16;
    bytes[..64].copy_from_slice(ehdr.as_slice());
    for (i, h) in headers.iter().enumerate() {
        let phdr = match *h {
            Header::Load {
                offset,
                addr,
                file_len,
                mem_len,
            } => Elf64_Phdr {
                p_type: PT_LOAD,
                p_flags: 7,
                p_offset: offset,
                p_vaddr: addr,
                p_paddr: addr,
                p_filesz: file_len,
                p_memsz: mem_len,
                p_align: PAGE_SIZE,
            },
            Header::Note { offset, len } => Elf64_Phdr {
                p_type: PT_NOTE,
                p_offset: offset,
                p_filesz: len,
                p_memsz: len,
                p_align: 4,
                ..Default::default()
            },
        };
        let at = 64 + i * 56;
        bytes[at..at + 56].copy_from_slice(phdr.as_slice());
    }
    for (offset, data) in extra {
        let at = *offset as usize;
        bytes[at..at + data.len()].copy_from_slice(data);
    }
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&bytes).unwrap();
    file
}

fn fresh() -> GuestMemoryMmap {
    memory::create(MEM).unwrap()
}

fn all_of(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; MEM as usize];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

/// linux-loader's copying loader, the reference.
fn copied(file: &mut File) -> (GuestMemoryMmap, linux_loader::loader::KernelLoaderResult) {
    let mem = fresh();
    let result = Elf::load(&mem, None, file, Some(GuestAddress(HIMEM))).unwrap();
    (mem, result)
}

/// Segments of the shapes a vmlinux has: page-aligned, partial pages at
/// both ends, BSS past the last file page, two segments sharing a page.
fn kernel_like() -> (File, Vec<Header>) {
    let headers = vec![
        load_at(0x2000, 0x100_0000, 0x3000, 0x3000),
        load_at(0x5010, 0x110_0010, 0x1ff0 + 8, 0x1ff0 + 8),
        load_at(0x8000, 0x120_0000, 0x2123, 0x6000),
        // Starts inside the previous segment's BSS, mid-page: later
        // segments win, as with a copy.
        load_at(0xb200, 0x120_5200, 0x1e00, 0x1e00),
    ];
    (elf_file(0x100_0000, &headers, 0x10000, &[]), headers)
}

#[test]
fn segments_land_at_their_addresses_byte_for_byte_as_copied() {
    let (mut file, _) = kernel_like();
    let mem = fresh();
    let kernel = load(&mem, &mut file, HIMEM).unwrap();
    let (reference, result) = copied(&mut file);
    assert_eq!(all_of(&mem), all_of(&reference));
    assert_eq!(kernel.entry, result.kernel_load.0);
    assert_eq!(kernel.end, 0x120_7000);
    assert_eq!(kernel.end, result.kernel_end);
    // Whole pages were mapped: three of the first segment, one of the
    // second, two of the third, one of the fourth.
    assert_eq!(kernel.mapped_bytes, 7 * PAGE_SIZE);
    // Spot checks against the file itself.
    let mut byte = [0u8; 1];
    for (addr, offset) in [
        (0x100_0000u64, 0x2000u64),
        (0x110_0010, 0x5010),
        (0x120_2122, 0xa122),
    ] {
        mem.read_slice(&mut byte, GuestAddress(addr)).unwrap();
        assert_eq!(byte[0], (offset % 253) as u8 + 1, "{addr:#x}");
    }
}

/// A kernel vmlab read out of a VM's disk is held in a memfd
/// (`kernel::BootFile::in_memory`): its pages map like a file's, and guest
/// RAM keeps them once the descriptor is closed.
#[test]
fn a_kernel_in_a_memory_file_maps_like_one_on_disk_and_outlives_it() {
    let (mut file, _) = kernel_like();
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    std::io::Read::read_to_end(&mut file, &mut bytes).unwrap();
    let mut memfd = File::from(
        nix::sys::memfd::memfd_create("vmlinux", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
    );
    memfd.write_all(&bytes).unwrap();
    let mem = fresh();
    let kernel = load(&mem, &mut memfd, HIMEM).unwrap();
    assert_eq!(kernel.mapped_bytes, 7 * PAGE_SIZE);
    drop(memfd);
    let (reference, _) = copied(&mut file);
    assert_eq!(all_of(&mem), all_of(&reference));
}

#[test]
fn bss_reads_zero_even_over_dirty_memory() {
    let (mut file, _) = kernel_like();
    let mem = fresh();
    mem.write_slice(&vec![0xeeu8; 0x30_0000], GuestAddress(0x100_0000))
        .unwrap();
    load(&mem, &mut file, HIMEM).unwrap();
    let mut bss = vec![0xffu8; 0x5200 - 0x2123];
    mem.read_slice(&mut bss, GuestAddress(0x120_2123)).unwrap();
    assert!(bss.iter().all(|&b| b == 0), "BSS not zero");
    // The bytes before the segment's start in its first page are not the
    // segment's: they keep what was there, as with a copy.
    let mut before = [0u8; 16];
    mem.read_slice(&mut before, GuestAddress(0x110_0000))
        .unwrap();
    assert_eq!(before, [0xee; 16]);
    let (reference, _) = copied(&mut file);
    let mut expected = vec![0u8; 0x2123];
    reference
        .read_slice(&mut expected, GuestAddress(0x120_0000))
        .unwrap();
    let mut got = vec![0u8; 0x2123];
    mem.read_slice(&mut got, GuestAddress(0x120_0000)).unwrap();
    assert_eq!(got, expected);
}

#[test]
fn guest_writes_to_mapped_pages_leave_the_file_alone() {
    let (mut file, _) = kernel_like();
    let mem = fresh();
    load(&mem, &mut file, HIMEM).unwrap();
    mem.write_slice(&[0u8; 64], GuestAddress(0x100_1000))
        .unwrap();
    let mut in_file = [0u8; 64];
    file.read_exact_at(&mut in_file, 0x3000).unwrap();
    assert_ne!(in_file, [0u8; 64]);
    let (reference, _) = copied(&mut file);
    let mut page = [0u8; 64];
    reference
        .read_slice(&mut page, GuestAddress(0x100_1000))
        .unwrap();
    assert_eq!(page, in_file);
}

#[test]
fn segments_not_page_congruent_are_copied() {
    // The layout of the rig's one-instruction test kernel: code right
    // after the headers, at 1 MiB.
    let headers = [
        load_at(120, 0x10_0000, 2, 2),
        load_at(0x1010, 0x20_0020, 0x3000, 0x3100),
    ];
    let mut file = elf_file(0x10_0000, &headers, 0x5000, &[]);
    let mem = fresh();
    let kernel = load(&mem, &mut file, HIMEM).unwrap();
    assert_eq!(kernel.mapped_bytes, 0);
    let (reference, result) = copied(&mut file);
    assert_eq!(all_of(&mem), all_of(&reference));
    assert_eq!(kernel.end, 0x20_3120);
    assert_eq!(result.kernel_end, kernel.end);
}

fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&kind.to_le_bytes());
    n.extend_from_slice(name);
    n.resize(n.len().next_multiple_of(4), 0);
    n.extend_from_slice(desc);
    n.resize(n.len().next_multiple_of(4), 0);
    n
}

#[test]
fn pvh_entry_comes_from_the_xen_note() {
    let mut notes = note(b"GNU\0", 3, &[0xab; 20]);
    notes.extend(note(b"Linux\0", 18, &[1, 2, 3, 4]));
    notes.extend(note(b"Xen\0", 18, &0x0100_0600u64.to_le_bytes()));
    let headers = [
        load_at(0x1000, 0x100_0000, 0x1000, 0x1000),
        Header::Note {
            offset: 0x1800,
            len: notes.len() as u64,
        },
    ];
    let mut file = elf_file(0x100_0000, &headers, 0x3000, &[(0x1800, &notes)]);
    let kernel = load(&fresh(), &mut file, HIMEM).unwrap();
    assert_eq!(kernel.pvh_entry, Some(0x0100_0600));
    let (_, result) = copied(&mut file);
    assert_eq!(
        result.pvh_boot_cap,
        PvhBootCapability::PvhEntryPresent(GuestAddress(0x0100_0600))
    );

    // Without the Xen note, no PVH entry.
    let notes = note(b"GNU\0", 3, &[0xab; 20]);
    let headers = [Header::Note {
        offset: 0x1800,
        len: notes.len() as u64,
    }];
    let mut file = elf_file(0x100_0000, &headers, 0x3000, &[(0x1800, &notes)]);
    assert_eq!(load(&fresh(), &mut file, HIMEM).unwrap().pvh_entry, None);

    // A Xen entry note too short for an address is an error.
    let notes = note(b"Xen\0", 18, &[1, 2]);
    let headers = [Header::Note {
        offset: 0x1800,
        len: notes.len() as u64,
    }];
    let mut file = elf_file(0x100_0000, &headers, 0x3000, &[(0x1800, &notes)]);
    assert!(matches!(
        load(&fresh(), &mut file, HIMEM),
        Err(ElfError::InvalidPvhNote)
    ));
}

#[test]
fn bad_headers_and_segments_are_errors_not_mappings() {
    let try_load = |entry: u64, headers: &[Header]| {
        let mut file = elf_file(entry, headers, 0x4000, &[]);
        load(&fresh(), &mut file, HIMEM)
    };
    assert!(matches!(
        try_load(0x1000, &[]),
        Err(ElfError::EntryBelowHimem(0x1000))
    ));
    // Past the end of the file: mapping it would fault (SIGBUS) later.
    assert!(matches!(
        try_load(HIMEM, &[load_at(0x3000, HIMEM, 0x2000, 0x2000)]),
        Err(ElfError::SegmentPastEof { index: 0 })
    ));
    assert!(matches!(
        try_load(HIMEM, &[load_at(u64::MAX - 10, HIMEM, 0x2000, 0x2000)]),
        Err(ElfError::SegmentPastEof { index: 0 })
    ));
    assert!(matches!(
        try_load(HIMEM, &[load_at(0x1000, HIMEM, 0x2000, 0x1000)]),
        Err(ElfError::SegmentFileSize { index: 0 })
    ));
    for (addr, len) in [(MEM - 0x1000, 0x2000), (u64::MAX - 0xfff, 0x2000), (MEM, 1)] {
        assert!(
            matches!(
                try_load(HIMEM, &[load_at(0x1000, addr, len.min(0x1000), len)]),
                Err(ElfError::SegmentOutsideRam { index: 0, .. })
            ),
            "{addr:#x}"
        );
    }

    let mut file = elf_file(HIMEM, &[], 0x1000, &[]);
    file.write_all_at(&[1], EI_CLASS as u64).unwrap();
    assert!(matches!(
        load(&fresh(), &mut file, HIMEM),
        Err(ElfError::NotElf64)
    ));
    let mut file = elf_file(HIMEM, &[], 0x1000, &[]);
    file.set_len(40).unwrap();
    assert!(matches!(
        load(&fresh(), &mut file, HIMEM),
        Err(ElfError::Read(_))
    ));
}
