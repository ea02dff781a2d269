//! The one path by which every device model takes chains from its queues
//! and gives them back: pop a chain (refusing an available ring that claims
//! more than the queue holds), complete it in the used ring, then either
//! signal the driver or, on a fault, put the device in DEVICE_NEEDS_RESET.
//!
//! The guest owns the rings and may write anything there. virtio-queue's own
//! `pop_descriptor_chain` answers an `avail.idx` that runs too far ahead
//! with `None` (and an error line) while `enable_notification` keeps saying
//! more buffers wait: a device looping on the two would spin forever. Here
//! that is a [`DriverFault`], and the device stops.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::fault::{DeviceFault, DriverFault};
use super::interrupt::VirtioInterrupt;
use crate::vmm::memory::GuestMemoryMmap;

/// A chain of the guest's buffers, as a queue gives it.
pub type Chain<'m> = DescriptorChain<&'m GuestMemoryMmap>;

/// What a started device needs to serve its queues: guest memory, the
/// interrupt it signals, and its name for the log.
pub struct QueueService {
    device: String,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
}

impl QueueService {
    pub fn new(
        device: impl Into<String>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        QueueService {
            device: device.into(),
            mem,
            interrupt,
        }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    /// The next chain the driver made available, if any.
    pub fn pop<'m>(&'m self, queue: &mut Queue) -> Result<Option<Chain<'m>>, DriverFault> {
        let mem = &self.mem;
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(DriverFault::Ring)?;
        let next = Wrapping(queue.next_avail());
        if avail == next {
            return Ok(None);
        }
        if (avail - next).0 > queue.size() {
            return Err(DriverFault::AvailRingOverrun {
                avail: avail.0,
                next: next.0,
                size: queue.size(),
            });
        }
        // `iter` reads avail.idx again; a driver that moved it meanwhile
        // (backwards, or too far) gets an error or nothing: a fault either way.
        let mut chains = queue.iter(mem).map_err(DriverFault::Ring)?;
        chains
            .next()
            .map(Some)
            .ok_or(DriverFault::AvailRingUnreadable)
    }

    /// Puts chain `head` in the used ring with `len` bytes written into it.
    pub fn complete(&self, queue: &mut Queue, head: u16, len: u32) -> Result<(), DriverFault> {
        queue
            .add_used(&self.mem, head, len)
            .map_err(DriverFault::Ring)
    }

    /// Turns notifications on (with EVENT_IDX: publishes `avail_event`);
    /// returns whether buffers raced in meanwhile.
    pub fn enable_notification(&self, queue: &mut Queue) -> Result<bool, DriverFault> {
        queue
            .enable_notification(&self.mem)
            .map_err(DriverFault::Ring)
    }

    /// Serves every available chain of `queue` with `handle`, which returns
    /// the bytes it wrote into the chain (the used length), then tells the
    /// driver (see [`QueueService::finish`]).
    ///
    /// With EVENT_IDX the driver only kicks when `avail_event` says the
    /// device waits, so notifications go off while chains are served and
    /// back on at the end, with a last look for chains that raced in.
    pub fn serve<F>(&self, queue: &mut Queue, handle: F) -> Result<(), DeviceFault>
    where
        F: FnMut(Chain<'_>) -> Result<u32, DeviceFault>,
    {
        self.serve_while(queue, || true, handle)
    }

    /// [`QueueService::serve`], but only while `ready` says the device can
    /// take another chain (asked before each). When it cannot, the rest
    /// stay in the ring with notifications off: the driver need not kick,
    /// the device comes back by itself once it has room (a pause, as a
    /// real card's full transmit FIFO).
    pub fn serve_while<R, F>(
        &self,
        queue: &mut Queue,
        ready: R,
        handle: F,
    ) -> Result<(), DeviceFault>
    where
        R: FnMut() -> bool,
        F: FnMut(Chain<'_>) -> Result<u32, DeviceFault>,
    {
        let outcome = self.serve_available(queue, ready, handle);
        self.finish(queue, outcome)
    }

    /// Serves chains until the ring is empty or `ready` says stop; returns
    /// whether any was used.
    fn serve_available<R, F>(
        &self,
        queue: &mut Queue,
        mut ready: R,
        mut handle: F,
    ) -> Result<bool, DeviceFault>
    where
        R: FnMut() -> bool,
        F: FnMut(Chain<'_>) -> Result<u32, DeviceFault>,
    {
        let mut used_any = false;
        loop {
            queue
                .disable_notification(&self.mem)
                .map_err(DriverFault::Ring)?;
            while ready() {
                let Some(chain) = self.pop(queue)? else {
                    break;
                };
                let head = chain.head_index();
                let len = handle(chain)?;
                self.complete(queue, head, len)?;
                used_any = true;
            }
            if !ready() {
                return Ok(used_any);
            }
            // `pop` only ends on an empty ring, so "more" here means the
            // driver added chains since: never a spin on a broken ring.
            if !self.enable_notification(queue)? {
                return Ok(used_any);
            }
        }
    }

    /// Ends a round of serving `queue`: if chains were used, interrupts the
    /// driver when it asked to hear; on a fault, logs it and puts the device
    /// in DEVICE_NEEDS_RESET. The fault comes back so that the device drops
    /// its queues until the driver resets it.
    pub fn finish(
        &self,
        queue: &mut Queue,
        outcome: Result<bool, DeviceFault>,
    ) -> Result<(), DeviceFault> {
        match outcome {
            Ok(false) => Ok(()),
            Ok(true) => {
                if queue.needs_notification(&self.mem).unwrap_or(true) {
                    self.interrupt.signal_used_queue();
                }
                Ok(())
            }
            Err(fault) => {
                crate::warn_limited!("{}: {fault}; the device needs a reset", self.device);
                self.interrupt.mark_needs_reset();
                Err(fault)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fault::HostFault;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const SIZE: u16 = 16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn service(mem: &GuestMemoryMmap) -> QueueService {
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        QueueService::new("test-device", mem.clone(), interrupt)
    }

    fn chains(vq: &MockSplitQueue<GuestMemoryMmap>, count: u16) {
        let descs: Vec<_> = (0..count)
            .map(|i| {
                let d = SplitDescriptor::new(
                    0x8_0000 + 0x100 * u64::from(i),
                    0x100,
                    VRING_DESC_F_WRITE as u16,
                    0,
                );
                RawDescriptor::from(d)
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
    }

    #[test]
    fn every_chain_is_completed_and_the_driver_signalled() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, SIZE);
        chains(&vq, 3);
        let svc = service(&m);
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut seen = Vec::new();
        svc.serve(&mut queue, |chain| {
            seen.push(chain.head_index());
            Ok(7)
        })
        .unwrap();
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(vq.used().ring().ref_at(2).unwrap().load().len(), 7);
        assert_eq!(
            svc.interrupt().status(),
            super::super::interrupt::INT_USED_RING
        );
        assert!(!svc.interrupt().needs_reset());
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_is_a_driver_fault_not_a_spin() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, SIZE);
        chains(&vq, 2);
        // The driver claims SIZE + 1 buffers; the device has taken none.
        vq.avail().idx().store(SIZE + 1);
        let svc = service(&m);
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut calls = 0;
        let fault = svc
            .serve(&mut queue, |_| {
                calls += 1;
                Ok(0)
            })
            .unwrap_err();
        assert!(
            matches!(
                fault,
                DeviceFault::Driver(DriverFault::AvailRingOverrun {
                    avail: 17,
                    next: 0,
                    size: 16
                })
            ),
            "{fault:?}"
        );
        assert!(fault.is_driver_fault());
        assert_eq!(calls, 0, "no chain of a broken ring is served");
        assert!(svc.interrupt().needs_reset());
    }

    #[test]
    fn the_overrun_is_caught_after_the_device_took_some_chains() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, SIZE);
        chains(&vq, 2);
        let svc = service(&m);
        let mut queue: Queue = vq.create_queue().unwrap();
        svc.serve(&mut queue, |_| Ok(0)).unwrap();
        // Exactly SIZE ahead is legal (a full ring); one more is not.
        vq.avail().idx().store(2 + SIZE + 1);
        let fault = svc.pop(&mut queue).unwrap_err();
        assert!(
            matches!(fault, DriverFault::AvailRingOverrun { next: 2, .. }),
            "{fault:?}"
        );
    }

    #[test]
    fn a_full_ring_is_served_whole() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, SIZE);
        chains(&vq, SIZE);
        let svc = service(&m);
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut calls = 0;
        svc.serve(&mut queue, |_| {
            calls += 1;
            Ok(0)
        })
        .unwrap();
        assert_eq!(calls, SIZE);
    }

    #[test]
    fn a_handler_fault_stops_the_round_and_keeps_its_kind() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, SIZE);
        chains(&vq, 3);
        let svc = service(&m);
        let mut queue: Queue = vq.create_queue().unwrap();
        let fault = svc
            .serve(&mut queue, |_| {
                Err(HostFault::Entropy(std::io::Error::other("gone")).into())
            })
            .unwrap_err();
        assert!(!fault.is_driver_fault());
        assert_eq!(vq.used().idx().load(), 0);
        assert!(svc.interrupt().needs_reset());
    }
}
