//! The Linux zero page (`boot_params`) for the 64-bit boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::e820::MemoryMapEntry;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader ID: vmlab has none assigned.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// What the zero page tells the kernel.
pub struct ZeroPageConfig<'a> {
    /// The bzImage's own setup header, or `None` for an ELF vmlinux.
    pub setup_header: Option<setup_header>,
    pub cmdline_addr: u64,
    /// Command line length without the terminating NUL.
    pub cmdline_len: usize,
    pub initrd: Option<(u64, u64)>,
    pub memory_map: &'a [MemoryMapEntry],
    pub rsdp_addr: u64,
}

/// Fills a `boot_params` as the x86 boot protocol describes.
///
/// Fails only if the memory map has more entries than the zero page holds.
pub fn build_zero_page(config: &ZeroPageConfig) -> Option<boot_params> {
    let mut params = boot_params {
        hdr: config.setup_header.unwrap_or(setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = config.cmdline_addr as u32;
    params.hdr.cmdline_size = config.cmdline_len as u32;
    if let Some((addr, size)) = config.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = config.rsdp_addr;
    if config.memory_map.len() > params.e820_table.len() {
        return None;
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(config.memory_map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = config.memory_map.len() as u8;
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::e820::memory_map;
    use crate::arch::x86_64::layout::ram_regions;
    use vm_memory::ByteValued;

    fn read_u32(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }
    fn read_u64(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// Checks fields at the offsets Documentation/arch/x86/boot.rst and
    /// zero-page.rst give, on the raw bytes the guest will read.
    #[test]
    fn fields_sit_at_the_documented_offsets() {
        let map = memory_map(&ram_regions(512 << 20));
        let params = build_zero_page(&ZeroPageConfig {
            setup_header: None,
            cmdline_addr: 0x2_0000,
            cmdline_len: 42,
            initrd: Some((0x1f00_0000, 0x12_3456)),
            memory_map: &map,
            rsdp_addr: 0xe_0000,
        })
        .unwrap();
        let bytes = params.as_slice();
        assert_eq!(bytes.len(), 4096);
        assert_eq!(read_u64(bytes, 0x070), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(bytes[0x1e8], 4, "e820_entries");
        assert_eq!(
            u16::from_le_bytes([bytes[0x1fe], bytes[0x1ff]]),
            0xaa55,
            "boot_flag"
        );
        assert_eq!(read_u32(bytes, 0x202), 0x5372_6448, "header");
        assert_eq!(bytes[0x210], 0xff, "type_of_loader");
        assert_eq!(read_u32(bytes, 0x218), 0x1f00_0000, "ramdisk_image");
        assert_eq!(read_u32(bytes, 0x21c), 0x12_3456, "ramdisk_size");
        assert_eq!(read_u32(bytes, 0x228), 0x2_0000, "cmd_line_ptr");
        assert_eq!(read_u32(bytes, 0x238), 42, "cmdline_size");
        // e820_table at 0x2d0, 20 bytes per entry.
        assert_eq!(read_u64(bytes, 0x2d0), 0);
        assert_eq!(read_u64(bytes, 0x2d8), 0x9_fc00);
        assert_eq!(read_u32(bytes, 0x2e0), 1);
        let last = 0x2d0 + 3 * 20;
        assert_eq!(read_u64(bytes, last), 0x10_0000);
        assert_eq!(read_u64(bytes, last + 8), (512 << 20) - 0x10_0000);
        assert_eq!(read_u32(bytes, last + 16), 1);
    }

    #[test]
    fn keeps_the_bzimage_header() {
        let header = setup_header {
            setup_sects: 27,
            version: 0x020f,
            initrd_addr_max: 0x7fff_ffff,
            type_of_loader: 0,
            ..Default::default()
        };
        let params = build_zero_page(&ZeroPageConfig {
            setup_header: Some(header),
            cmdline_addr: 0x2_0000,
            cmdline_len: 1,
            initrd: None,
            memory_map: &[],
            rsdp_addr: 0,
        })
        .unwrap();
        assert_eq!(params.hdr.setup_sects, 27);
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!(params.hdr.type_of_loader, 0xff);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn refuses_an_oversized_memory_map() {
        let map = vec![
            MemoryMapEntry {
                addr: 0,
                size: 1,
                kind: 1
            };
            200
        ];
        assert!(build_zero_page(&ZeroPageConfig {
            setup_header: None,
            cmdline_addr: 0,
            cmdline_len: 0,
            initrd: None,
            memory_map: &map,
            rsdp_addr: 0,
        })
        .is_none());
    }
}
