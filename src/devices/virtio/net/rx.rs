//! The RX queue as the NAT's [`GuestPort`]: each frame fills one chain, or
//! several with mergeable buffers, header first.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::NetCounters;
use crate::devices::virtio::fault::{DeviceFault, DriverFault};
use crate::devices::virtio::queue::{Chain, QueueService};
use crate::net::{GuestFrame, GuestPort, Offloads, PortBusy, NET_HDR_LEN};

/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: usize = 10;

/// Borrows the RX queue for one flush of the NAT.
pub(super) struct RxPort<'a> {
    queue: &'a mut Queue,
    service: &'a QueueService,
    mergeable: bool,
    offloads: Offloads,
    counters: &'a mut NetCounters,
    used: bool,
    /// The driver broke the queue; nothing more is delivered.
    fault: Option<DriverFault>,
    /// Where the current frame's header goes (the first chain's start).
    header_at: Vec<(GuestAddress, usize)>,
    /// Chains taken for the current frame: head index and bytes written.
    chains: Vec<(u16, u32)>,
}

impl<'a> RxPort<'a> {
    pub fn new(
        queue: &'a mut Queue,
        service: &'a QueueService,
        mergeable: bool,
        offloads: Offloads,
        counters: &'a mut NetCounters,
    ) -> Self {
        RxPort {
            queue,
            service,
            mergeable,
            offloads,
            counters,
            used: false,
            fault: None,
            header_at: Vec::new(),
            chains: Vec::new(),
        }
    }

    /// Whether any buffer was used, or the fault that broke the queue:
    /// what [`QueueService::finish`] reports to the driver.
    pub fn finish(self) -> Result<bool, DeviceFault> {
        match self.fault {
            Some(fault) => Err(fault.into()),
            None => Ok(self.used),
        }
    }

    /// The next posted chain. When there is none, notifications are turned
    /// on (EVENT_IDX: `avail_event` published) so the driver kicks as soon
    /// as it posts more, and a chain that raced in is taken.
    fn next_chain(&mut self) -> Result<Option<Chain<'a>>, DriverFault> {
        if let Some(chain) = self.service.pop(self.queue)? {
            return Ok(Some(chain));
        }
        if self.service.enable_notification(self.queue)? {
            return self.service.pop(self.queue);
        }
        Ok(None)
    }

    /// Writes the frame's bytes into `chain`'s writable buffers, starting
    /// at `data[*done..]`; the first chain keeps room for the header.
    /// Returns the bytes the chain received.
    fn fill(
        &mut self,
        chain: Chain<'a>,
        data: &[u8],
        done: &mut usize,
    ) -> Result<u32, DriverFault> {
        let first = self.chains.is_empty();
        let mut header_left = if first { NET_HDR_LEN } else { 0 };
        let mut taken = 0usize;
        for desc in chain.writable() {
            let mut addr = desc.addr();
            let mut room = desc.len() as usize;
            if header_left > 0 {
                let n = room.min(header_left);
                self.header_at.push((addr, n));
                header_left -= n;
                taken += n;
                room -= n;
                addr = addr.unchecked_add(n as u64);
            }
            let n = room.min(data.len() - *done);
            if n > 0 {
                self.service
                    .mem()
                    .write_slice(&data[*done..*done + n], addr)
                    .map_err(|_| DriverFault::outside_memory(addr, n))?;
                *done += n;
                taken += n;
            }
            if header_left == 0 && *done == data.len() {
                break;
            }
        }
        if first && header_left > 0 {
            // Too small for even the header: with mergeable buffers the
            // spec forbids it; without, the frame cannot fit.
            return Ok(0);
        }
        Ok(taken as u32)
    }

    /// Delivers one frame; `Ok(false)` when the guest has too few buffers.
    fn deliver(&mut self, frame: &GuestFrame) -> Result<bool, DriverFault> {
        let start = self.queue.next_avail();
        self.header_at.clear();
        self.chains.clear();
        let mut done = 0usize;
        loop {
            let Some(chain) = self.next_chain()? else {
                // Put the chains taken so far back for the next attempt.
                self.queue.set_next_avail(start);
                return Ok(false);
            };
            let head = chain.head_index();
            let len = self.fill(chain, &frame.data, &mut done)?;
            if len == 0 {
                if self.mergeable {
                    return Err(DriverFault::RxBufferTooSmall);
                }
                return self.too_big(start);
            }
            self.chains.push((head, len));
            if done == frame.data.len() {
                break;
            }
            if !self.mergeable {
                return self.too_big(start);
            }
        }

        let mut header = frame.hdr.to_bytes();
        let count = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        header[NUM_BUFFERS_AT..].copy_from_slice(&count.to_le_bytes());
        let mut offset = 0;
        for &(addr, n) in &self.header_at {
            self.service
                .mem()
                .write_slice(&header[offset..offset + n], addr)
                .map_err(|_| DriverFault::outside_memory(addr, n))?;
            offset += n;
        }
        for &(head, len) in &self.chains {
            self.service.complete(self.queue, head, len)?;
        }
        self.counters.rx_frames += 1;
        self.used = true;
        Ok(true)
    }

    /// The frame does not fit the guest's buffers: it is dropped and the
    /// buffers stay posted for the next frame.
    fn too_big(&mut self, start: u16) -> Result<bool, DriverFault> {
        self.queue.set_next_avail(start);
        self.counters.rx_too_big += 1;
        Ok(true)
    }
}

impl GuestPort for RxPort<'_> {
    fn send(&mut self, frame: &GuestFrame) -> Result<(), PortBusy> {
        if self.fault.is_some() {
            return Err(PortBusy);
        }
        match self.deliver(frame) {
            Ok(true) => Ok(()),
            Ok(false) => Err(PortBusy),
            Err(fault) => {
                self.fault = Some(fault);
                Err(PortBusy)
            }
        }
    }

    fn offloads(&self) -> Offloads {
        self.offloads
    }
}

/// The port while the driver has not started the device: always full, so
/// the NAT holds its frames (bounded) and pauses host reads.
pub(super) struct Unplugged;

impl GuestPort for Unplugged {
    fn send(&mut self, _frame: &GuestFrame) -> Result<(), PortBusy> {
        Err(PortBusy)
    }

    fn offloads(&self) -> Offloads {
        Offloads::default()
    }
}
