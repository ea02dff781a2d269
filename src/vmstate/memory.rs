//! Guest RAM in a state file: written sparsely, mapped back copy-on-write.
//!
//! Layout: the RAM regions one after the other from the file's memory
//! offset, each page at its own place; a page vmlab leaves out is a hole,
//! which reads as zeros. What is written: every page the guest can read as
//! something other than zeros. The kernel says which pages those may be
//! (`/proc/self/pagemap`): an anonymous page that was never touched is not
//! present and reads as zero. A page of a file mapping (the vmlinux mapped
//! at boot, or the state file itself after a resume, see
//! `vmm::memory::map_file_pages`) reads as the file where the guest has not
//! written, so it counts whether or not it is present, except where the
//! file is known to be sparse (our own state file: `SEEK_DATA` finds its
//! holes). Candidate pages full of zeros are left out too.
//!
//! Resume maps each region's part of the file `MAP_PRIVATE` over the new
//! VM's RAM: nothing is read until the guest touches a page, pages it only
//! reads stay in the host's page cache, and its writes never reach the
//! file. So the file must never be rewritten or truncated while a VM maps
//! it: vmlab only ever writes a new file and renames it into place.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::StateError;
use crate::vmm::memory::{map_file_pages, GuestMemoryMmap, PAGE_SIZE};

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE: u64 = 1 << 61;
/// Pages examined per pagemap read and per copy (4 MiB of guest RAM).
const BATCH_PAGES: u64 = 1024;

/// What a save wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Guest RAM in bytes.
    pub ram: u64,
    /// Bytes of it written to the file (the rest are holes).
    pub written: u64,
}

/// (major, minor, inode): which file a mapping maps.
type FileId = (u64, u64, u64);

/// A mapping of the process inside guest RAM, from /proc/self/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
    /// File offset of `start`, for file mappings.
    offset: u64,
    /// (major, minor, inode) of the mapped file; None when anonymous.
    file: Option<FileId>,
}

fn parse_maps(text: &str) -> Vec<Vma> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let _perms = fields.next()?;
            let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
            let (major, minor) = fields.next()?.split_once(':')?;
            let inode: u64 = fields.next()?.parse().ok()?;
            let file = (inode != 0).then_some((
                u64::from_str_radix(major, 16).ok()?,
                u64::from_str_radix(minor, 16).ok()?,
                inode,
            ));
            Some(Vma {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset,
                file,
            })
        })
        .collect()
}

fn file_identity(file: &File) -> std::io::Result<FileId> {
    let meta = file.metadata()?;
    let dev = meta.dev();
    Ok((
        u64::from(libc::major(dev)),
        u64::from(libc::minor(dev)),
        meta.ino(),
    ))
}

/// The byte ranges of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`).
fn data_extents(file: &File) -> std::io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = 0u64;
    while at < len {
        // SAFETY: lseek on a descriptor we own; results checked.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        extents.push((data as u64, hole as u64));
        at = hole as u64;
    }
    Ok(extents)
}

fn in_extents(extents: &[(u64, u64)], offset: u64) -> bool {
    let i = extents.partition_point(|&(_, end)| end <= offset);
    extents.get(i).is_some_and(|&(start, _)| start <= offset)
}

/// Decides which pages of guest RAM may hold something other than zeros.
struct PageOracle {
    vmas: Vec<Vma>,
    pagemap: File,
    /// The file RAM was resumed from, whose holes are known zeros.
    sparse: Option<(FileId, Vec<(u64, u64)>)>,
}

impl PageOracle {
    fn new(sparse_backing: Option<&File>) -> Result<PageOracle, StateError> {
        let io = |what| move |source| StateError::Io { what, source };
        let maps = std::fs::read_to_string("/proc/self/maps")
            .map_err(io("read this process's memory map"))?;
        let pagemap =
            File::open("/proc/self/pagemap").map_err(io("open this process's page map"))?;
        let sparse = match sparse_backing {
            Some(file) => Some((
                file_identity(file).map_err(io("inspect the state file"))?,
                data_extents(file).map_err(io("find the state file's data"))?,
            )),
            None => None,
        };
        Ok(PageOracle {
            vmas: parse_maps(&maps),
            pagemap,
            sparse,
        })
    }

