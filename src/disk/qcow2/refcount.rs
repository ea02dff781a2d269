//! Refcounts and cluster allocation. New refcount blocks and a grown refcount
//! table describe themselves; the table and header are only pointed at new
//! structures once those are durable.

use super::cache::{get_refcount, set_refcount};
use super::header::OFF_REFTABLE_OFFSET;
use super::overlap::Metadata;
use super::{State, REFT_OFFSET_MASK};
use crate::disk::error::Result;

impl State {
    fn refcount_order(&self) -> u32 {
        self.hdr.refcount_order
    }

    /// log2 of the number of entries in one refcount block.
    fn rb_entry_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order()
    }

    fn refcount_max(&self) -> u64 {
        match self.refcount_order() {
            6 => u64::MAX,
            o => (1u64 << (1 << o)) - 1,
        }
    }

    /// Cache slot of the refcount block at `offset`, loading it.
    fn refblock_slot(&mut self, offset: u64) -> Result<usize> {
        if let Some(slot) = self.rb_cache.find(offset) {
            return Ok(slot);
        }
        if offset % self.cs != 0 || offset.saturating_add(self.cs) > self.file_len {
            return Err(self.corrupt(format!(
                "refcount block at {offset:#x} lies outside the file"
            )));
        }
        let mut data = vec![0u8; self.cs as usize];
        super::read_exact(&self.file, &self.path, &mut data, offset)?;
        self.make_room_refblock()?;
        Ok(self.rb_cache.insert(offset, data, false))
    }

    /// Writes back the refcount block about to be evicted. Refcount blocks
    /// may reach the disk early: an early increment is at worst a leak, and
    /// decrements are only applied once their references are gone for good.
    fn make_room_refblock(&mut self) -> Result<()> {
        if let Some(v) = self.rb_cache.victim() {
            if self.rb_cache.get(v).dirty {
                self.unsynced = true;
                self.rb_cache
                    .write_back(v, &self.file)
                    .map_err(|e| self.io_err(e))?;
            }
        }
        Ok(())
    }

    /// Refcount of host cluster `index` (0 where no block exists).
    pub(super) fn refcount(&mut self, index: u64) -> Result<u64> {
        let t = index >> self.rb_entry_bits();
        let Some(&entry) = self.reftable.get(t as usize) else {
            return Ok(0);
        };
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let slot = self.refblock_slot(off)?;
        let i = (index & ((1 << self.rb_entry_bits()) - 1)) as usize;
        Ok(get_refcount(
            &self.rb_cache.get(slot).data,
            i,
            self.refcount_order(),
        ))
    }

    /// Adds `delta` to the refcount of cluster `index`, creating refcount
    /// blocks (and growing the table) as needed. Returns the new count.
    pub(super) fn update_refcount(&mut self, index: u64, delta: i64) -> Result<u64> {
        let slot = if delta >= 0 {
            self.refblock_for(index)?
        } else {
            // A count going down must exist already; never build tables
            // for an offset a (possibly hostile) L2 entry made up.
            let entry = self
                .reftable
                .get((index >> self.rb_entry_bits()) as usize)
                .copied();
            match entry.map(|e| e & REFT_OFFSET_MASK) {
                Some(off) if off != 0 => self.refblock_slot(off)?,
                _ => {
                    return Err(
                        self.corrupt(format!("cluster {index} is in use but has no refcount"))
                    )
                }
            }
        };
        let i = (index & ((1 << self.rb_entry_bits()) - 1)) as usize;
        let order = self.refcount_order();
        let old = get_refcount(&self.rb_cache.get(slot).data, i, order);
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
                .filter(|&n| n <= self.refcount_max())
        } else {
            old.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            return Err(self.corrupt(format!(
                "refcount of cluster {index} would leave its range (is {old})"
            )));
        };
        let t = self.rb_cache.get_mut(slot);
        set_refcount(&mut t.data, i, order, new);
        t.dirty = true;
        if new == 0 {
            self.free_hint = self.free_hint.min(index);
        }
        Ok(new)
    }

    /// The cache slot of the refcount block covering cluster `index`,
    /// creating the block if it does not exist yet.
    fn refblock_for(&mut self, index: u64) -> Result<usize> {
        let t = index >> self.rb_entry_bits();
        if t as usize >= self.reftable.len() {
            self.grow_reftable(t + 1)?;
        }
        let off = self.reftable[t as usize] & REFT_OFFSET_MASK;
        if off != 0 {
            return self.refblock_slot(off);
        }
        // Place the new block at the first free cluster past the hint (the
        // caller has moved the hint past what it is allocating).
        let b = self.find_free(1)?;
        self.free_hint = b + 1;
        self.record_metadata(b, 1, Metadata::RefcountBlock)?;
        let block_off = b * self.cs;
        self.claim(block_off, self.cs)?;
        self.make_room_refblock()?;
        let slot = self
            .rb_cache
            .insert(block_off, vec![0u8; self.cs as usize], true);
        self.reftable[t as usize] = block_off;
        self.reftable_dirty = true;
        if b >> self.rb_entry_bits() == t {
            // The block counts itself.
            let i = (b & ((1 << self.rb_entry_bits()) - 1)) as usize;
            let order = self.refcount_order();
            set_refcount(&mut self.rb_cache.get_mut(slot).data, i, order, 1);
        } else {
            self.update_refcount(b, 1)?;
        }
        // Refcount updates above may have moved blocks around in the cache.
        self.refblock_slot(block_off)
    }

    /// First run of `n` free clusters at or after the hint.
    fn find_free(&mut self, n: u64) -> Result<u64> {
        let mut start = self.free_hint;
        let mut run = 0;
        let mut idx = start;
        while run < n {
            if self.refcount(idx)? == 0 {
                run += 1;
            } else {
                run = 0;
                start = idx + 1;
            }
            idx += 1;
        }
        self.check_allocation(start, n)?;
        Ok(start)
    }

    /// Extends the file so that `[offset, offset + len)` exists, ahead by an
    /// eighth of its size (1 MiB to 64 MiB): a truncate per cluster would
    /// cost more than the writes. The slack is a hole, free in every sense.
    pub(super) fn claim(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        if end > self.file_len {
            let step = (self.file_len / 8).clamp(1 << 20, 64 << 20).max(self.cs);
            let new_len = end.div_ceil(step) * step;
            self.file.set_len(new_len).map_err(|e| self.io_err(e))?;
            self.file_len = new_len;
            self.unsynced = true;
        }
        Ok(())
    }

    /// Allocates `n` contiguous clusters. Returns their host offset and
    /// whether they are known to read as zeroes already (never written).
    pub(super) fn alloc_clusters(&mut self, n: u64) -> Result<(u64, bool)> {
        let start = self.find_free(n)?;
        self.free_hint = start + n;
        let offset = start * self.cs;
        let len = n * self.cs;
        let fresh = offset >= self.known_zero_from;
        self.claim(offset, len)?;
        for i in 0..n {
            self.update_refcount(start + i, 1)?;
        }
        self.known_zero_from = self.known_zero_from.max(offset + len);
        Ok((offset, fresh))
    }

    /// Replaces the refcount table with one of at least `min_entries`
    /// entries, written elsewhere and switched to through the header.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let per_cluster = self.cs / 8;
        let old_entries = self.reftable.len() as u64;
        let old_offset = self.hdr.refcount_table_offset;
        let old_clusters = self.hdr.refcount_table_clusters as u64;
        // Room for the table itself and a few new blocks.
        let mut entries = min_entries.max(old_entries * 2).max(per_cluster);
        if entries * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(self.corrupt("refcount table would exceed 8 MiB"));
        }
        let (start, clusters) = loop {
            let clusters = entries.div_ceil(per_cluster);
            let start = self.find_free(clusters)?;
            let needed = ((start + clusters + 8) >> self.rb_entry_bits()) + 1;
            if needed <= clusters * per_cluster {
                break (start, clusters);
            }
            entries = needed;
        };
        if clusters * self.cs > super::header::MAX_REFTABLE_BYTES {
            return Err(self.corrupt("refcount table would exceed 8 MiB"));
        }
        self.free_hint = start + clusters;
        self.record_metadata(start, clusters, Metadata::RefcountTable)?;
        let offset = start * self.cs;
        self.claim(offset, clusters * self.cs)?;
        self.known_zero_from = self.known_zero_from.max(offset + clusters * self.cs);
        self.reftable.resize((clusters * per_cluster) as usize, 0);
        for i in 0..clusters {
            self.update_refcount(start + i, 1)?;
        }
        // New blocks first, then the table, then the header: each durable
        // before anything points at it.
        self.write_dirty_refblocks()?;
        self.sync()?;
        self.hdr.refcount_table_offset = offset;
        self.hdr.refcount_table_clusters = clusters as u32;
        self.write_reftable()?;
        self.sync()?;
        let mut field = [0u8; 12];
        field[..8].copy_from_slice(&offset.to_be_bytes());
        field[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.write_at(&field, OFF_REFTABLE_OFFSET)?;
        self.sync()?;
        self.forget_metadata(old_offset / self.cs, old_clusters);
        if old_offset != 0 {
            for i in 0..old_clusters {
                self.update_refcount(old_offset / self.cs + i, -1)?;
            }
        }
        Ok(())
    }

    pub(super) fn write_reftable(&mut self) -> Result<()> {
        let bytes: Vec<u8> = self.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        let off = self.hdr.refcount_table_offset;
        self.write_at(&bytes, off)?;
        self.reftable_dirty = false;
        Ok(())
    }

    pub(super) fn write_dirty_refblocks(&mut self) -> Result<()> {
        for slot in self.rb_cache.dirty_slots() {
            self.unsynced = true;
            self.rb_cache
                .write_back(slot, &self.file)
                .map_err(|e| self.io_err(e))?;
        }
        Ok(())
    }

    /// Counts down what was queued for freeing, once the tables that dropped
    /// those references are durable; clusters reaching zero are punched out
    /// of the file.
    pub(super) fn apply_pending_frees(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending_free);
        for (offset, len) in pending {
            let first = offset / self.cs;
            let last = (offset + len - 1) / self.cs;
            for idx in first..=last {
                if self.update_refcount(idx, -1)? == 0 {
                    self.punch(idx * self.cs, self.cs);
                }
            }
        }
        Ok(())
    }

    /// Returns a free cluster's space to the filesystem (best effort).
    fn punch(&mut self, offset: u64, len: u64) {
        use nix::fcntl::{fallocate, FallocateFlags};
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if offset < self.file_len {
            let _ = fallocate(&self.file, mode, offset as i64, len as i64);
        }
    }
}
