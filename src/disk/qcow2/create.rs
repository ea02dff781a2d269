//! Laying out a new, empty qcow2 image: header, refcount table and blocks,
//! and an L1 table sized for the virtual size, all counted.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::cache::{set_be64, set_refcount};
use super::header::{
    encode_v3, Header, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use crate::disk::error::{DiskError, Result};

/// Writes an empty version 3 image of `size` bytes into the empty `file`.
/// `backing` is the backing file name as stored and its format name.
pub fn format_new(
    file: &File,
    path: &Path,
    size: u64,
    cluster_bits: u32,
    backing: Option<(&str, &str)>,
) -> Result<()> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(DiskError::InvalidArgument(format!(
            "cluster size {} is not a power of two between 512 bytes and 2 MiB",
            1u64 << cluster_bits
        )));
    }
    if size > MAX_VIRTUAL_SIZE {
        return Err(DiskError::InvalidArgument(format!(
            "size {size} is too large for a qcow2 image"
        )));
    }
    let cs = 1u64 << cluster_bits;
    let l1_entries = Header::l1_entries_for(size, cluster_bits).max(1);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(DiskError::InvalidArgument(format!(
            "size {size} needs an L1 table over 32 MiB with {cs}-byte clusters; use a larger cluster size"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let rb_entries = cs * 8 / 16;
    // header + reftable + refblocks + L1, where the blocks count everything.
    let (mut reftable_clusters, mut refblocks) = (1u64, 1u64);
    loop {
        let total = 1 + reftable_clusters + refblocks + l1_clusters;
        let blocks = total.div_ceil(rb_entries);
        let table = (blocks * 8).div_ceil(cs);
        if blocks == refblocks && table == reftable_clusters {
            break;
        }
        refblocks = blocks;
        reftable_clusters = table;
    }
    let reftable_offset = cs;
    let refblocks_offset = reftable_offset + reftable_clusters * cs;
    let l1_offset = refblocks_offset + refblocks * cs;
    let total_clusters = 1 + reftable_clusters + refblocks + l1_clusters;

    let mut header = vec![0u8; cs as usize];
    encode_v3(
        &mut header,
        size,
        cluster_bits,
        (l1_offset, l1_entries as u32),
        (reftable_offset, reftable_clusters as u32),
        backing,
    )
    .map_err(DiskError::InvalidArgument)?;

    let mut reftable = vec![0u8; (reftable_clusters * cs) as usize];
    for b in 0..refblocks {
        set_be64(&mut reftable, b as usize, refblocks_offset + b * cs);
    }
    let mut blocks = vec![0u8; (refblocks * cs) as usize];
    for c in 0..total_clusters {
        set_refcount(&mut blocks, c as usize, 4, 1);
    }
    let io = |e| DiskError::io(path, e);
    // The L1 table is all zeroes: extending the file makes it a hole.
    file.set_len(total_clusters * cs).map_err(io)?;
    file.write_all_at(&reftable, reftable_offset).map_err(io)?;
    file.write_all_at(&blocks, refblocks_offset).map_err(io)?;
    file.write_all_at(&header, 0).map_err(io)?;
    Ok(())
}
