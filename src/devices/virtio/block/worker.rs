//! Serving a disk's request queue: each request goes to the `BlockBackend`
//! and is answered with a status byte (virtio 1.2, section 5.2.6).

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;

use super::guest_io;
use super::request::{self, read_bufs, total_len, write_bufs, GuestBuf, Request};
use super::{
    ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
    SECTOR_SIZE,
};
use crate::devices::virtio::events::QueueHandler;
use crate::devices::virtio::fault::DriverFault;
use crate::devices::virtio::interrupt::VirtioInterrupt;
use crate::devices::virtio::queue::QueueService;
use crate::disk::BlockBackend;
use crate::vmm::memory::GuestMemoryMmap;

// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Discard and write-zeroes segment: le64 sector, le32 num_sectors,
/// le32 flags.
const SEGMENT_LEN: u64 = 16;
/// Write-zeroes flag: the range may be deallocated.
const FLAG_UNMAP: u32 = 1;

struct Active {
    service: QueueService,
    queue: Queue,
    /// The driver did not take VIRTIO_BLK_F_FLUSH: every write must be
    /// durable before it completes (a write-through cache).
    write_through: bool,
}

/// The queue side of a disk: runs on the disk's I/O thread.
pub struct BlockWorker {
    backend: Arc<dyn BlockBackend>,
    read_only: bool,
    capacity_bytes: u64,
    serial: [u8; ID_BYTES],
    active: Option<Active>,
}

impl BlockWorker {
    pub fn new(backend: Arc<dyn BlockBackend>, read_only: bool, serial: [u8; ID_BYTES]) -> Self {
        // The guest sees whole sectors; a tail shorter than one is hidden.
        let capacity_bytes = backend.size() / SECTOR_SIZE * SECTOR_SIZE;
        BlockWorker {
            backend,
            read_only,
            capacity_bytes,
            serial,
            active: None,
        }
    }

    pub fn start(
        &mut self,
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<VirtioInterrupt>,
        write_through: bool,
    ) {
        let name = format!("virtio-blk {}", self.backend.path().display());
        self.active = Some(Active {
            service: QueueService::new(name, mem, interrupt),
            queue,
            write_through,
        });
    }

    pub fn stop(&mut self) {
        self.active = None;
    }

    /// The image requests go to.
    pub fn backend(&self) -> Arc<dyn BlockBackend> {
        self.backend.clone()
    }

    /// Sends later requests to `backend` (same size: a live snapshot's new
    /// overlay over the old image); returns the old one.
    pub fn replace_backend(&mut self, backend: Arc<dyn BlockBackend>) -> Arc<dyn BlockBackend> {
        debug_assert_eq!(
            backend.size() / SECTOR_SIZE * SECTOR_SIZE,
            self.capacity_bytes
        );
        std::mem::replace(&mut self.backend, backend)
    }

    /// Serves every available request and interrupts the driver if it
    /// wants to hear of it; a broken chain stops the device until reset.
    pub fn process(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let disk = Disk {
            backend: &*self.backend,
            read_only: self.read_only,
            capacity_bytes: self.capacity_bytes,
            serial: &self.serial,
            write_through: active.write_through,
        };
        let service = &active.service;
        let mem = service.mem();
        let served = service.serve(&mut active.queue, |chain| {
            let req = request::parse(chain, mem).map_err(DriverFault::from)?;
            let (status, written) = disk.execute(mem, &req);
            mem.write_obj(status, req.status)
                .map_err(|_| DriverFault::outside_memory(req.status, 1))?;
            Ok(written.saturating_add(1))
        });
        if served.is_err() {
            self.active = None;
        }
    }
}

impl QueueHandler for BlockWorker {
    fn handle_queue(&mut self, _index: usize) {
        self.process();
    }
}

/// What a request needs to know of the disk.
struct Disk<'a> {
    backend: &'a dyn BlockBackend,
    read_only: bool,
    capacity_bytes: u64,
    serial: &'a [u8; ID_BYTES],
    write_through: bool,
}