    /// For each page of host range `host..host+pages*4K`, whether it must be
    /// read (it may not be zero).
    fn candidates(&self, host: u64, pages: u64) -> Result<Vec<bool>, StateError> {
        let mut raw = vec![0u8; pages as usize * 8];
        self.pagemap
            .read_exact_at(&mut raw, host / PAGE_SIZE * 8)
            .map_err(|source| StateError::Io {
                what: "read this process's page map",
                source,
            })?;
        let mut out = Vec::with_capacity(pages as usize);
        for (i, entry) in raw.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            let addr = host + i as u64 * PAGE_SIZE;
            let vma = self.vmas.iter().find(|v| v.start <= addr && addr < v.end);
            let touched = entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0;
            let candidate = match vma.and_then(|v| v.file.map(|f| (v, f))) {
                // Anonymous (or not in the map: treat as such).
                None => touched,
                // The guest's own copy of a file page.
                Some(_) if entry & PAGEMAP_PRESENT != 0 && entry & PAGEMAP_FILE == 0 => true,
                Some((vma, file)) => match &self.sparse {
                    Some((id, extents)) if *id == file => {
                        in_extents(extents, vma.offset + (addr - vma.start))
                    }
                    _ => true,
                },
            };
            out.push(candidate);
        }
        Ok(out)
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

/// Writes guest RAM into `file` from `base` on, sparsely, and sizes the
/// file to hold all of it. `resumed_from`: the file RAM is mapped from, if
/// the VM was resumed (its holes need no reading). The vCPUs must be
/// parked and the devices quiet.
pub fn save(
    mem: &GuestMemoryMmap,
    file: &File,
    base: u64,
    resumed_from: Option<&File>,
) -> Result<MemoryStats, StateError> {
    let oracle = PageOracle::new(resumed_from)?;
    let write_err = |source| StateError::Io {
        what: "write guest memory to the state file",
        source,
    };
    let mut stats = MemoryStats::default();
    let mut buf = vec![0u8; (BATCH_PAGES * PAGE_SIZE) as usize];
    let mut file_offset = base;
    for region in mem.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| StateError::Memory(e.to_string()))? as u64;
        let pages = region.len() / PAGE_SIZE;
        let mut page = 0;
        while page < pages {
            let batch = BATCH_PAGES.min(pages - page);
            let wanted = oracle.candidates(host + page * PAGE_SIZE, batch)?;
            let mut i = 0usize;
            while i < wanted.len() {
                if !wanted[i] {
                    i += 1;
                    continue;
                }
                let run_start = i;
                while i < wanted.len() && wanted[i] {
                    i += 1;
                }
                let addr = region.start_addr().0 + (page + run_start as u64) * PAGE_SIZE;
                let bytes = &mut buf[..(i - run_start) * PAGE_SIZE as usize];
                mem.read_slice(bytes, GuestAddress(addr))
                    .map_err(|e| StateError::Memory(e.to_string()))?;
                let at = file_offset + (page + run_start as u64) * PAGE_SIZE;
                stats.written += write_nonzero_pages(file, bytes, at).map_err(write_err)?;
            }
            page += batch;
        }
        stats.ram += region.len();
        file_offset += region.len();
    }
    file.set_len(file_offset).map_err(write_err)?;
    Ok(stats)
}

