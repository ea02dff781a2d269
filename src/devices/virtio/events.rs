//! Queue notifications on an event loop: each queue's ioeventfd wakes the
//! loop, which runs the queue handler there (never on a vCPU).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::device::VirtioDevice;
use super::state::QueueSnapshot;
use crate::devices::bus::lock;

/// What an event loop calls when the guest notifies a queue.
pub trait QueueHandler: Send {
    fn handle_queue(&mut self, index: usize);

    /// The running queues this handler serves, for a VM snapshot (see
    /// [`VirtioDevice::running_queues`]); None when it serves none.
    fn running_queues(&self) -> Option<Vec<QueueSnapshot>> {
        None
    }
}

impl QueueHandler for dyn VirtioDevice {
    fn handle_queue(&mut self, index: usize) {
        self.process_queue(index);
    }

    fn running_queues(&self) -> Option<Vec<QueueSnapshot>> {
        VirtioDevice::running_queues(self)
    }
}

pub struct QueueEvents<H: QueueHandler + ?Sized> {
    handler: Arc<Mutex<H>>,
    /// One ioeventfd per queue, in queue order.
    notifiers: Vec<EventFd>,
}

impl<H: QueueHandler + ?Sized> QueueEvents<H> {
    pub fn new(handler: Arc<Mutex<H>>, notifiers: Vec<EventFd>) -> Self {
        QueueEvents { handler, notifiers }
    }
}

impl<H: QueueHandler + ?Sized> MutEventSubscriber for QueueEvents<H> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(notifier) = self.notifiers.get(index) else {
            return;
        };
        debug_assert_eq!(notifier.as_raw_fd(), events.fd());
        // Draining first means a notification that races with processing
        // wakes us again instead of being lost.
        let _ = notifier.read();
        lock(&self.handler).handle_queue(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, notifier) in self.notifiers.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(notifier, index as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {index}: {e:?}");
            }
        }
    }
}
