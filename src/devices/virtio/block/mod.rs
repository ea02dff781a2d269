//! virtio-blk (virtio 1.2, section 5.2) on the disk layer's `BlockBackend`.
//!
//! The device is split like every virtio device here: `Block` is what the
//! transport sees (features, configuration space, activation), while
//! `BlockWorker` owns the request queue and does the I/O. The worker runs
//! on the disk's own I/O thread (see `io_thread`), not on the main event
//! loop: a read, a write or an fdatasync can take milliseconds, which would
//! stall the console, the NAT and other disks sharing that loop; and since
//! the worker has its own lock, a vCPU reading the configuration space
//! never waits for a request in flight either.

mod guest_io;
pub mod request;
#[cfg(test)]
mod tests;
mod worker;

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::device::{read_config_bytes, ActivateContext, ActivateError, VirtioDevice};
use super::events::QueueHandler;
use super::state::QueueSnapshot;
use super::{F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, TYPE_BLOCK};
use crate::devices::bus::lock;
use crate::disk::BlockBackend;
use virtio_queue::QueueT;
pub use worker::{
    BlockWorker, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};

// Feature bits (5.2.3).
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// virtio-blk counts in 512-byte sectors whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer; shorter IDs are NUL-padded.
pub const ID_BYTES: usize = 20;
const QUEUE_SIZE: u16 = 256;
/// Largest single discard or write-zeroes segment (1 GiB) and segments per
/// request: the worker thread stays responsive to a flush behind them.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
pub const MAX_DISCARD_SEG: u32 = 32;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;
/// Length of `struct virtio_blk_config` up to write_zeroes_may_unmap.
const CONFIG_LEN: usize = 60;

/// A virtio-blk device serving one image.
pub struct Block {
    features: u64,
    config: [u8; CONFIG_LEN],
    worker: Arc<Mutex<BlockWorker>>,
}

impl Block {
    /// A disk on `backend`; `read_only` offers VIRTIO_BLK_F_RO and refuses
    /// writes. `serial` is what GET_ID answers (see `disk_serial`).
    pub fn new(backend: Arc<dyn BlockBackend>, read_only: bool, serial: [u8; ID_BYTES]) -> Self {
        let read_only = read_only || backend.is_read_only();
        let mut features =
            F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC;
        features |= if read_only {
            F_RO
        } else {
            F_DISCARD | F_WRITE_ZEROES
        };
        let config = config_space(backend.size() / SECTOR_SIZE);
        Block {
            features,
            config,
            worker: Arc::new(Mutex::new(BlockWorker::new(backend, read_only, serial))),
        }
    }

    /// The worker, for the I/O thread and for tests.
    pub fn worker(&self) -> Arc<Mutex<BlockWorker>> {
        self.worker.clone()
    }
}

/// `struct virtio_blk_config` (5.2.4), little endian.
fn config_space(capacity_sectors: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put32 = |c: &mut [u8; CONFIG_LEN], at: usize, v: u32| {
        c[at..at + 4].copy_from_slice(&v.to_le_bytes())
    };
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    // seg_max: the header and the status take a descriptor each.
    put32(&mut c, 12, u32::from(QUEUE_SIZE) - 2);
    put32(&mut c, 20, SECTOR_SIZE as u32); // blk_size
    put32(&mut c, 36, MAX_DISCARD_SECTORS);
    put32(&mut c, 40, MAX_DISCARD_SEG);
    put32(&mut c, 44, 1); // discard_sector_alignment
    put32(&mut c, 48, MAX_WRITE_ZEROES_SECTORS);
    put32(&mut c, 52, MAX_WRITE_ZEROES_SEG);
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// The disk's serial number (GET_ID, /sys/block/vdX/serial): the image's
/// file name, printable ASCII, cut to 20 bytes; `fallback` (e.g. the VM's
/// name and the disk's index) when that leaves nothing.
pub fn disk_serial(path: &Path, fallback: &str) -> [u8; ID_BYTES] {
    let printable = |s: &str| -> Vec<u8> {
        s.bytes()
            .filter(|b| b.is_ascii_graphic())
            .take(ID_BYTES)
            .collect()
    };
    let mut bytes = path
        .file_name()
        .map(|n| printable(&n.to_string_lossy()))
        .unwrap_or_default();
    if bytes.is_empty() {
        bytes = printable(fallback);
    }
    let mut id = [0u8; ID_BYTES];
    id[..bytes.len()].copy_from_slice(&bytes);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx.queues.into_iter().next().filter(|q| q.ready());
        let queue = queue.ok_or(ActivateError::QueueNotReady(0))?;
        let write_through = ctx.features & F_FLUSH == 0;
        lock(&self.worker).start(ctx.mem, queue, ctx.interrupt, write_through);
        Ok(())
    }

    fn reset(&mut self) {
        // Waits for the request in flight, as a reset must.
        lock(&self.worker).stop();
    }

    fn process_queue(&mut self, _index: usize) {
        lock(&self.worker).process();
    }

    fn io_thread_handler(&self) -> Option<Arc<Mutex<dyn QueueHandler>>> {
        Some(self.worker.clone())
    }

    fn running_queues(&self) -> Option<Vec<QueueSnapshot>> {
        QueueHandler::running_queues(&*lock(&self.worker))
    }
}
