//! virtio-rng: fills the guest's buffers with bytes from the host's
//! getrandom pool, so guest services have entropy from the first second.

use std::fs::File;
use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::device::{ActivateContext, ActivateError, VirtioDevice};
use super::fault::{DeviceFault, DriverFault, HostFault};
use super::queue::{Chain, QueueService};
use super::TYPE_RNG;

const QUEUE_SIZE: u16 = 256;
/// Largest single request served, so one guest buffer cannot make the
/// event loop stall on a huge read.
const MAX_REQUEST: usize = 64 * 1024;

struct Active {
    service: QueueService,
    queue: Queue,
}

pub struct Rng {
    source: File,
    active: Option<Active>,
    buf: Vec<u8>,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            source: File::open("/dev/urandom")?,
            active: None,
            buf: Vec::new(),
        })
    }
}

/// Fills `chain`'s writable buffers with entropy from `source`; returns the
/// bytes written.
fn fill(
    chain: Chain<'_>,
    service: &QueueService,
    source: &mut File,
    buf: &mut Vec<u8>,
) -> Result<u32, DeviceFault> {
    let mut written = 0usize;
    for desc in chain.writable() {
        let want = (desc.len() as usize).min(MAX_REQUEST - written);
        if want == 0 {
            break;
        }
        buf.resize(want, 0);
        source.read_exact(buf).map_err(HostFault::Entropy)?;
        service
            .mem()
            .write_slice(buf, desc.addr())
            .map_err(|_| DriverFault::outside_memory(desc.addr(), want))?;
        written += want;
    }
    Ok(written as u32)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        super::F_RING_INDIRECT_DESC | super::F_RING_EVENT_IDX
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let service = ctx.service("virtio-rng");
        let queue = ctx.queues.into_iter().next().filter(|q| q.ready());
        let queue = queue.ok_or(ActivateError::QueueNotReady(0))?;
        self.active = Some(Active { service, queue });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, _index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (source, buf, service) = (&mut self.source, &mut self.buf, &active.service);
        let served = service.serve(&mut active.queue, |chain| fill(chain, service, source, buf));
        if served.is_err() {
            // Deaf until the driver resets the device.
            self.active = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::interrupt::VirtioInterrupt;
    use crate::devices::virtio::test_support::returns_in_time;
    use crate::vmm::memory::GuestMemoryMmap;
    use std::sync::Arc;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    /// Activates an Rng on the mock queue; returns it and its interrupt.
    fn activate(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> (Rng, Arc<VirtioInterrupt>) {
        let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mut rng = Rng::new().unwrap();
        rng.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![vq.create_queue().unwrap()],
            interrupt: interrupt.clone(),
            features: crate::devices::virtio::F_VERSION_1,
        })
        .unwrap();
        (rng, interrupt)
    }

    #[test]
    fn fills_writable_buffers_and_reports_the_length() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 100, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x11_0000, 28, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let (mut rng, interrupt) = activate(&m, &vq);
        rng.process_queue(0);
        assert_eq!(vq.used().idx().load(), 1);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((used.id(), used.len()), (0, 128));
        let mut bytes = [0u8; 100];
        m.read_slice(&mut bytes, GuestAddress(0x10_0000)).unwrap();
        assert!(bytes.iter().any(|&b| b != 0), "random bytes written");
        assert_eq!(interrupt.status() & 1, 1);
        assert!(!interrupt.needs_reset());
    }

    #[test]
    fn read_only_buffers_get_nothing() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 64, 0, 0)], 0).unwrap();
        let (mut rng, _) = activate(&m, &vq);
        rng.process_queue(0);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn buffer_outside_guest_memory_needs_reset_and_no_panic() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0xffff_ffff_0000, 64, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let (mut rng, interrupt) = activate(&m, &vq);
        rng.process_queue(0);
        assert!(interrupt.needs_reset());
        // Further notifications are ignored until the driver resets.
        rng.process_queue(0);
    }

    #[test]
    fn descriptor_loop_terminates() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Two descriptors pointing at each other forever.
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                desc(0x10_1000, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
            ],
            0,
        )
        .unwrap();
        let (mut rng, _) = activate(&m, &vq);
        rng.process_queue(0);
        // The chain is cut at the queue size: bounded work, no hang.
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert!(used.len() <= 16 * 8, "{}", used.len());
    }

    #[test]
    fn huge_buffers_are_capped() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 0x80_0000, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        let (mut rng, _) = activate(&m, &vq);
        rng.process_queue(0);
        assert_eq!(
            vq.used().ring().ref_at(0).unwrap().load().len(),
            MAX_REQUEST as u32
        );
    }

    #[test]
    fn an_avail_index_beyond_the_queue_size_needs_reset_instead_of_spinning() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[desc(0x10_0000, 64, VRING_DESC_F_WRITE, 0)], 0)
            .unwrap();
        vq.avail().idx().store(17);
        let (rng, interrupt) = activate(&m, &vq);
        let mut rng = returns_in_time(rng, |rng| rng.process_queue(0));
        assert!(interrupt.needs_reset());
        assert_eq!(vq.used().idx().load(), 0);
        // Deaf until reset: another kick does nothing.
        vq.avail().idx().store(1);
        rng.process_queue(0);
        assert_eq!(vq.used().idx().load(), 0);
    }
}
