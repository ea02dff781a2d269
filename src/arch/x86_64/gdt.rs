//! The boot GDT: flat segments as the Linux boot protocols expect them.
//!
//! The kernel replaces this GDT within its first instructions; it only has
//! to be valid at entry, and KVM needs the same values in the segment
//! registers' hidden parts (`kvm_segment`).

use kvm_bindings::kvm_segment;

/// Selector of the boot code segment (`__BOOT_CS` in Linux).
pub const CODE_SELECTOR: u16 = 0x10;
/// Selector of the boot data segment (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// Selector of the task state segment.
pub const TSS_SELECTOR: u16 = 0x20;

/// Which CPU mode the boot entry point expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode with paging (Linux 64-bit boot protocol).
    Long,
    /// 32-bit protected mode, paging off (PVH boot protocol).
    Protected32,
}

/// Packs a segment descriptor from its flags, base and limit.
///
/// `flags` holds the access byte in bits 0..8 and the G/DB/L/AVL nibble in
/// bits 12..16, the layout used by the descriptor itself (minus the limit).
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The GDT for an entry mode: null, null, code, data, TSS.
pub fn boot_gdt(mode: EntryMode) -> [u64; 5] {
    let code_flags = match mode {
        // G=1, L=1, present, DPL0, code execute/read accessed.
        EntryMode::Long => 0xa09b,
        // G=1, D/B=1 (32-bit), present, DPL0, code execute/read accessed.
        EntryMode::Protected32 => 0xc09b,
    };
    [
        0,
        0,
        descriptor(code_flags, 0, 0xfffff),
        // G=1, D/B=1, present, DPL0, data read/write accessed.
        descriptor(0xc093, 0, 0xfffff),
        // Present, 32-bit TSS (busy): KVM insists on a usable TR.
        descriptor(0x008b, 0, 0xfffff),
    ]
}

/// The hidden-part view of a descriptor, as `KVM_SET_SREGS` wants it.
pub fn kvm_segment_from(selector: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages: scale it to bytes.
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_classic_flat_descriptors() {
        // Values every x86 OS tutorial and VMM shows for flat 4 GiB segments.
        assert_eq!(descriptor(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(descriptor(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(0x008b, 0, 0xfffff), 0x000f_8b00_0000_ffff);
    }

    #[test]
    fn splits_base_and_limit_fields() {
        let d = descriptor(0x0093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from(0x18, d);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
        assert_eq!(seg.type_, 3);
    }

    #[test]
    fn long_mode_code_segment() {
        let gdt = boot_gdt(EntryMode::Long);
        let cs = kvm_segment_from(CODE_SELECTOR, gdt[usize::from(CODE_SELECTOR >> 3)]);
        assert_eq!((cs.l, cs.db, cs.g, cs.s, cs.present), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
    }

    #[test]
    fn protected_mode_code_segment_is_32_bit() {
        let gdt = boot_gdt(EntryMode::Protected32);
        let cs = kvm_segment_from(CODE_SELECTOR, gdt[2]);
        assert_eq!((cs.l, cs.db), (0, 1));
        let tr = kvm_segment_from(TSS_SELECTOR, gdt[4]);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from(0, 0).unusable, 1);
    }
}
