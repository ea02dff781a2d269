//! Initial vCPU register state for each boot protocol.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{self, EntryMode, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR};

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Where the boot vCPU starts and what it finds in its registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry_point: u64,
    /// Guest address of the boot information: the zero page (RSI, 64-bit
    /// protocol) or the PVH start info (RBX).
    pub boot_info: u64,
}

/// General-purpose registers at entry.
pub fn boot_regs(entry: &BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: entry.entry_point,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Long => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = entry.boot_info;
        }
        EntryMode::Protected32 => regs.rbx = entry.boot_info,
    }
    regs
}

/// Segment and control registers at entry, starting from what KVM reports
/// for a fresh vCPU (`current`).
pub fn boot_sregs(current: &kvm_sregs, mode: EntryMode, cr3: u64) -> kvm_sregs {
    let table = gdt::boot_gdt(mode);
    let entry = |sel: u16| table[usize::from(sel >> 3)];
    let code = gdt::kvm_segment_from(CODE_SELECTOR, entry(CODE_SELECTOR));
    let data = gdt::kvm_segment_from(DATA_SELECTOR, entry(DATA_SELECTOR));
    let mut sregs = *current;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::kvm_segment_from(TSS_SELECTOR, entry(TSS_SELECTOR));
    match mode {
        EntryMode::Long => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = cr3;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryMode::Protected32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// x87 and SSE control words at their reset defaults.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The GDT's bytes, to be written at `GDT_ADDR`.
pub fn gdt_bytes(mode: EntryMode) -> Vec<u8> {
    gdt::boot_gdt(mode)
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_enables_paging_and_lma() {
        let s = boot_sregs(&kvm_sregs::default(), EntryMode::Long, 0x9000);
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr3, 0x9000);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 39);
    }

    #[test]
    fn pvh_entry_has_paging_off() {
        let s = boot_sregs(&kvm_sregs::default(), EntryMode::Protected32, 0x9000);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_eq!(s.efer, 0);
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
    }

    #[test]
    fn boot_info_goes_where_each_protocol_wants_it() {
        let long = boot_regs(&BootEntry {
            mode: EntryMode::Long,
            entry_point: 0x100_0000,
            boot_info: 0x7000,
        });
        assert_eq!((long.rip, long.rsi, long.rbx), (0x100_0000, 0x7000, 0));
        let pvh = boot_regs(&BootEntry {
            mode: EntryMode::Protected32,
            entry_point: 0x100_0200,
            boot_info: 0x6000,
        });
        assert_eq!((pvh.rip, pvh.rsi, pvh.rbx), (0x100_0200, 0, 0x6000));
        assert_eq!(pvh.rflags, 2);
    }
}
