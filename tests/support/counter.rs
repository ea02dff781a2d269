//! The counting guest of the suspend tests and the resume benchmark: it
//! counts in a register and in memory, and shows on the UART that it goes
//! on from where it was after a resume.

use super::tiny_guest::Program;

/// Where the guest keeps its count in memory.
pub const COUNT_ADDR: u32 = 0x30_0000;
/// The guest prints the count's bits above these, each time they change.
pub const SHIFT: u8 = 8;

/// Counts in ebx and at COUNT_ADDR, checks they agree (else prints X and
/// halts), and prints `count >> SHIFT` on the UART whenever the bits below
/// are zero.
pub fn counter() -> Program {
    let p = Program::new();
    let top = p.here();
    let p = p
        .inc_mem32(COUNT_ADDR)
        .inc_ebx()
        .load_eax(u64::from(COUNT_ADDR))
        .cmp_eax_ebx()
        .jne_over(17);
    let body = p.here();
    let p = p
        .test_eax((1 << SHIFT) - 1)
        .jne_back(top)
        .shr_eax(SHIFT)
        .mov_dx(0x3f8)
        .out_dx_al()
        .jmp_back(top);
    assert_eq!(p.here() - body, 17);
    p.print(b"X").halt_forever()
}
