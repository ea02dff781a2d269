//! What a virtio device model implements, independent of the transport.

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;

use super::events::QueueHandler;
use super::interrupt::VirtioInterrupt;
use super::queue::QueueService;
use super::state::QueueSnapshot;
use crate::vmm::memory::GuestMemoryMmap;

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// One per queue the device declared; queues the driver did not enable
    /// are present but not ready.
    pub queues: Vec<Queue>,
    pub interrupt: Arc<VirtioInterrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

impl ActivateContext {
    /// What the device named `device` (for the log) serves its queues with.
    pub fn service(&self, device: impl Into<String>) -> QueueService {
        QueueService::new(device, self.mem.clone(), self.interrupt.clone())
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is required but the driver did not enable it")]
    QueueNotReady(usize),
}

/// A virtio device model.
///
/// `activate`, `reset` and `process_queue` run with the device locked;
/// `process_queue` runs on the event-loop thread when the guest notifies.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`TYPE_*`).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered to the driver, `F_VERSION_1` included.
    fn device_features(&self) -> u64;

    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the configuration space; most devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::debug_limited!(
            "virtio: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    /// The driver set DRIVER_OK: take the queues and start.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// The driver reset the device: drop the queues and go back to the
    /// state before activation.
    fn reset(&mut self);

    /// The guest notified queue `index`.
    fn process_queue(&mut self, index: usize);

    /// Queue work too slow for the shared event loop (a disk's fdatasync
    /// takes milliseconds): the handler that the device's own I/O thread
    /// runs instead of `process_queue`, without the device lock, so that
    /// vCPUs reading the configuration space never wait for I/O. `None`
    /// (the default): the main event loop calls `process_queue`.
    fn io_thread_handler(&self) -> Option<Arc<Mutex<dyn QueueHandler>>> {
        None
    }

    /// The queues the device serves while it runs, where they stand now
    /// (for a VM snapshot, taken with the device and its I/O thread
    /// handler locked); None while the driver has not started it. A device
    /// with an I/O thread handler holds its queues there, and the snapshot
    /// asks the handler ([`QueueHandler::running_queues`]).
    fn running_queues(&self) -> Option<Vec<QueueSnapshot>>;

    /// For a card whose NAT runs in this process: its TCP flows, which a
    /// suspend saves so that the resumed VM can reset them in the guest.
    fn saved_flows(&self) -> Option<crate::net::SavedFlows> {
        None
    }

    /// On resume: resets, in the guest, the flows a suspend saved.
    fn reset_saved_flows(&mut self, _saved: &crate::net::SavedFlows) {}
}

/// Copies `data` (the bytes of a configuration structure) into `out` at
/// `offset`, as far as they overlap; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, out: &mut [u8]) {
    out.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = out.len().min(config.len() - start);
    out[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        read_config_bytes(&config, 9, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
