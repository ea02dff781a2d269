//! virtio-net on the userspace NAT: the guest's `eth0`.
//!
//! Two queues: RX (0), where the guest posts buffers that the NAT's frames
//! fill, and TX (1), whose chains become [`Nat::handle_frame`] calls. Every
//! frame carries the 12-byte `virtio_net_hdr` the NAT speaks natively
//! ([`NetHdr`]), so checksum and TSO offloads pass straight through: the
//! guest sends 64 KiB TCP segments with partial checksums and receives them
//! the same way, which is what makes the NAT fast at MTU 1500.
//!
//! Backpressure: when the guest has no RX buffers posted, the NAT's
//! [`GuestPort`](crate::net::GuestPort) reports busy and the NAT stops
//! reading host sockets; the guest's next RX notification flushes again.
//!
//! All of it runs on the VM's event loop ([`NetEvents`]): queue
//! notifications, the NAT's host sockets and its timer.

mod events;
mod rx;
mod tx;

use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};

use super::device::{read_config_bytes, serve_queue, ActivateContext, ActivateError};
use super::interrupt::VirtioInterrupt;
use super::state::QueueSnapshot;
use super::{VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, TYPE_NET};
use crate::cli::MacAddress;
use crate::net::{ForwardListeners, Nat, NatConfig, Offloads, SocketRegistry};
use crate::vmm::memory::GuestMemoryMmap;

pub use events::NetEvents;
use rx::{RxPort, Unplugged};
use tx::TxChain;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// What the device offers. Everything here raises throughput through the
/// NAT or is needed by the guest's driver to configure itself; the NAT
/// takes checksum-partial TSO segments from the guest and emits them too.
const FEATURES: u64 = bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_STATUS)
    | F_RING_INDIRECT_DESC
    | F_RING_EVENT_IDX;

/// Everything the VM needs to give a guest its network card.
pub struct NetSettings {
    pub mac: MacAddress,
    pub nat: NatConfig,
    /// Bound before the VM is built, so a busy port fails first.
    pub listeners: ForwardListeners,
}

/// What the device counts besides the NAT's own counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub tx_frames: u64,
    /// TX chains dropped: too short for the header, too long for a frame,
    /// or with device-writable descriptors.
    pub tx_malformed: u64,
    pub rx_frames: u64,
    /// Frames bigger than the buffers the guest posted (it did not
    /// negotiate mergeable buffers and posted small ones).
    pub rx_too_big: u64,
}

/// The queues while the driver has the device running.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
    offloads: Offloads,
    mergeable: bool,
}

pub struct Net {
    mac: MacAddress,
    mtu: u16,
    nat: Nat,
    active: Option<Active>,
    tx_buf: Vec<u8>,
    counters: NetCounters,
}

impl Net {
    pub fn new(settings: NetSettings) -> Self {
        let mtu = settings.nat.mtu;
        Net {
            mac: settings.mac,
            mtu,
            nat: Nat::new(settings.nat, settings.listeners),
            active: None,
            tx_buf: Vec::with_capacity(tx::MAX_CHAIN_BYTES),
            counters: NetCounters::default(),
        }
    }

    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    pub fn nat(&self) -> &Nat {
        &self.nat
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Registers the NAT's forward listeners with the event loop.
    pub fn start(&mut self, reg: &mut dyn SocketRegistry) {
        if let Err(e) = self.nat.start(reg) {
            log::error!("virtio-net: {e}");
        }
    }

    /// The guest notified a queue: TX chains go to the NAT, and either way
    /// the NAT gets another chance to fill RX buffers.
    pub fn queue_notified(&mut self, index: usize, reg: &mut dyn SocketRegistry) {
        if index == TX_QUEUE {
            self.process_tx(reg);
        }
        self.flush(reg);
    }

    /// A host socket of the NAT is ready.
    pub fn nat_event(
        &mut self,
        token: u32,
        events: event_manager::EventSet,
        reg: &mut dyn SocketRegistry,
    ) {
        self.nat.handle_event(token, events, reg);
        self.flush(reg);
    }

    /// The NAT's timer (every [`crate::net::TICK`]).
    pub fn tick(&mut self, reg: &mut dyn SocketRegistry) {
        self.nat.tick(reg);
        self.flush(reg);
    }

    fn process_tx(&mut self, reg: &mut dyn SocketRegistry) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (nat, buf, counters) = (&mut self.nat, &mut self.tx_buf, &mut self.counters);
        let mem = &active.mem;
        let served = serve_queue(&mut active.tx, mem, |chain| {
            match TxChain::read(chain, mem, buf)? {
                TxChain::Frame { hdr, frame } => {
                    counters.tx_frames += 1;
                    nat.handle_frame(&hdr, frame, reg);
                }
                TxChain::Malformed(why) => {
                    counters.tx_malformed += 1;
                    log::debug!("virtio-net: TX chain dropped: {why}");
                }
            }
            // TX buffers are read-only for the device: nothing written.
            Ok(0)
        });
        match served {
            Ok(true) => notify(&mut active.tx, mem, &active.interrupt),
            Ok(false) => {}
            Err(e) => self.broken(&e),
        }
    }

    /// Hands the NAT's queued frames to the guest's RX buffers.
    fn flush(&mut self, reg: &mut dyn SocketRegistry) {
        let Some(active) = self.active.as_mut() else {
            self.nat.flush(&mut Unplugged, reg);
            return;
        };
        let mut port = RxPort::new(
            &mut active.rx,
            &active.mem,
            active.mergeable,
            active.offloads,
            &mut self.counters,
        );
        self.nat.flush(&mut port, reg);
        let (used, fault) = port.finish();
        if let Some(fault) = fault {
            self.broken(&fault);
        } else if used {
            notify(&mut active.rx, &active.mem, &active.interrupt);
        }
    }

    /// The driver broke a queue: stop and ask for a reset (the NAT and its
    /// flows live on; a new driver gets them back).
    fn broken(&mut self, why: &str) {
        log::warn!("virtio-net: {why}; the device needs a reset");
        if let Some(active) = self.active.take() {
            active.interrupt.mark_needs_reset();
        }
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac.octets());
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs (only meaningful with MQ): one pair.
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        config
    }
}

/// Signals used buffers in `queue` when the driver wants to hear of them.
fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt) {
    if queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues.into_iter();
        let rx = queues.next().filter(|q| q.ready());
        let rx = rx.ok_or(ActivateError::QueueNotReady(RX_QUEUE))?;
        let tx = queues.next().filter(|q| q.ready());
        let tx = tx.ok_or(ActivateError::QueueNotReady(TX_QUEUE))?;
        let has = |b: u32| ctx.features & bit(b) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        self.active = Some(Active {
            mem: ctx.mem,
            rx,
            tx,
            interrupt: ctx.interrupt,
            offloads: Offloads {
                csum,
                tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
            },
            mergeable: has(VIRTIO_NET_F_MRG_RXBUF),
        });
        log::info!(
            "virtio-net: up, MAC {}, features {:#x}",
            self.mac,
            ctx.features
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn running_queues(&self) -> Option<Vec<QueueSnapshot>> {
        let active = self.active.as_ref()?;
        Some(vec![
            QueueSnapshot::of(&active.rx),
            QueueSnapshot::of(&active.tx),
        ])
    }

    fn process_queue(&mut self, index: usize) {
        // The machine wires this device's queues to `NetEvents`, which has
        // the event loop the NAT needs; this path only exists for the trait.
        log::debug!("virtio-net: queue {index} notified outside the event loop; ignored");
    }
}

#[cfg(test)]
mod tests;
