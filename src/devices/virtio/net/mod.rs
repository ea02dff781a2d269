//! virtio-net: one of the guest's cards (`eth0`, `eth1`, ...: one device
//! per `--net`, each its own virtio-mmio slot), on a [`NetBackend`]: the
//! userspace NAT (`--net user`), a lab network's switch port (`--net
//! NAME`) or an existing TAP device (`--net tap:DEV`).
//!
//! Two queues: RX (0), where the guest posts buffers that the backend's
//! frames fill, and TX (1), whose chains go to the backend. Every
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

mod backend;
mod events;
mod rx;
mod tap;
mod tx;

use std::sync::Arc;

use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};

use super::device::{read_config_bytes, ActivateContext, ActivateError};
use super::queue::QueueService;
use super::state::QueueSnapshot;
use super::{VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, TYPE_NET};
use crate::cli::MacAddress;
use crate::net::{ForwardListeners, Nat, NatConfig, NatView, Offloads, SocketRegistry};

pub use backend::NetBackend;
pub use events::NetEvents;
use rx::{RxPort, Unplugged};
pub use tap::{TapCounters, TapLink};
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
    pub mtu: u16,
    pub backend: Box<dyn NetBackend>,
    /// What `nat show` sees when the NAT is not in this process (a lab
    /// network's member); None: the backend's own NAT.
    pub nat_view: Option<Arc<dyn NatView>>,
}

impl NetSettings {
    /// A card behind its own NAT; `listeners` were bound before the VM is
    /// built, so a busy port fails first.
    pub fn nat(mac: MacAddress, nat: NatConfig, listeners: ForwardListeners) -> Self {
        NetSettings {
            mac,
            mtu: nat.mtu,
            backend: Box::new(Nat::new(nat, listeners)),
            nat_view: None,
        }
    }
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
    service: QueueService,
    rx: Queue,
    tx: Queue,
    offloads: Offloads,
    mergeable: bool,
}

pub struct Net {
    mac: MacAddress,
    mtu: u16,
    backend: Box<dyn NetBackend>,
    active: Option<Active>,
    tx_buf: Vec<u8>,
    /// TX chains wait in their ring until the backend has room.
    tx_paused: bool,
    counters: NetCounters,
}

impl Net {
    pub fn new(settings: NetSettings) -> Self {
        Net {
            mac: settings.mac,
            mtu: settings.mtu,
            backend: settings.backend,
            active: None,
            tx_buf: Vec::with_capacity(tx::MAX_CHAIN_BYTES),
            tx_paused: false,
            counters: NetCounters::default(),
        }
    }

    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    /// The NAT, when it runs in this process (not for a lab network's
    /// member: its NAT is the network's).
    pub fn nat(&self) -> Option<&Nat> {
        self.backend.nat()
    }

    /// Whether the backend wants the device's timer.
    pub fn needs_tick(&self) -> bool {
        self.backend.needs_tick()
    }