impl Disk<'_> {
    /// Runs `req`; returns its status and the bytes written into the
    /// driver's buffers (the status byte aside).
    fn execute(&self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        match req.kind {
            T_IN => self.read(mem, req),
            T_OUT => (self.write(mem, req), 0),
            T_FLUSH => (self.flush(), 0),
            T_GET_ID => match write_bufs(mem, &req.writable, self.serial) {
                Ok(n) => (S_OK, n as u32),
                Err(_) => (S_IOERR, 0),
            },
            T_DISCARD | T_WRITE_ZEROES => (self.zero_ranges(mem, req), 0),
            other => {
                crate::debug_limited!("virtio-blk: unsupported request type {other}");
                (S_UNSUPP, 0)
            }
        }
    }

    /// The byte offset of `sectors` sectors at `sector`, when the whole
    /// range lies on the disk.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        (offset.checked_add(bytes)? <= self.capacity_bytes).then_some(offset)
    }

    /// Data lengths must be whole sectors and the range on the disk.
    fn data_range(&self, req: &Request, bufs: &[GuestBuf]) -> Option<(u64, u64)> {
        let len = total_len(bufs);
        if len % SECTOR_SIZE != 0 {
            crate::debug_limited!("virtio-blk: {len}-byte transfer is not whole sectors");
            return None;
        }
        match self.range(req.sector, len) {
            Some(offset) => Some((offset, len)),
            None => {
                crate::debug_limited!(
                    "virtio-blk: {len} bytes at sector {} lie beyond the disk's end",
                    req.sector
                );
                None
            }
        }
    }

    fn read(&self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u32) {
        let Some((offset, len)) = self.data_range(req, &req.writable) else {
            return (S_IOERR, 0);
        };
        let Ok(len) = u32::try_from(len) else {
            return (S_IOERR, 0);
        };
        let Ok(mut bufs) = guest_io::slices_mut(mem, &req.writable) else {
            return (S_IOERR, 0);
        };
        match self.backend.read_vectored_at(offset, &mut bufs) {
            Ok(()) => (S_OK, len),
            Err(e) => {
                crate::warn_limited!("virtio-blk: read failed: {e}");
                (S_IOERR, 0)
            }
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, req: &Request) -> u8 {
        if self.read_only {
            return S_IOERR;
        }
        let Some((offset, _)) = self.data_range(req, &req.readable) else {
            return S_IOERR;
        };
        let Ok(bufs) = guest_io::slices(mem, &req.readable) else {
            return S_IOERR;
        };
        if let Err(e) = self.backend.write_vectored_at(offset, &bufs) {
            crate::warn_limited!("virtio-blk: write failed: {e}");
            return S_IOERR;
        }
        if self.write_through {
            return self.flush();
        }
        S_OK
    }

    /// Everything written before is durable when this returns OK.
    fn flush(&self) -> u8 {
        if self.read_only {
            return S_OK;
        }
        match self.backend.flush() {
            Ok(()) => S_OK,
            Err(e) => {
                crate::warn_limited!("virtio-blk: flush failed: {e}");
                S_IOERR
            }
        }
    }

    /// DISCARD and WRITE_ZEROES: every segment is checked before any is
    /// applied.
    fn zero_ranges(&self, mem: &GuestMemoryMmap, req: &Request) -> u8 {
        if self.read_only {
            return S_IOERR;
        }
        let discard = req.kind == T_DISCARD;
        let (max_seg, max_sectors) = if discard {
            (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
        } else {
            (MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
        };
        let len = total_len(&req.readable);
        let count = len / SEGMENT_LEN;
        if len % SEGMENT_LEN != 0 || count == 0 || count > u64::from(max_seg) {
            return S_IOERR;
        }
        let mut raw = vec![0u8; len as usize];
        if read_bufs(mem, &req.readable, &mut raw).is_err() {
            return S_IOERR;
        }
        let mut ranges = Vec::with_capacity(count as usize);
        for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            // Discard takes no flags; write-zeroes only UNMAP (5.2.6.2).
            let known = if discard { 0 } else { FLAG_UNMAP };
            if flags & !known != 0 {
                return S_UNSUPP;
            }
            if sectors > max_sectors {
                return S_IOERR;
            }
            let bytes = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = self.range(sector, bytes) else {
                return S_IOERR;
            };
            ranges.push((offset, bytes));
        }
        for (offset, bytes) in ranges {
            let done = if discard {
                self.backend.discard(offset, bytes)
            } else {
                self.backend.write_zeroes(offset, bytes)
            };
            if let Err(e) = done {
                crate::warn_limited!("virtio-blk: zeroing failed: {e}");
                return S_IOERR;
            }
        }
        if self.write_through {
            return self.flush();
        }
        S_OK
    }
}
