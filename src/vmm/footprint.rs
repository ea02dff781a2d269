//! vmlab's own memory cost: peak RSS of the process minus the guest memory
//! the guest actually touched (what Firecracker calls VMM overhead).

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::memory::GuestMemoryMmap;

/// Memory figures at one moment, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Peak resident set of the whole process (VmHWM).
    pub peak_rss: u64,
    /// Resident bytes of guest RAM mappings.
    pub guest_resident: u64,
}

impl Footprint {
    /// What vmlab itself costs beyond the guest's own pages.
    pub fn vmm_overhead(&self) -> u64 {
        self.peak_rss.saturating_sub(self.guest_resident)
    }

    pub fn summary(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        format!(
            "memory: peak RSS {:.1} MiB, guest touched {:.1} MiB, VMM overhead {:.1} MiB",
            mib(self.peak_rss),
            mib(self.guest_resident),
            mib(self.vmm_overhead())
        )
    }
}

/// Reads a "Key:   123 kB" field from /proc status-style text.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
}

/// Sums the Rss of the smaps entries that overlap one of `ranges` (host
/// address, length). A guest region is one mapping, but the pages backed
/// by a file (the kernel) are entries of their own inside it; and the
/// kernel merges adjacent anonymous mappings of the same kind into one
/// entry, which may start before the region (in tests, another memory).
fn resident_in(smaps: &str, ranges: &[(u64, u64)]) -> u64 {
    let mut total = 0;
    let mut counting = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                counting = ranges
                    .iter()
                    .any(|&(base, len)| start < base.saturating_add(len) && base < end);
                continue;
            }
        }
        if counting && line.starts_with("Rss:") {
            total += kib_field(line, "Rss:").unwrap_or(0);
        }
    }
    total
}

/// Measures the current footprint of this process and its guest `mem`.
pub fn measure(mem: &GuestMemoryMmap) -> Option<Footprint> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let ranges: Vec<(u64, u64)> = mem
        .iter()
        .filter_map(|r| {
            let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
            Some((host as u64, r.len()))
        })
        .collect();
    Some(Footprint {
        peak_rss: kib_field(&status, "VmHWM:")?,
        guest_resident: resident_in(&smaps, &ranges),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn parses_smaps_for_the_named_mappings_only() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                 200 kB
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
Rss:                  50 kB
";
        assert_eq!(
            resident_in(smaps, &[(0x7f00_0000_0000, 0x10_0000)]),
            200 * 1024
        );
        assert_eq!(
            resident_in(
                smaps,
                &[(0x7f00_0020_0000, 0x10_0000), (0x7f00_0000_0000, 0x10_0000)]
            ),
            250 * 1024
        );
        // One range covering both entries counts both; one overlapping
        // an entry's end counts that entry.
        assert_eq!(
            resident_in(smaps, &[(0x7f00_0000_0000, 0x30_0000)]),
            250 * 1024
        );
        assert_eq!(
            resident_in(smaps, &[(0x7f00_000f_f000, 0x1000)]),
            200 * 1024
        );
        assert_eq!(resident_in(smaps, &[(0x7f00_0010_0000, 0x10_0000)]), 0);
        assert_eq!(resident_in(smaps, &[]), 0);
    }

    /// Guest memory of `size` bytes whose smaps entries are its own: other
    /// tests' memories may be mapped right next to it, and the kernel
    /// merges adjacent anonymous mappings of one kind into one entry (whose
    /// pages come and go with the other test). A file page at either end
    /// cannot merge with anything anonymous. The edges stay untouched.
    fn isolated_memory(size: u64) -> (GuestMemoryMmap, std::fs::File) {
        use crate::vmm::memory::{map_file_pages, PAGE_SIZE};
        let mem = crate::vmm::memory::create(size).unwrap();
        let edge = tempfile::tempfile().unwrap();
        edge.set_len(PAGE_SIZE).unwrap();
        for addr in [0, size - PAGE_SIZE] {
            map_file_pages(&mem, GuestAddress(addr), &edge, 0, PAGE_SIZE).unwrap();
        }
        (mem, edge)
    }

    #[test]
    fn touched_guest_pages_count_as_guest_not_overhead() {
        let (mem, _edge) = isolated_memory(64 << 20);
        let before = measure(&mem).unwrap();
        mem.write_slice(&vec![1u8; 8 << 20], GuestAddress(1 << 20))
            .unwrap();
        let after = measure(&mem).unwrap();
        assert!(after.guest_resident >= before.guest_resident + (8 << 20) - 4096);
        assert!(after.peak_rss >= after.guest_resident);
        assert!(after.summary().contains("VMM overhead"));
    }

    #[test]
    fn file_backed_guest_pages_count_as_guest() {
        use std::io::Write;
        let (mem, _edge) = isolated_memory(64 << 20);
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![3u8; 8 << 20]).unwrap();
        crate::vmm::memory::map_file_pages(&mem, GuestAddress(16 << 20), &file, 0, 8 << 20)
            .unwrap();
        let before = measure(&mem).unwrap();
        // Reading maps the page-cache pages, writing copies them; anonymous
        // pages after the file's range count too.
        let mut buf = vec![0u8; 4 << 20];
        mem.read_slice(&mut buf, GuestAddress(16 << 20)).unwrap();
        mem.write_slice(&buf, GuestAddress(20 << 20)).unwrap();
        mem.write_slice(&buf, GuestAddress(32 << 20)).unwrap();
        let after = measure(&mem).unwrap();
        assert!(
            after.guest_resident >= before.guest_resident + (12 << 20) - 4096,
            "{before:?} {after:?}"
        );
        assert!(after.peak_rss >= after.guest_resident);
    }
}
