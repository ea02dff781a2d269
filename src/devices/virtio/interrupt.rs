//! How a device tells the driver something happened: the interrupt status
//! register (ISR) bits and an edge on the device's GSI through an irqfd.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// ISR bit: the device used buffers in a queue.
pub const INT_USED_RING: u32 = 1;
/// ISR bit: the configuration (or status) changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Shared by the transport (which reads and acknowledges the ISR) and the
/// device model (which raises interrupts).
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt {
    pub fn new(irq: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irq,
            needs_reset: AtomicBool::new(false),
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            crate::warn_limited!("virtio: cannot raise an interrupt: {e}");
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    /// The device hit an unrecoverable driver error (bad descriptors,
    /// impossible addresses): it stops, reports DEVICE_NEEDS_RESET and
    /// raises a configuration interrupt, as the spec asks.
    pub fn mark_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.raise(INT_CONFIG_CHANGE);
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The ISR value; reading does not clear it (virtio-mmio uses an
    /// explicit acknowledge register).
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Back to the initial state (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn raising_sets_isr_and_fires_the_irqfd() {
        let int = VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        int.signal_used_queue();
        assert_eq!(int.status(), INT_USED_RING);
        assert_eq!(int.irq().read().unwrap(), 1);
        int.acknowledge(INT_USED_RING);
        assert_eq!(int.status(), 0);
    }

    #[test]
    fn needs_reset_raises_one_config_interrupt() {
        let int = VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        int.mark_needs_reset();
        int.mark_needs_reset();
        assert!(int.needs_reset());
        assert_eq!(int.status(), INT_CONFIG_CHANGE);
        assert_eq!(int.irq().read().unwrap(), 1, "raised once");
        int.reset();
        assert!(!int.needs_reset());
        assert_eq!(int.status(), 0);
    }
}