/// Writes the non-zero pages of `bytes` (page-aligned at file offset `at`)
/// in runs; returns how many bytes were written.
fn write_nonzero_pages(file: &File, bytes: &[u8], at: u64) -> std::io::Result<u64> {
    let page = PAGE_SIZE as usize;
    let mut written = 0;
    let mut i = 0;
    let pages = bytes.len() / page;
    while i < pages {
        if is_zero(&bytes[i * page..(i + 1) * page]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < pages && !is_zero(&bytes[i * page..(i + 1) * page]) {
            i += 1;
        }
        let run = &bytes[start * page..i * page];
        file.write_all_at(run, at + (start * page) as u64)?;
        written += run.len() as u64;
    }
    Ok(written)
}

/// Maps the guest RAM saved in `file` from `base` over `mem`, copy-on-write.
pub fn map(mem: &GuestMemoryMmap, file: &File, base: u64) -> Result<(), StateError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let len = file
        .metadata()
        .map_err(|source| StateError::Io {
            what: "inspect the state file",
            source,
        })?
        .len();
    if len < base + total {
        return Err(StateError::Damaged {
            what: format!(
                "it holds {} bytes of guest memory, the VM has {total}",
                len.saturating_sub(base)
            ),
        });
    }
    let mut offset = base;
    for region in mem.iter() {
        map_file_pages(mem, region.start_addr(), file, offset, region.len())
            .map_err(|e| StateError::Memory(e.to_string()))?;
        offset += region.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory::create;

    const MIB: u64 = 1 << 20;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn maps_lines_parse_into_file_and_anonymous_ranges() {
        let text = "7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \n\
                    7f0000200000-7f0000300000 rw-p 00001000 fd:01 1234 /boot/vmlinux\n";
        let vmas = parse_maps(text);
        assert_eq!(vmas.len(), 2);
        assert_eq!(vmas[0].file, None);
        assert_eq!(vmas[1].file, Some((0xfd, 1, 1234)));
        assert_eq!(vmas[1].offset, 0x1000);
        assert_eq!(vmas[1].start, 0x7f00_0020_0000);
    }

    #[test]
    fn extents_answer_membership() {
        let extents = [(0, 4096), (8192, 16384)];
        assert!(in_extents(&extents, 0));
        assert!(!in_extents(&extents, 4096));
        assert!(in_extents(&extents, 12288));
        assert!(!in_extents(&extents, 16384));
    }

    #[test]
    fn only_touched_nonzero_pages_are_written_and_they_come_back() {
        let mem = create(32 * MIB).unwrap();
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(b"far away", GuestAddress(20 * MIB + 5))
            .unwrap();
        // Touched, but zero: left out.
        mem.write_slice(&[0u8; 64], GuestAddress(9 * MIB)).unwrap();
        let file = tempfile::tempfile().unwrap();
        let stats = save(&mem, &file, 8192, None).unwrap();
        assert_eq!(stats.ram, 32 * MIB);
        assert_eq!(stats.written, 2 * PAGE_SIZE);
        assert_eq!(file.metadata().unwrap().len(), 8192 + 32 * MIB);
        assert!(file.metadata().unwrap().blocks() * 512 < MIB, "sparse");

        let back = create(32 * MIB).unwrap();
        map(&back, &file, 8192).unwrap();
        assert_eq!(read(&back, 0, 10), b"first page");
        assert_eq!(read(&back, 20 * MIB + 5, 8), b"far away");
        assert_eq!(read(&back, 9 * MIB, 64), vec![0u8; 64]);
        // The guest's writes are its own; the file keeps the saved bytes.
        back.write_slice(b"changed", GuestAddress(0)).unwrap();
        let again = create(32 * MIB).unwrap();
        map(&again, &file, 8192).unwrap();
        assert_eq!(read(&again, 0, 10), b"first page");
    }

    #[test]
    fn a_resumed_vm_saves_what_it_reads_from_its_state_file_and_what_it_wrote() {
        let mem = create(32 * MIB).unwrap();
        mem.write_slice(b"saved once", GuestAddress(MIB)).unwrap();
        let first = tempfile::tempfile().unwrap();
        save(&mem, &first, 4096, None).unwrap();

        let resumed = create(32 * MIB).unwrap();
        map(&resumed, &first, 4096).unwrap();
        resumed
            .write_slice(b"after resume", GuestAddress(3 * MIB))
            .unwrap();
        let second = tempfile::tempfile().unwrap();
        let stats = save(&resumed, &second, 4096, Some(&first)).unwrap();
        assert_eq!(stats.written, 2 * PAGE_SIZE, "no page of the holes");

        let back = create(32 * MIB).unwrap();
        map(&back, &second, 4096).unwrap();
        assert_eq!(read(&back, MIB, 10), b"saved once");
        assert_eq!(read(&back, 3 * MIB, 12), b"after resume");
    }

    #[test]
    fn file_pages_the_guest_never_touched_are_saved() {
        use std::io::Write;
        let mut kernel = tempfile::tempfile().unwrap();
        kernel.write_all(&[0x5a; 2 * PAGE_SIZE as usize]).unwrap();
        let mem = create(16 * MIB).unwrap();
        map_file_pages(&mem, GuestAddress(MIB), &kernel, 0, 2 * PAGE_SIZE).unwrap();
        let file = tempfile::tempfile().unwrap();
        let stats = save(&mem, &file, 4096, None).unwrap();
        assert_eq!(stats.written, 2 * PAGE_SIZE);
        let back = create(16 * MIB).unwrap();
        map(&back, &file, 4096).unwrap();
        assert_eq!(read(&back, MIB + PAGE_SIZE, 4), [0x5a; 4]);
    }

    #[test]
    fn a_file_too_short_for_the_memory_is_refused_not_mapped() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096 + MIB).unwrap();
        let mem = create(16 * MIB).unwrap();
        let err = map(&mem, &file, 4096).unwrap_err().to_string();
        assert!(err.contains("guest memory"), "{err}");
    }
}
