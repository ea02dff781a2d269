//! ELF `vmlinux` loading without copying the kernel.
//!
//! The headers are read with linux-loader's ELF types; each PT_LOAD segment
//! then goes to its physical address by mapping the file's pages
//! copy-on-write into guest RAM (`memory::map_file_pages`): pages the guest
//! never touches are never read, the ones it only reads stay shared with
//! the host's page cache, and only written ones are copied, by the host
//! kernel, when the guest writes them. What cannot be mapped is copied, so
//! guest RAM ends up byte for byte what a copying loader leaves:
//! - the partial pages at either end of a segment's file bytes (a page
//!   holding anything else must not show the file's neighbouring bytes);
//! - a whole segment whose file offset and address differ modulo the page
//!   size, or whose pages the file system will not map.
//!
//! BSS (`p_memsz` past `p_filesz`) reads as zero whatever guest RAM held:
//! the bytes left in the last file page are written zero, whole pages are
//! replaced by fresh anonymous ones.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Nhdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG,
    PT_LOAD, PT_NOTE,
};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::vmm::memory::{self, GuestMemoryMmap, PAGE_SIZE};

/// ELF note type of the PVH 32-bit entry point (`XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const XEN_NOTE_NAME: &[u8; 4] = b"Xen\0";
/// Note names and descriptors are 4-byte aligned in Linux's notes.
const NOTE_ALIGN: u64 = 4;

/// Why an ELF kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    #[error("malformed ELF header: {0}")]
    Header(&'static str),
    #[error("entry point {0:#x} is below 1 MiB")]
    EntryBelowHimem(u64),
    #[error("cannot read the file: {0}")]
    Read(std::io::Error),
    #[error("segment {index} ends past the end of the file")]
    SegmentPastEof { index: usize },
    #[error("segment {index} has more file bytes than memory bytes")]
    SegmentFileSize { index: usize },
    #[error("segment {index} ({addr:#x}, {len:#x} bytes) is outside guest memory")]
    SegmentOutsideRam { index: usize, addr: u64, len: u64 },
    #[error("invalid PVH entry note")]
    InvalidPvhNote,
    #[error("cannot write guest memory: {0}")]
    GuestMemory(String),
}

/// What the loaded kernel says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElfKernel {
    /// `e_entry`: the 64-bit entry point.
    pub entry: u64,
    /// The PVH 32-bit entry point, when the kernel has the note.
    pub pvh_entry: Option<u64>,
    /// First guest address past every segment's memory image.
    pub end: u64,
    /// How many bytes were mapped rather than copied.
    pub mapped_bytes: u64,
}

/// A PT_LOAD segment as its header describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    index: usize,
    offset: u64,
    addr: u64,
    file_len: u64,
    mem_len: u64,
}

fn read_at<T: ByteValued + Default>(file: &File, offset: u64) -> Result<T, ElfError> {
    let mut value = T::default();
    file.read_exact_at(value.as_mut_slice(), offset)
        .map_err(ElfError::Read)?;
    Ok(value)
}

fn align_down(x: u64) -> u64 {
    x & !(PAGE_SIZE - 1)
}

fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

fn memory_error(e: impl std::fmt::Display) -> ElfError {
    ElfError::GuestMemory(e.to_string())
}

