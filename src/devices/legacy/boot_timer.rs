//! The boot-timer port: the guest writes a byte here when its userspace has
//! started (see `layout::BOOT_TIMER_PORT`).

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::vmm::boot_timer::BootTimeline;

pub struct BootTimerPort {
    timeline: Arc<BootTimeline>,
}

impl BootTimerPort {
    pub fn new(timeline: Arc<BootTimeline>) -> Self {
        BootTimerPort { timeline }
    }
}

impl BusDevice for BootTimerPort {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Bochs reads 0xe9 back from its debug port; guests use that to
        // detect it.
        data.fill(0xe9);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            self.timeline.record_guest_write(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn first_write_marks_userspace_started() {
        let timeline = BootTimeline::new(Instant::now(), false);
        let mut port = BootTimerPort::new(timeline.clone());
        assert!(timeline.userspace_started().is_none());
        port.write(0xe9, 0, b"U");
        assert!(timeline.userspace_started().is_some());
        let mut back = [0];
        port.read(0xe9, 0, &mut back);
        assert_eq!(back, [0xe9]);
    }
}
