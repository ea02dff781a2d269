//! Getting metadata to the disk in a crash-safe order, and growing the image.
//!
//! Stage by stage, each made durable (fdatasync) before the next is written:
//! 1. guest data and refcount blocks (new clusters counted before use),
//! 2. the refcount table, when it points at new blocks,
//! 3. L2 tables (pointing at data that is now durable),
//! 4. the L1 table (pointing at L2 tables that are now durable).
//!
//! Then references dropped from the tables are counted down.

use super::cache::set_be64;
use super::header::{Header, OFF_L1_SIZE, OFF_SIZE};
use super::overlap::Metadata;
use super::{State, L1E_OFFSET_MASK};
use crate::disk::error::{DiskError, Result};

impl State {
    /// Stages 1–2: everything an L2 table may point at becomes durable.
    fn settle_refcounts(&mut self) -> Result<()> {
        if self.rb_cache.any_dirty() || self.unsynced {
            self.write_dirty_refblocks()?;
            self.sync()?;
        }
        if self.reftable_dirty {
            self.write_reftable()?;
            self.sync()?;
        }
        Ok(())
    }

    /// Writes back the L2 table about to be evicted from the cache.
    pub(super) fn make_room_l2(&mut self) -> Result<()> {
        if let Some(v) = self.l2_cache.victim() {
            if self.l2_cache.get(v).dirty {
                self.settle_refcounts()?;
                self.write_l2_slot(v)?;
            }
        }
        Ok(())
    }

    fn write_l2_slot(&mut self, slot: usize) -> Result<()> {
        self.unsynced = true;
        self.l2_cache
            .write_back(slot, &self.file)
            .map_err(|e| self.io_err(e))
    }

    fn write_l1(&mut self) -> Result<()> {
        let bytes: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let off = self.hdr.l1_table_offset;
        self.write_at(&bytes, off)?;
        self.l1_dirty = false;
        Ok(())
    }

    /// Makes every completed write durable, metadata in order.
    pub(super) fn flush(&mut self) -> Result<()> {
        self.settle_refcounts()?;
        if self.l2_cache.any_dirty() {
            for slot in self.l2_cache.dirty_slots() {
                self.write_l2_slot(slot)?;
            }
            self.sync()?;
        }
        if self.l1_dirty {
            self.write_l1()?;
            self.sync()?;
        }
        if !self.pending_free.is_empty() {
            // Nothing durable names these clusters any more.
            self.apply_pending_frees()?;
            // Lost decrements only leak; they are made durable next time.
            self.write_dirty_refblocks()?;
        }
        Ok(())
    }

    /// Flushes everything, including the last refcount decrements.
    pub(super) fn close(&mut self) -> Result<()> {
        self.flush()?;
        if self.unsynced {
            self.sync()?;
        }
        Ok(())
    }

    /// Grows the virtual size, moving the L1 table when it must grow.
    pub(super) fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_intact()?;
        if new_size < self.hdr.size {
            return Err(DiskError::Shrink {
                path: self.path.clone(),
                current: self.hdr.size,
                requested: new_size,
            });
        }
        if new_size > super::header::MAX_VIRTUAL_SIZE {
            return Err(DiskError::InvalidArgument(format!(
                "size {new_size} is too large for a qcow2 image"
            )));
        }
        self.flush()?;
        let needed = Header::l1_entries_for(new_size, self.cluster_bits);
        if needed > self.l1.len() as u64 {
            if needed * 8 > super::header::MAX_L1_BYTES {
                return Err(DiskError::InvalidArgument(format!(
                    "size {new_size} needs an L1 table over 32 MiB; use a larger cluster size"
                )));
            }
            let clusters = (needed * 8).div_ceil(self.cs);
            let (offset, _) = self.alloc_clusters(clusters)?;
            self.record_metadata(offset / self.cs, clusters, Metadata::L1Table)?;
            let mut table = vec![0u8; (clusters * self.cs) as usize];
            for (i, e) in self.l1.iter().enumerate() {
                set_be64(&mut table, i, *e);
            }
            self.write_at(&table, offset)?;
            self.settle_refcounts()?;
            let old = (self.hdr.l1_table_offset, self.l1.len() as u64);
            let mut field = [0u8; 12];
            field[..4].copy_from_slice(&(needed as u32).to_be_bytes());
            field[4..].copy_from_slice(&offset.to_be_bytes());
            self.write_at(&field, OFF_L1_SIZE)?;
            self.sync()?;
            let old_clusters = (old.1 * 8).div_ceil(self.cs);
            self.forget_metadata(old.0 / self.cs, old_clusters);
            self.hdr.l1_table_offset = offset;
            self.hdr.l1_size = needed as u32;
            self.l1.resize(needed as usize, 0);
            if old.0 != 0 && old.1 != 0 {
                self.pending_free.push((old.0, old.1 * 8));
            }
        }
        self.write_at(&new_size.to_be_bytes(), OFF_SIZE)?;
        self.sync()?;
        self.hdr.size = new_size;
        self.close()
    }

    /// The L1 entry's L2 offset, checked.
    pub(super) fn l2_offset(&self, l1_index: usize) -> Result<u64> {
        let off = self.l1[l1_index] & L1E_OFFSET_MASK;
        if off != 0 && (off % self.cs != 0 || off.saturating_add(self.cs) > self.file_len) {
            return Err(self.corrupt(format!(
                "L2 table at {off:#x} is misaligned or outside the file"
            )));
        }
        Ok(off)
    }
}