/// Loads the ELF kernel in `file` into `mem` (fresh or not). The entry
/// point must be at or above `himem` (where the boot structures end).
pub fn load(mem: &GuestMemoryMmap, file: &mut File, himem: u64) -> Result<ElfKernel, ElfError> {
    let ehdr: Elf64_Ehdr = read_at(file, 0)?;
    if &ehdr.e_ident[..4] != ELFMAG
        || ehdr.e_ident[EI_CLASS] != ELFCLASS64
        || ehdr.e_ident[EI_DATA] != ELFDATA2LSB
    {
        return Err(ElfError::NotElf64);
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() {
        return Err(ElfError::Header("program header size"));
    }
    if ehdr.e_phoff < std::mem::size_of::<Elf64_Ehdr>() as u64 {
        return Err(ElfError::Header("program header offset"));
    }
    if ehdr.e_entry < himem {
        return Err(ElfError::EntryBelowHimem(ehdr.e_entry));
    }
    let file_len = file.metadata().map_err(ElfError::Read)?.len();
    let mut kernel = ElfKernel {
        entry: ehdr.e_entry,
        pvh_entry: None,
        end: 0,
        mapped_bytes: 0,
    };
    let phdr_size = std::mem::size_of::<Elf64_Phdr>() as u64;
    for index in 0..usize::from(ehdr.e_phnum) {
        let at = ehdr
            .e_phoff
            .checked_add(index as u64 * phdr_size)
            .ok_or(ElfError::Header("program header offset"))?;
        let phdr: Elf64_Phdr = read_at(file, at)?;
        match phdr.p_type {
            PT_LOAD => {
                let segment = Segment {
                    index,
                    offset: phdr.p_offset,
                    addr: phdr.p_paddr,
                    file_len: phdr.p_filesz,
                    mem_len: phdr.p_memsz,
                };
                check_segment(mem, &segment, file_len)?;
                kernel.mapped_bytes += place_segment(mem, file, &segment)?;
                kernel.end = kernel.end.max(segment.addr + segment.mem_len);
            }
            PT_NOTE if kernel.pvh_entry.is_none() => {
                kernel.pvh_entry = pvh_entry(file, &phdr)?;
            }
            _ => {}
        }
    }
    Ok(kernel)
}

fn check_segment(mem: &GuestMemoryMmap, s: &Segment, file_len: u64) -> Result<(), ElfError> {
    if s.offset
        .checked_add(s.file_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(ElfError::SegmentPastEof { index: s.index });
    }
    if s.file_len > s.mem_len {
        return Err(ElfError::SegmentFileSize { index: s.index });
    }
    let fits = s.addr.checked_add(s.mem_len).is_some()
        && (s.mem_len == 0 || mem.check_range(GuestAddress(s.addr), s.mem_len as usize));
    if !fits {
        return Err(ElfError::SegmentOutsideRam {
            index: s.index,
            addr: s.addr,
            len: s.mem_len,
        });
    }
    Ok(())
}

/// Puts one checked segment in place; returns the bytes mapped.
fn place_segment(mem: &GuestMemoryMmap, file: &mut File, s: &Segment) -> Result<u64, ElfError> {
    let file_end = s.addr + s.file_len;
    let mut mapped = 0;
    if s.offset % PAGE_SIZE == s.addr % PAGE_SIZE {
        // Whole pages inside the file bytes are mapped, the partial pages
        // at either end copied.
        let first = align_up(s.addr, PAGE_SIZE)
            .unwrap_or(u64::MAX)
            .min(file_end);
        let last = align_down(file_end).max(first);
        copy(mem, file, s.offset, s.addr, first - s.addr)?;
        if last > first {
            let offset = s.offset + (first - s.addr);
            match memory::map_file_pages(mem, GuestAddress(first), file, offset, last - first) {
                Ok(()) => mapped = last - first,
                Err(e) => {
                    log::debug!("kernel segment {} copied, not mapped: {e}", s.index);
                    copy(mem, file, offset, first, last - first)?;
                }
            }
        }
        copy(mem, file, s.offset + (last - s.addr), last, file_end - last)?;
    } else {
        log::debug!(
            "kernel segment {} copied: file offset {:#x} and address {:#x} are not page-congruent",
            s.index,
            s.offset,
            s.addr
        );
        copy(mem, file, s.offset, s.addr, s.file_len)?;
    }
    zero(mem, file_end, s.addr + s.mem_len)?;
    Ok(mapped)
}

/// Copies `len` file bytes at `offset` to guest address `addr`.
fn copy(
    mem: &GuestMemoryMmap,
    file: &mut File,
    offset: u64,
    addr: u64,
    len: u64,
) -> Result<(), ElfError> {
    if len == 0 {
        return Ok(());
    }
    file.seek(SeekFrom::Start(offset)).map_err(ElfError::Read)?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len as usize)
        .map_err(memory_error)
}

/// Zeroes guest bytes `start..end`: partial pages written, whole pages
/// replaced by fresh anonymous memory (nothing touched).
fn zero(mem: &GuestMemoryMmap, start: u64, end: u64) -> Result<(), ElfError> {
    let write_zeros = |from: u64, to: u64| -> Result<(), ElfError> {
        if to > from {
            mem.write_slice(&vec![0u8; (to - from) as usize], GuestAddress(from))
                .map_err(memory_error)?;
        }
        Ok(())
    };
    let first = align_up(start, PAGE_SIZE).unwrap_or(u64::MAX).min(end);
    let last = align_down(end).max(first);
    write_zeros(start, first)?;
    if last > first {
        memory::zero_pages(mem, GuestAddress(first), last - first).map_err(memory_error)?;
    }
    write_zeros(last, end)
}

/// The PVH entry point from a PT_NOTE segment, if one of its notes is it.
fn pvh_entry(file: &File, phdr: &Elf64_Phdr) -> Result<Option<u64>, ElfError> {
    let header = std::mem::size_of::<Elf64_Nhdr>() as u64;
    let mut pos = 0u64;
    while pos
        .checked_add(header)
        .is_some_and(|end| end <= phdr.p_filesz)
    {
        let at = |rel: u64| {
            phdr.p_offset
                .checked_add(rel)
                .ok_or(ElfError::InvalidPvhNote)
        };
        let note: Elf64_Nhdr = read_at(file, at(pos)?)?;
        let name_at = pos + header;
        let desc_at = align_up(name_at + u64::from(note.n_namesz), NOTE_ALIGN)
            .ok_or(ElfError::InvalidPvhNote)?;
        let next = align_up(desc_at + u64::from(note.n_descsz), NOTE_ALIGN)
            .ok_or(ElfError::InvalidPvhNote)?;
        if note.n_type == XEN_ELFNOTE_PHYS32_ENTRY && note.n_namesz == 4 {
            let name: [u8; 4] = read_at(file, at(name_at)?)?;
            if &name == XEN_NOTE_NAME {
                if note.n_descsz < 4 || desc_at + 4 > phdr.p_filesz {
                    return Err(ElfError::InvalidPvhNote);
                }
                let entry: [u8; 4] = read_at(file, at(desc_at)?)?;
                return Ok(Some(u64::from(u32::from_le_bytes(entry))));
            }
        }
        pos = next;
    }
    Ok(None)
}

#[cfg(test)]
mod tests;
