//! virtio-net on the VM's event loop: its queue notifications, the NAT's
//! host sockets and the NAT's timer all wake the same loop, so the device
//! and the NAT never need another thread (and never run on a vCPU).

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::Net;
use crate::devices::bus::lock;
use crate::net::TICK;

/// Token of the NAT's timer; queue notifiers use their queue index. All
/// keep bit 31 clear, which marks the NAT's own tokens.
const TOKEN_TIMER: u32 = 0x100;

pub struct NetEvents {
    net: Arc<Mutex<Net>>,
    /// One ioeventfd per queue, in queue order.
    notifiers: Vec<EventFd>,
    /// Runs only while the NAT has flows or queued frames: an idle VM
    /// does not wake its host 20 times a second.
    timer: TimerFd,
    timer_armed: bool,
}

impl NetEvents {
    pub fn new(net: Arc<Mutex<Net>>, notifiers: Vec<EventFd>) -> std::io::Result<Self> {
        Ok(NetEvents {
            net,
            notifiers,
            timer: TimerFd::new()?,
            timer_armed: false,
        })
    }

    /// Arms or stops the NAT's timer as its work requires. It is only
    /// stopped from its own event, after its expiration was read: a stale
    /// timer event in the same epoll batch could otherwise block on a
    /// disarmed timerfd.
    fn update_timer(&mut self, needed: bool, timer_event: bool) {
        let done = match (needed, self.timer_armed) {
            (true, false) => self.timer.reset(TICK, Some(TICK)),
            (false, true) if timer_event => self.timer.clear(),
            _ => return,
        };
        match done {
            Ok(()) => self.timer_armed = needed,
            Err(e) => log::warn!("virtio-net: cannot set the NAT timer: {e}"),
        }
    }
}

impl MutEventSubscriber for NetEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, notifier) in self.notifiers.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(notifier, index as u32, EventSet::IN)) {
                log::error!("virtio-net: cannot watch queue {index}: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)) {
            log::error!("virtio-net: cannot watch the NAT timer: {e:?}");
        }
        lock(&self.net).start(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        let mut net = lock(&self.net);
        if net.owns_token(token) {
            net.backend_event(token, events.event_set(), ops);
        } else if token == TOKEN_TIMER {
            let _ = self.timer.wait();
            net.tick(ops);
        } else if let Some(notifier) = self.notifiers.get(token as usize) {
            // Drained first: a kick racing with processing wakes us again.
            let _ = notifier.read();
            net.queue_notified(token as usize, ops);
        }
        let needed = net.needs_tick();
        drop(net);
        self.update_timer(needed, token == TOKEN_TIMER);
    }
}
