//! What an image holds itself, as opposed to what reads fall through to its
//! backing file for: the clusters a commit copies down.

use super::{Mapping, Qcow2Image};
use crate::disk::backend::check_range;
use crate::disk::error::Result;

/// What a run of the disk is in one image of a chain, on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Stored in this image (plain or compressed).
    Data,
    /// Marked as reading zeroes in this image.
    Zero,
    /// Not in this image: reads come from the backing file (or are zeroes).
    Unallocated,
}

impl Qcow2Image {
    /// What the run at `offset` is in this image alone, and how many bytes
    /// from there (at least 1, at most `len`) are the same.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        check_range(offset, len, self.size)?;
        let len = len.max(1).min(self.size - offset);
        let (mapping, run) = self.lock().map_run(offset, len)?;
        let kind = match mapping {
            Mapping::Data { .. } | Mapping::Compressed { .. } => Allocation::Data,
            Mapping::Zero { .. } => Allocation::Zero,
            Mapping::Unallocated => Allocation::Unallocated,
        };
        Ok((kind, run))
    }
}
