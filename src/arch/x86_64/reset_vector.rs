//! The BIOS reset entry, real-mode f000:fff0 (physical `RESET_VECTOR_ADDR`):
//! where a PC's firmware starts after a reset, and where an OS that reboots
//! "through the BIOS" jumps. vmlab boots kernels directly and has no
//! firmware, so it puts a few instructions there that do what that
//! firmware's start would end in: a reset, asked through the ACPI reset
//! register.
//!
//! Linux goes there on vmlab when its kernel has `CONFIG_EFI` (Debian's do):
//! on a hardware-reduced ACPI machine it picks an EFI reboot first, finds no
//! EFI runtime services (vmlab boots without UEFI), and falls back to
//! `machine_real_restart`, which drops to real mode and jumps to the reset
//! entry before it would try the ACPI reset register. Without this code the
//! vCPU ran empty memory there forever.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, RESET_VECTOR_ADDR};
use crate::vmm::memory::GuestMemoryMmap;

/// The reset entry's code, 16-bit real mode: the reset register's write,
/// then `hlt` in a loop should the write ever come back (vmlab ends the
/// machine on it).
#[rustfmt::skip]
pub const RESET_ENTRY_CODE: [u8; 10] = {
    let port = ACPI_RESET_PORT.to_le_bytes();
    [
        0xfa,                   // cli
        0xba, port[0], port[1], // mov dx, ACPI_RESET_PORT
        0xb0, ACPI_RESET_VALUE, // mov al, ACPI_RESET_VALUE
        0xee,                   // out dx, al
        0xf4,                   // hlt
        0xeb, 0xfd,             // jmp back to the hlt
    ]
};

const _: () = assert!(RESET_VECTOR_ADDR + RESET_ENTRY_CODE.len() as u64 <= ACPI_END);

/// Puts the code at the reset entry of a machine about to boot.
pub fn write_reset_entry(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    mem.write_slice(&RESET_ENTRY_CODE, GuestAddress(RESET_VECTOR_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_sits_at_f000_fff0_and_writes_the_reset_register() {
        let code = RESET_ENTRY_CODE;
        assert_eq!(RESET_VECTOR_ADDR, (0xf000 << 4) + 0xfff0, "f000:fff0");
        // mov dx, imm16 carries the port; mov al, imm8 the value.
        assert_eq!(&code[1..4], &[0xba, 0x02, 0x06]);
        assert_eq!(&code[4..7], &[0xb0, ACPI_RESET_VALUE, 0xee]);
        // The loop's jump lands on the hlt.
        let hlt = code.iter().position(|&b| b == 0xf4).unwrap();
        let after_jump = code.len() as isize;
        assert_eq!(
            after_jump + code[code.len() - 1] as i8 as isize,
            hlt as isize
        );
    }
}
