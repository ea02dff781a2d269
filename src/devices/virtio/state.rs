//! A virtio device's state in a VM snapshot: the transport's registers and
//! queue setup, and the positions of the queues the device serves.
//!
//! Restoring a started device does what the driver's DRIVER_OK did: the
//! device is activated, with queues that continue from the saved ring
//! positions, and the machine then notifies every queue once, so requests
//! the guest posted before the save are served after it.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// virtio-queue's `QueueState`, serialisable. Untrusted when read back:
/// `Queue::try_from` checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    pub fn of(queue: &Queue) -> Self {
        queue.state().into()
    }

    /// The queue this describes, if it is a valid one.
    pub fn to_queue(self) -> Result<Queue, TransportStateError> {
        Queue::try_from(QueueState::from(self))
            .map_err(|e| TransportStateError::BadQueue(format!("{e:?}")))
    }
}

/// Why a saved virtio device does not fit the device it is restored into.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("device type {saved} with {saved_queues} queue(s) saved where type {here} with {here_queues} is")]
    OtherDevice {
        saved: u32,
        saved_queues: usize,
        here: u32,
        here_queues: usize,
    },
    #[error("bad queue state: {0}")]
    BadQueue(String),
    #[error("driver features {0:#x} the device does not offer")]
    Features(u64),
    #[error("running queues saved for a device the driver had not started")]
    NotStarted,
    #[error("cannot restart the device: {0}")]
    Activate(#[from] super::device::ActivateError),
}

/// One virtio-mmio device: what the driver programmed, and where its
/// queues stood when the device was running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    /// The queue registers as the driver set them.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own queues while it runs (DRIVER_OK): their positions.
    pub running_queues: Option<Vec<QueueSnapshot>>,
    /// Interrupt status (ISR) bits not yet acknowledged.
    pub interrupt_status: u32,
    pub needs_reset: bool,
}
