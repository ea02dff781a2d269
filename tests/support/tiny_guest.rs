//! A few x86-64 instructions, hand-encoded, to write tiny guests that only
//! use port I/O and MMIO (the only things a PVM host runs for any guest).

#[derive(Default)]
pub struct Program {
    pub code: Vec<u8>,
}

impl Program {
    pub fn new() -> Self {
        Self::default()
    }

    /// Current offset, to jump back to.
    pub fn here(&self) -> usize {
        self.code.len()
    }

    /// mov dx, imm16
    pub fn mov_dx(mut self, port: u16) -> Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self
    }

    /// mov al, imm8
    pub fn mov_al(mut self, value: u8) -> Self {
        self.code.extend_from_slice(&[0xb0, value]);
        self
    }

    /// out dx, al
    pub fn out_dx_al(mut self) -> Self {
        self.code.push(0xee);
        self
    }

    /// in al, dx
    pub fn in_al_dx(mut self) -> Self {
        self.code.push(0xec);
        self
    }

    /// Writes `value` to I/O port `port`.
    pub fn out(self, port: u16, value: u8) -> Self {
        self.mov_dx(port).mov_al(value).out_dx_al()
    }

    /// Writes each byte of `text` to the UART's transmit register.
    pub fn print(mut self, text: &[u8]) -> Self {
        for &b in text {
            self = self.out(0x3f8, b);
        }
        self
    }

    /// test al, imm8
    pub fn test_al(mut self, mask: u8) -> Self {
        self.code.extend_from_slice(&[0xa8, mask]);
        self
    }

    /// xor al, imm8
    pub fn xor_al(mut self, value: u8) -> Self {
        self.code.extend_from_slice(&[0x34, value]);
        self
    }

    /// mov bl, al
    pub fn mov_bl_al(mut self) -> Self {
        self.code.extend_from_slice(&[0x88, 0xc3]);
        self
    }

    /// cmp bl, imm8
    pub fn cmp_bl(mut self, value: u8) -> Self {
        self.code.extend_from_slice(&[0x80, 0xfb, value]);
        self
    }

    /// mov al, [moffs64]
    pub fn load_al(mut self, addr: u64) -> Self {
        self.code.push(0xa0);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }

    /// mov eax, [moffs64]
    pub fn load_eax(mut self, addr: u64) -> Self {
        self.code.push(0xa1);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }

    /// shr eax, imm8
    pub fn shr_eax(mut self, bits: u8) -> Self {
        self.code.extend_from_slice(&[0xc1, 0xe8, bits]);
        self
    }

    /// mov [moffs64], al
    pub fn store_al(mut self, addr: u64) -> Self {
        self.code.push(0xa2);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }

    /// inc dword [addr32] (absolute, through a SIB byte)
    pub fn inc_mem32(mut self, addr: u32) -> Self {
        self.code.extend_from_slice(&[0xff, 0x04, 0x25]);
        self.code.extend_from_slice(&addr.to_le_bytes());
        self
    }

    /// inc ebx
    pub fn inc_ebx(mut self) -> Self {
        self.code.extend_from_slice(&[0xff, 0xc3]);
        self
    }

    /// cmp eax, ebx
    pub fn cmp_eax_ebx(mut self) -> Self {
        self.code.extend_from_slice(&[0x39, 0xd8]);
        self
    }

    /// test eax, imm32
    pub fn test_eax(mut self, mask: u32) -> Self {
        self.code.push(0xa9);
        self.code.extend_from_slice(&mask.to_le_bytes());
        self
    }

    /// jne over the next `len` bytes of code.
    pub fn jne_over(mut self, len: usize) -> Self {
        let rel = u8::try_from(len).expect("forward jump out of rel8 range");
        self.code.extend_from_slice(&[0x75, rel]);
        self
    }

    /// jmp to an earlier offset.
    pub fn jmp_back(self, target: usize) -> Self {
        self.jump_back(0xeb, target)
    }

    /// Appends another program's code.
    pub fn then(mut self, more: Program) -> Self {
        self.code.extend_from_slice(&more.code);
        self
    }

    fn jump_back(mut self, opcode: u8, target: usize) -> Self {
        let rel = target as isize - (self.code.len() as isize + 2);
        let rel = i8::try_from(rel).expect("backward jump out of rel8 range");
        self.code.extend_from_slice(&[opcode, rel as u8]);
        self
    }

    /// jz to an earlier offset.
    pub fn jz_back(self, target: usize) -> Self {
        self.jump_back(0x74, target)
    }

    /// jne to an earlier offset.
    pub fn jne_back(self, target: usize) -> Self {
        self.jump_back(0x75, target)
    }

    /// Powers off through the ACPI sleep control register (S5 | SLP_EN).
    pub fn poweroff(self) -> Self {
        self.out(0x600, (5 << 2) | (1 << 5)).spin()
    }

    /// Reboots through the ACPI reset register (FADT RESET_REG).
    pub fn reset(self) -> Self {
        self.out(0x602, 1).spin()
    }

    /// Leaves long mode for real mode and jumps to the BIOS reset entry,
    /// f000:fff0, the way Linux's `machine_real_restart` does: a 16-bit
    /// code segment (its own GDT, after the code), paging off, EFER
    /// cleared, protection off, a far jump. `load_addr` is where the
    /// program runs (its data is addressed absolutely).
    pub fn jump_to_bios_reset_entry(mut self, load_addr: u64) -> Self {
        let at = |offset: usize| u32::try_from(load_addr + offset as u64).unwrap();
        let start = self.code.len();
        // lgdt [gdtr] (8 bytes), jmp far [far_pointer] (7).
        let code16 = start + 15;
        let code16_len = 39;
        let gdtr = code16 + code16_len;
        let far_pointer = gdtr + 10;
        let gdt = far_pointer + 6;
        self.code.extend_from_slice(&[0x0f, 0x01, 0x14, 0x25]);
        self.code.extend_from_slice(&at(gdtr).to_le_bytes());
        self.code.extend_from_slice(&[0xff, 0x2c, 0x25]);
        self.code.extend_from_slice(&at(far_pointer).to_le_bytes());
        assert_eq!(self.code.len(), code16);
        #[rustfmt::skip]
        self.code.extend_from_slice(&[
            0x0f, 0x20, 0xc0,                   // mov eax, cr0
            0x66, 0x25, 0xff, 0xff, 0xff, 0x7f, // and eax, ~PG
            0x0f, 0x22, 0xc0,                   // mov cr0, eax: long mode ends
            0x66, 0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, EFER
            0x66, 0x31, 0xc0,                   // xor eax, eax
            0x66, 0x31, 0xd2,                   // xor edx, edx
            0x0f, 0x30,                         // wrmsr
            0x0f, 0x20, 0xc0,                   // mov eax, cr0
            0x24, 0xfe,                         // and al, ~PE
            0x0f, 0x22, 0xc0,                   // mov cr0, eax: real mode
            0xea, 0xf0, 0xff, 0x00, 0xf0,       // jmp far f000:fff0
        ]);
        assert_eq!(self.code.len(), gdtr);
        // GDTR: limit, 64-bit base.
        self.code.extend_from_slice(&15u16.to_le_bytes());
        self.code
            .extend_from_slice(&u64::from(at(gdt)).to_le_bytes());
        // Far pointer: 32-bit offset into the 16-bit segment, selector 8.
        self.code
            .extend_from_slice(&u32::try_from(code16).unwrap().to_le_bytes());
        self.code.extend_from_slice(&8u16.to_le_bytes());
        // Null descriptor, then a 16-bit code segment based at the program
        // (limit 0xffff, present, ring 0, readable, D = L = 0).
        let base = at(0).to_le_bytes();
        self.code.extend_from_slice(&[0; 8]);
        self.code
            .extend_from_slice(&[0xff, 0xff, base[0], base[1], base[2], 0x9b, 0x00, base[3]]);
        self
    }

    /// hlt in a loop: the vCPU sleeps in KVM (no interrupt ever wakes it
    /// on a PVM host), so an idle VM costs no CPU.
    pub fn halt_forever(mut self) -> Self {
        self.code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
        self
    }

    /// Writes the program as a minimal ELF executable loaded and entered
    /// at 1 MiB (vmlab enters ELF kernels without a PVH note in 64-bit
    /// mode), to boot with `vmlab run --kernel`.
    pub fn write_elf(&self, path: &std::path::Path) {
        const LOAD: u64 = 0x10_0000;
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
        elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
        elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
        elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
        elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for v in [64u16, 56, 1, 0, 0, 0] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        let len = self.code.len() as u64;
        elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&120u64.to_le_bytes()); // p_offset
        elf.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
        elf.extend_from_slice(&len.to_le_bytes()); // p_filesz
        elf.extend_from_slice(&len.to_le_bytes()); // p_memsz
        elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
        assert_eq!(elf.len(), 120);
        elf.extend_from_slice(&self.code);
        std::fs::write(path, elf).unwrap();
    }

    /// jmp $ : never reached when the previous write stops the VM.
    pub fn spin(mut self) -> Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }
}
