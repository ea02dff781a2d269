//! Queue notifications on the event loop: each queue's ioeventfd wakes the
//! loop, which runs the device's queue handler there (never on a vCPU).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::VirtioDevice;
use crate::devices::bus::lock;

pub struct QueueEvents {
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// One ioeventfd per queue, in queue order.
    notifiers: Vec<EventFd>,
}

impl QueueEvents {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, notifiers: Vec<EventFd>) -> Self {
        QueueEvents { device, notifiers }
    }
}

impl MutEventSubscriber for QueueEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(notifier) = self.notifiers.get(index) else {
            return;
        };
        debug_assert_eq!(notifier.as_raw_fd(), events.fd());
        // Draining first means a notification that races with processing
        // wakes us again instead of being lost.
        let _ = notifier.read();
        lock(&self.device).process_queue(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, notifier) in self.notifiers.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(notifier, index as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {index}: {e:?}");
            }
        }
    }
}
