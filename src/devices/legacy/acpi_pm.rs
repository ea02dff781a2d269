//! Hardware-reduced ACPI sleep control, sleep status and reset registers:
//! how the guest powers off (`poweroff`) and resets (`reboot`).

use crate::arch::x86_64::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
};
use crate::devices::BusDevice;
use crate::vmm::exit::{ExitReason, ExitSignal};

/// SLP_EN: bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP: bits 2..5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The three one-byte registers, at consecutive ports.
pub struct AcpiPmRegisters {
    exit: ExitSignal,
}

impl AcpiPmRegisters {
    /// First port and number of ports.
    pub const BASE: u16 = ACPI_SLEEP_CONTROL_PORT;
    pub const LEN: u16 = ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT + 1;

    pub fn new(exit: ExitSignal) -> Self {
        AcpiPmRegisters { exit }
    }
}

impl BusDevice for AcpiPmRegisters {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken"; the others read as zero too.
        data.fill(0);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = base + offset;
        if port == u64::from(ACPI_SLEEP_CONTROL_PORT) && value & SLP_EN != 0 {
            let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if sleep_type == ACPI_S5_SLEEP_TYPE {
                self.exit.request(ExitReason::PowerOff);
            } else {
                crate::warn_limited!(
                    "guest asked for unsupported ACPI sleep type {sleep_type}; ignored"
                );
            }
        } else if port == u64::from(ACPI_RESET_PORT) && value == ACPI_RESET_VALUE {
            self.exit.request(ExitReason::Reset);
        } else if port == u64::from(ACPI_SLEEP_STATUS_PORT) {
            // Writes clear status bits; there are none to clear.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> (AcpiPmRegisters, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        (AcpiPmRegisters::new(exit.clone()), exit)
    }

    const BASE: u64 = AcpiPmRegisters::BASE as u64;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut dev, exit) = regs();
        // What Linux writes: SLP_TYP=5 << 2 | SLP_EN.
        dev.write(BASE, 0, &[(5 << 2) | (1 << 5)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn other_sleep_states_and_missing_slp_en_are_ignored() {
        let (mut dev, exit) = regs();
        dev.write(BASE, 0, &[5 << 2]);
        dev.write(BASE, 0, &[(3 << 2) | (1 << 5)]);
        dev.write(BASE, 1, &[0xff]);
        dev.write(BASE, 0, &[]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn unsupported_sleep_requests_in_a_loop_log_a_few_lines() {
        let (mut dev, _exit) = regs();
        let lines = crate::logging::capture::lines(|| {
            for _ in 0..1000 {
                dev.write(BASE, 0, &[(3 << 2) | (1 << 5)]);
            }
        });
        assert_eq!(lines.len(), crate::rate_limit::LOG_BURST as usize);
    }

    #[test]
    fn reset_register_resets_only_with_the_declared_value() {
        let (mut dev, exit) = regs();
        dev.write(BASE, 2, &[0x2]);
        assert_eq!(exit.reason(), None);
        dev.write(BASE, 2, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
        let mut status = [0xaa];
        dev.read(BASE, 1, &mut status);
        assert_eq!(status, [0]);
    }
}
