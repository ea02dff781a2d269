//! Guest reads and writes: mapping guest ranges through the L1/L2 tables,
//! reading through to the backing file, copy-on-write at cluster granularity,
//! and zeroing.

use std::io::{IoSlice, IoSliceMut};

use super::cache::{get_be64, set_be64};
use super::overlap::Metadata;
use super::{Mapping, State, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::disk::backend::BlockStatus;
use crate::disk::error::Result;
use crate::disk::iovec;

impl State {
    fn l1_index(&self, guest: u64) -> usize {
        (guest >> (self.cluster_bits + self.cluster_bits - 3)) as usize
    }

    fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & (self.l2_entries - 1)) as usize
    }

    /// Cache slot of the L2 table for `l1_index`. With `allocate`, a missing
    /// table is created and a shared one refused; without, `None` when absent.
    fn l2_slot(&mut self, l1_index: usize, allocate: bool) -> Result<Option<usize>> {
        if l1_index >= self.l1.len() {
            return Err(self.corrupt("guest offset beyond the L1 table"));
        }
        let off = self.l2_offset(l1_index)?;
        if off == 0 {
            if !allocate {
                return Ok(None);
            }
            self.make_room_l2()?;
            let (host, _) = self.alloc_clusters(1)?;
            self.record_metadata(host / self.cs, 1, Metadata::L2Table)?;
            let slot = self
                .l2_cache
                .insert(host, vec![0u8; self.cs as usize], true);
            self.l1[l1_index] = host | OFLAG_COPIED;
            self.l1_dirty = true;
            return Ok(Some(slot));
        }
        if allocate && self.l1[l1_index] & OFLAG_COPIED == 0 {
            // Only snapshots share L2 tables, and those images are not
            // opened for writing; a count of 1 just lacks its flag.
            if self.refcount(off / self.cs)? != 1 {
                return Err(self.corrupt("L2 table is shared but the image has no snapshots"));
            }
            self.l1[l1_index] |= OFLAG_COPIED;
            self.l1_dirty = true;
        }
        if let Some(slot) = self.l2_cache.find(off) {
            return Ok(Some(slot));
        }
        let mut data = vec![0u8; self.cs as usize];
        super::read_exact(&self.file, &self.path, &mut data, off)?;
        self.make_room_l2()?;
        Ok(Some(self.l2_cache.insert(off, data, false)))
    }

    fn decode(&self, entry: u64) -> Result<Mapping> {
        if entry & OFLAG_COMPRESSED != 0 {
            return Ok(Mapping::Compressed { entry });
        }
        let host = entry & L2E_OFFSET_MASK;
        if host % self.cs != 0 {
            return Err(self.corrupt(format!("data cluster at {host:#x} is not cluster-aligned")));
        }
        if self.hdr.version >= 3 && entry & OFLAG_ZERO != 0 {
            return Ok(Mapping::Zero { host });
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data {
            host,
            copied: entry & OFLAG_COPIED != 0,
        })
    }

    /// The mapping at `guest` and how many bytes from there (at most
    /// `max_len`, within one L2 table) continue it: same kind and, for data,
    /// contiguous on the host.
    pub(super) fn map_run(&mut self, guest: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let in_cluster = guest & (self.cs - 1);
        let l2_index = self.l2_index(guest);
        let room = (self.l2_entries - l2_index as u64) * self.cs - in_cluster;
        let max_len = max_len.min(room);
        let Some(slot) = self.l2_slot(self.l1_index(guest), false)? else {
            return Ok((Mapping::Unallocated, max_len));
        };
        let first = self.decode(get_be64(&self.l2_cache.get(slot).data, l2_index))?;
        let mut covered = self.cs - in_cluster;
        let mut n = 1u64;
        while covered < max_len {
            let next = self.decode(get_be64(
                &self.l2_cache.get(slot).data,
                l2_index + n as usize,
            ))?;
            let continues = match (first, next) {
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                (
                    Mapping::Data {
                        host: a,
                        copied: ca,
                    },
                    Mapping::Data {
                        host: b,
                        copied: cb,
                    },
                ) => b == a + n * self.cs && ca == cb,
                _ => false,
            };
            if !continues {
                break;
            }
            covered += self.cs;
            n += 1;
        }
        Ok((first, covered.min(max_len)))
    }

    /// Decompresses the cluster of a compressed L2 entry (cached).
    fn decompress(&mut self, entry: u64) -> Result<&[u8]> {
        if self.decompressed.as_ref().is_none_or(|(e, _)| *e != entry) {
            let shift = 62 - (self.cluster_bits - 8);
            let offset = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let csize = sectors * 512 - (offset & 511);
            if offset >= self.file_len {
                return Err(self.corrupt(format!(
                    "compressed cluster at {offset:#x} lies outside the file"
                )));
            }
            let csize = csize.min(self.file_len - offset);
            let mut input = vec![0u8; csize as usize];
            let got = iovec::pread_vectored(&self.file, &mut [IoSliceMut::new(&mut input)], offset)
                .map_err(|e| self.io_err(e))?;
            input.truncate(got as usize);
            let mut out = vec![0u8; self.cs as usize];
            let mut z = flate2::Decompress::new(false);
            let status = z.decompress(&input, &mut out, flate2::FlushDecompress::Finish);
            if status.is_err() || z.total_out() != self.cs {
                return Err(self.corrupt(format!(
                    "compressed cluster at {offset:#x} does not inflate to one cluster"
                )));
            }
            self.decompressed = Some((entry, out));
        }
        Ok(&self.decompressed.as_ref().expect("just filled").1)
    }

    /// Reads from the backing file (zeroes past its end, or without one).
    fn read_backing(
        &self,
        guest: u64,
        bufs: &mut [IoSliceMut<'_>],
        start: u64,
        len: u64,
    ) -> Result<()> {
        let avail = match &self.backing {
            Some(b) => b.size().saturating_sub(guest).min(len),
            None => 0,
        };
        if avail > 0 {
            let backing = self.backing.as_ref().expect("checked");
            backing.read_vectored_at(guest, &mut iovec::sub_mut(bufs, start, avail))?;
        }
        if avail < len {
            iovec::fill_zero(bufs, start + avail, len - avail);
        }
        Ok(())
    }

    /// Reads `len` bytes at `guest` with mapping `m` into `bufs[start..]`.
    /// `m` applies from the cluster of `guest` on, for the whole range.
    fn read_mapped(
        &mut self,
        m: Mapping,
        guest: u64,
        bufs: &mut [IoSliceMut<'_>],
        start: u64,
        len: u64,
    ) -> Result<()> {
        match m {
            Mapping::Unallocated => self.read_backing(guest, bufs, start, len),
            Mapping::Zero { .. } => {
                iovec::fill_zero(bufs, start, len);
                Ok(())
            }
            Mapping::Data { host, .. } => {
                let at = host + (guest & (self.cs - 1));
                let mut part = iovec::sub_mut(bufs, start, len);
                let got =
                    iovec::pread_vectored(&self.file, &mut part, at).map_err(|e| self.io_err(e))?;
                drop(part);
                if got < len {
                    // A cluster allocated at the end of the file reads as
                    // zeroes where it was never written.
                    iovec::fill_zero(bufs, start + got, len - got);
                }
                Ok(())
            }
            Mapping::Compressed { entry } => {
                let in_cluster = (guest & (self.cs - 1)) as usize;
                let data = self.decompress(entry)?;
                let piece = data[in_cluster..in_cluster + len as usize].to_vec();
                iovec::copy_in(bufs, start, &piece);
                Ok(())
            }
        }
    }

    pub(super) fn read(
        &mut self,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
        len: u64,
    ) -> Result<()> {
        let mut pos = 0;
        while pos < len {
            let guest = offset + pos;
            let (m, run) = self.map_run(guest, len - pos)?;
            self.read_mapped(m, guest, bufs, pos, run)?;
            pos += run;
        }
        Ok(())
    }

    pub(super) fn write(&mut self, offset: u64, bufs: &[IoSlice<'_>], len: u64) -> Result<()> {
        self.check_intact()?;
        let mut pos = 0;
        while pos < len {
            let guest = offset + pos;
            let (m, run) = self.map_run(guest, len - pos)?;
            match m {
                Mapping::Data { host, copied: true } => {
                    let at = host + (guest & (self.cs - 1));
                    self.check_data_write(at, run)?;
                    let mut part = iovec::sub(bufs, pos, run);
                    self.unsynced = true;
                    iovec::pwrite_vectored(&self.file, &mut part, at)
                        .map_err(|e| self.io_err(e))?;
                }
                Mapping::Data {
                    host,
                    copied: false,
                } if self.refcount(host / self.cs)? == 1 => {
                    // Sole owner without the flag: mark it and write in place.
                    self.check_data_write(host, self.cs)?;
                    self.set_copied(guest, host)?;
                    continue;
                }
                _ => self.write_allocating(m, guest, bufs, pos, run)?,
            }
            pos += run;
        }
        Ok(())
    }

    fn set_copied(&mut self, guest: u64, host: u64) -> Result<()> {
        let slot = self
            .l2_slot(self.l1_index(guest), true)?
            .expect("allocating lookup");
        let i = self.l2_index(guest);
        let t = self.l2_cache.get_mut(slot);
        set_be64(&mut t.data, i, host | OFLAG_COPIED);
        t.dirty = true;
        Ok(())
    }

    /// Old contents of `[guest, guest + len)`, inside the run mapped by `m`
    /// that starts at `run_guest`, for copy-on-write.
    fn read_old(&mut self, m: Mapping, run_guest: u64, guest: u64, out: &mut [u8]) -> Result<()> {
        let m = match m {
            Mapping::Data { host, copied } => {
                let cluster = (guest - (run_guest & !(self.cs - 1))) / self.cs;
                Mapping::Data {
                    host: host + cluster * self.cs,
                    copied,
                }
            }
            other => other,
        };
        let len = out.len() as u64;
        self.read_mapped(m, guest, &mut [IoSliceMut::new(out)], 0, len)
    }

    /// Writes a run whose clusters need new storage: allocates them together,
    /// fills the uncovered head and tail with their old contents, writes
    /// everything in one call, then points the L2 entries at it.
    fn write_allocating(
        &mut self,
        m: Mapping,
        guest: u64,
        bufs: &[IoSlice<'_>],
        pos: u64,
        run: u64,
    ) -> Result<()> {
        let cs = self.cs;
        let first = guest & !(cs - 1);
        let end = guest + run;
        let last_end = end.div_ceil(cs) * cs;
        let n = (last_end - first) / cs;
        // The table first, so its own allocation does not split the run.
        let slot = self
            .l2_slot(self.l1_index(guest), true)?
            .expect("allocating lookup");
        // What the run's entries hold now must be freeable before anything
        // is written.
        let i0 = self.l2_index(guest);
        for i in 0..n as usize {
            self.storage_of(get_be64(&self.l2_cache.get(slot).data, i0 + i))?;
        }
        let (host, fresh) = self.alloc_clusters(n)?;
        let old_is_zero = |st: &State, at: u64| match m {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => st.backing.as_ref().is_none_or(|b| at >= b.size()),
            _ => false,
        };
        let head_len = guest - first;
        let tail_len = last_end - end;
        let skip_head = head_len > 0 && fresh && old_is_zero(self, first);
        let skip_tail = tail_len > 0 && fresh && old_is_zero(self, end);
        let mut head = Vec::new();
        if head_len > 0 && !skip_head {
            head = vec![0u8; head_len as usize];
            self.read_old(m, guest, first, &mut head)?;
        }
        let mut tail = Vec::new();
        if tail_len > 0 && !skip_tail {
            tail = vec![0u8; tail_len as usize];
            self.read_old(m, guest, end, &mut tail)?;
        }
        let mut iov: Vec<IoSlice<'_>> = Vec::new();
        if !head.is_empty() {
            iov.push(IoSlice::new(&head));
        }
        iov.extend(iovec::sub(bufs, pos, run));
        if !tail.is_empty() {
            iov.push(IoSlice::new(&tail));
        }
        let at = if skip_head { host + head_len } else { host };
        self.unsynced = true;
        iovec::pwrite_vectored(&self.file, &mut iov, at).map_err(|e| self.io_err(e))?;

        let slot = self
            .l2_slot(self.l1_index(guest), true)?
            .expect("allocating lookup");
        for i in 0..n as usize {
            let old = get_be64(&self.l2_cache.get(slot).data, i0 + i);
            self.queue_free(old)?;
            let t = self.l2_cache.get_mut(slot);
            set_be64(&mut t.data, i0 + i, (host + i as u64 * cs) | OFLAG_COPIED);
            t.dirty = true;
        }
        Ok(())
    }

    /// The host bytes an L2 entry holds, checked to be no metadata: what
    /// replacing the entry will free.
    fn storage_of(&mut self, entry: u64) -> Result<Option<(u64, u64)>> {
        let held = match self.decode(entry)? {
            Mapping::Data { host, .. } | Mapping::Zero { host } if host != 0 => (host, self.cs),
            Mapping::Compressed { entry } => {
                let shift = 62 - (self.cluster_bits - 8);
                let offset = entry & ((1u64 << shift) - 1);
                let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
                (offset & !511, sectors * 512)
            }
            _ => return Ok(None),
        };
        self.check_free(held.0, held.1)?;
        Ok(Some(held))
    }

    /// Queues the storage an L2 entry held for freeing at the next flush.
    fn queue_free(&mut self, entry: u64) -> Result<()> {
        if let Some(held) = self.storage_of(entry)? {
            self.pending_free.push(held);
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeroes: whole clusters by their
    /// L2 entries (freeing their storage), partial ones by writing zeroes.
    pub(super) fn zero_range(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_intact()?;
        let cs = self.cs;
        let end = offset + len;
        let mut full_start = offset.div_ceil(cs) * cs;
        // The last cluster counts as whole when the range reaches the end.
        let full_end = if end == self.hdr.size {
            end.div_ceil(cs) * cs
        } else {
            end & !(cs - 1)
        };
        if full_start >= full_end {
            return self.zero_partial(offset, len);
        }
        if offset < full_start {
            self.zero_partial(offset, full_start - offset)?;
        }
        if full_end < end {
            self.zero_partial(full_end, end - full_end)?;
        }
        let need_flag = self.backing.is_some();
        if need_flag && self.hdr.version < 3 {
            // Version 2 has no zero flag: write real zeroes.
            return self.zero_partial(full_start, full_end.min(end) - full_start);
        }
        while full_start < full_end {
            let l2_index = self.l2_index(full_start);
            let room = (self.l2_entries - l2_index as u64) * cs;
            let n = room.min(full_end - full_start) / cs;
            let l1_index = self.l1_index(full_start);
            if let Some(slot) =
                self.l2_slot(l1_index, need_flag || self.l2_offset(l1_index)? != 0)?
            {
                let new = if need_flag { OFLAG_ZERO } else { 0 };
                for i in 0..n as usize {
                    let old = get_be64(&self.l2_cache.get(slot).data, l2_index + i);
                    if old == new {
                        continue;
                    }
                    self.queue_free(old)?;
                    let t = self.l2_cache.get_mut(slot);
                    set_be64(&mut t.data, l2_index + i, new);
                    t.dirty = true;
                }
            }
            full_start += n * cs;
        }
        Ok(())
    }

    /// Zeroes part of the disk by writing zeroes where it is not zero already.
    fn zero_partial(&mut self, offset: u64, len: u64) -> Result<()> {
        let mut pos = 0;
        while pos < len {
            let guest = offset + pos;
            let (m, run) = self.map_run(guest, len - pos)?;
            let already_zero = match m {
                Mapping::Zero { .. } => true,
                Mapping::Unallocated => self.backing.as_ref().is_none_or(|b| guest >= b.size()),
                _ => false,
            };
            if !already_zero {
                // Borrowed out of the state for the duration of the writes.
                let mut zeros = std::mem::take(&mut self.zeroes);
                zeros.resize(self.cs as usize, 0);
                let mut done = 0;
                let mut res = Ok(());
                while done < run && res.is_ok() {
                    let n = (run - done).min(self.cs);
                    res = self.write(guest + done, &[IoSlice::new(&zeros[..n as usize])], n);
                    done += n;
                }
                self.zeroes = zeros;
                res?;
            }
            pos += run;
        }
        Ok(())
    }

    pub(super) fn block_status(&mut self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let (m, run) = self.map_run(offset, len)?;
        Ok(match m {
            Mapping::Data { .. } | Mapping::Compressed { .. } => (BlockStatus::Data, run),
            Mapping::Zero { .. } => (BlockStatus::Zero, run),
            Mapping::Unallocated => match &self.backing {
                Some(b) if offset < b.size() => {
                    b.block_status(offset, run.min(b.size() - offset))?
                }
                _ => (BlockStatus::Zero, run),
            },
        })
    }
}
