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

    /// jmp $ : never reached when the previous write stops the VM.
    pub fn spin(mut self) -> Self {
        self.code.extend_from_slice(&[0xeb, 0xfe]);
        self
    }
}
