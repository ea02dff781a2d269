//! pvpanic (ACPI `QEMU0001`): the guest kernel writes here when it panics,
//! so vmlab ends with an error instead of hanging on a dead guest.

use crate::devices::BusDevice;
use crate::vmm::exit::{ExitReason, ExitSignal};

const PVPANIC_PANICKED: u8 = 1 << 0;
const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

pub struct PvPanic {
    exit: ExitSignal,
}

impl PvPanic {
    pub fn new(exit: ExitSignal) -> Self {
        PvPanic { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // The events this device understands.
        data.fill(PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(v) if v & PVPANIC_PANICKED != 0 => self.exit.request(ExitReason::GuestPanic),
            Some(v) if v & PVPANIC_CRASH_LOADED != 0 => {
                crate::warn_limited!("guest kernel crashed and is loading a crash kernel")
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_kernel_writes_in_a_loop_log_a_few_lines() {
        let mut dev = PvPanic::new(ExitSignal::new().unwrap());
        let lines = crate::logging::capture::lines(|| {
            for _ in 0..1000 {
                dev.write(0x505, 0, &[PVPANIC_CRASH_LOADED]);
            }
        });
        assert_eq!(lines.len(), crate::rate_limit::LOG_BURST as usize);
    }

    #[test]
    fn panic_write_stops_the_vm_with_an_error() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = PvPanic::new(exit.clone());
        let mut caps = [0];
        dev.read(0x505, 0, &mut caps);
        assert_eq!(caps, [3]);
        dev.write(0x505, 0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
        dev.write(0x505, 0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestPanic));
        assert_ne!(ExitReason::GuestPanic.exit_code(), 0);
    }
}
