//! The RX queue as the NAT's [`GuestPort`]: each frame fills one chain, or
//! several with mergeable buffers, header first.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::NetCounters;
use crate::net::{GuestFrame, GuestPort, Offloads, PortBusy, NET_HDR_LEN};
use crate::vmm::memory::GuestMemoryMmap;

/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: usize = 10;

/// Borrows the RX queue for one flush of the NAT.
pub(super) struct RxPort<'a> {
    queue: &'a mut Queue,
    mem: &'a GuestMemoryMmap,
    mergeable: bool,
    offloads: Offloads,
    counters: &'a mut NetCounters,
    used: bool,
    /// The driver broke the queue; nothing more is delivered.
    fault: Option<String>,
    /// Where the current frame's header goes (the first chain's start).
    header_at: Vec<(GuestAddress, usize)>,
    /// Chains taken for the current frame: head index and bytes written.
    chains: Vec<(u16, u32)>,
}

impl<'a> RxPort<'a> {
    pub fn new(
        queue: &'a mut Queue,
        mem: &'a GuestMemoryMmap,
        mergeable: bool,
        offloads: Offloads,
        counters: &'a mut NetCounters,
    ) -> Self {
        RxPort {
            queue,
            mem,
            mergeable,
            offloads,
            counters,
            used: false,
            fault: None,
            header_at: Vec::new(),
            chains: Vec::new(),
        }
    }

    /// Whether any buffer was used, and the fault that broke the queue.
    pub fn finish(self) -> (bool, Option<String>) {
        (self.used, self.fault)
    }

    /// The next posted chain. When there is none, notifications are turned
    /// on (EVENT_IDX: `avail_event` published) so the driver kicks as soon
    /// as it posts more, and a chain that raced in is taken.
    fn next_chain(&mut self) -> Option<DescriptorChain<&'a GuestMemoryMmap>> {
        if let Some(chain) = self.queue.pop_descriptor_chain(self.mem) {
            return Some(chain);
        }
        match self.queue.enable_notification(self.mem) {
            Ok(true) => self.queue.pop_descriptor_chain(self.mem),
            Ok(false) => None,
            Err(e) => {
                self.fault = Some(format!("RX queue notification: {e:?}"));
                None
            }
        }
    }

    /// Writes the frame's bytes into `chain`'s writable buffers, starting
    /// at `data[*done..]`; the first chain keeps room for the header.
    /// Returns the bytes the chain received.
    fn fill(
        &mut self,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        data: &[u8],
        done: &mut usize,
    ) -> Result<u32, String> {
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
                self.mem
                    .write_slice(&data[*done..*done + n], addr)
                    .map_err(|e| format!("RX buffer outside guest memory: {e}"))?;
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
    fn deliver(&mut self, frame: &GuestFrame) -> Result<bool, String> {
        let start = self.queue.next_avail();
        self.header_at.clear();
        self.chains.clear();
        let mut done = 0usize;
        loop {
            let Some(chain) = self.next_chain() else {
                if let Some(fault) = self.fault.take() {
                    return Err(fault);
                }
                // Put the chains taken so far back for the next attempt.
                self.queue.set_next_avail(start);
                return Ok(false);
            };
            let head = chain.head_index();
            let len = self.fill(chain, &frame.data, &mut done)?;
            if len == 0 {
                if self.mergeable {
                    return Err("RX buffer smaller than the virtio-net header".into());
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
            self.mem
                .write_slice(&header[offset..offset + n], addr)
                .map_err(|e| format!("RX buffer outside guest memory: {e}"))?;
            offset += n;
        }
        for &(head, len) in &self.chains {
            self.queue
                .add_used(self.mem, head, len)
                .map_err(|e| format!("RX used ring: {e:?}"))?;
        }
        self.counters.rx_frames += 1;
        self.used = true;
        Ok(true)
    }

    /// The frame does not fit the guest's buffers: it is dropped and the
    /// buffers stay posted for the next frame.
    fn too_big(&mut self, start: u16) -> Result<bool, String> {
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
