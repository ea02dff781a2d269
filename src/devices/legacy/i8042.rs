//! The i8042 keyboard controller, only as far as the CPU reset line
//! (command 0xFE on port 0x64): Linux's fallback reboot method.

use crate::arch::x86_64::layout::I8042_DATA_PORT;
use crate::devices::BusDevice;
use crate::vmm::exit::{ExitReason, ExitSignal};

/// Raises a reset when vm-superio's i8042 pulses its reset line.
pub struct ResetTrigger(ExitSignal);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// Registered at the data port (0x60) and the command port (0x64).
pub struct I8042 {
    inner: vm_superio::I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: ExitSignal) -> Self {
        I8042 {
            inner: vm_superio::I8042Device::new(ResetTrigger(exit)),
        }
    }

    fn register(base: u64, offset: u64) -> u8 {
        (base + offset).saturating_sub(u64::from(I8042_DATA_PORT)) as u8
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so Linux's
        // kb_wait() never spins.
        let value = self.inner.read(Self::register(base, offset));
        data.fill(value);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            let Ok(()) = self.inner.write(Self::register(base, offset), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::I8042_COMMAND_PORT;

    #[test]
    fn reset_command_on_port_0x64_resets() {
        let exit = ExitSignal::new().unwrap();
        let mut dev = I8042::new(exit.clone());
        let cmd = u64::from(I8042_COMMAND_PORT);
        let mut status = [0xff];
        dev.read(cmd, 0, &mut status);
        assert_eq!(status, [0]);
        dev.write(u64::from(I8042_DATA_PORT), 0, &[0xfe]);
        assert_eq!(exit.reason(), None, "0xFE on the data port is not a reset");
        dev.write(cmd, 0, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