    pub fn owns_token(&self, token: u32) -> bool {
        self.backend.owns_token(token)
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Registers the backend's descriptors with the event loop.
    pub fn start(&mut self, reg: &mut dyn SocketRegistry) {
        self.backend.start(reg);
    }

    /// The guest notified a queue: TX chains go to the backend, and either
    /// way the backend gets another chance to fill RX buffers.
    pub fn queue_notified(&mut self, index: usize, reg: &mut dyn SocketRegistry) {
        if index == TX_QUEUE {
            self.process_tx(reg);
        }
        self.flush(reg);
    }

    /// A descriptor of the backend is ready.
    pub fn backend_event(
        &mut self,
        token: u32,
        events: event_manager::EventSet,
        reg: &mut dyn SocketRegistry,
    ) {
        self.backend.event(token, events, reg);
        self.resume_tx(reg);
        self.flush(reg);
    }

    /// The backend's timer (every [`crate::net::TICK`]).
    pub fn tick(&mut self, reg: &mut dyn SocketRegistry) {
        self.backend.tick(reg);
        self.resume_tx(reg);
        self.flush(reg);
    }

    /// Whether the guest's TX chains wait for the backend.
    pub fn tx_paused(&self) -> bool {
        self.tx_paused
    }

    /// Takes TX chains again once a paused backend has room.
    fn resume_tx(&mut self, reg: &mut dyn SocketRegistry) {
        if self.tx_paused && self.backend.can_take_frame() {
            self.process_tx(reg);
        }
    }

    fn process_tx(&mut self, reg: &mut dyn SocketRegistry) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (backend, buf, counters) = (&mut self.backend, &mut self.tx_buf, &mut self.counters);
        let service = &active.service;
        // Asked before each chain: a full backend pauses the queue.
        let full = std::cell::Cell::new(!backend.can_take_frame());
        let served = service.serve_while(
            &mut active.tx,
            || !full.get(),
            |chain| {
                match TxChain::read(chain, service.mem(), buf)? {
                    TxChain::Frame { hdr, frame } => {
                        counters.tx_frames += 1;
                        backend.guest_frame(&hdr, frame, reg);
                        full.set(!backend.can_take_frame());
                    }
                    TxChain::Malformed(why) => {
                        counters.tx_malformed += 1;
                        crate::debug_limited!("virtio-net: TX chain dropped: {why}");
                    }
                }
                // TX buffers are read-only for the device: nothing written.
                Ok(0)
            },
        );
        self.tx_paused = full.get();
        if served.is_err() {
            // The NAT and its flows live on; a new driver gets them back.
            self.active = None;
        }
    }

    /// Hands the backend's frames to the guest's RX buffers.
    fn flush(&mut self, reg: &mut dyn SocketRegistry) {
        let Some(active) = self.active.as_mut() else {
            self.backend.flush(&mut Unplugged, reg);
            return;
        };
        let mut port = RxPort::new(
            &mut active.rx,
            &active.service,
            active.mergeable,
            active.offloads,
            &mut self.counters,
        );
        self.backend.flush(&mut port, reg);
        let outcome = port.finish();
        if active.service.finish(&mut active.rx, outcome).is_err() {
            self.active = None;
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

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let accepts = self.backend.accepts();
        let mut features = FEATURES;
        if !accepts.csum {
            features &= !(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4));
        }
        if !accepts.tso4 {
            features &= !bit(VIRTIO_NET_F_HOST_TSO4);
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let service = ctx.service("virtio-net");
        let mut queues = ctx.queues.into_iter();
        let rx = queues.next().filter(|q| q.ready());
        let rx = rx.ok_or(ActivateError::QueueNotReady(RX_QUEUE))?;
        let tx = queues.next().filter(|q| q.ready());
        let tx = tx.ok_or(ActivateError::QueueNotReady(TX_QUEUE))?;
        let has = |b: u32| ctx.features & bit(b) != 0;
        let csum = has(VIRTIO_NET_F_GUEST_CSUM);
        self.active = Some(Active {
            service,
            rx,
            tx,
            offloads: Offloads {
                csum,
                tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
            },
            mergeable: has(VIRTIO_NET_F_MRG_RXBUF),
        });
        self.tx_paused = false;
        crate::info_limited!(
            "virtio-net: up, MAC {}, features {:#x}",
            self.mac,
            ctx.features
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.tx_paused = false;
    }

    fn saved_flows(&self) -> Option<crate::net::SavedFlows> {
        self.backend.nat().map(Nat::saved_flows)
    }

    fn reset_saved_flows(&mut self, saved: &crate::net::SavedFlows) {
        if let Some(nat) = self.backend.nat_mut() {
            nat.reset_saved_flows(saved);
        }
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
        crate::debug_limited!("virtio-net: queue {index} notified outside the event loop; ignored");
    }
}

#[cfg(test)]
mod tests;
