//! QEMU-style overlap checks. A hostile image can point guest data at its
//! own metadata: an L2 entry naming the L1 table, a refcount calling the
//! header's cluster free, a compressed cluster inside the header. A guest
//! write, an allocation or a free there would rewrite or punch the metadata
//! (and with it, say, the backing file name read at the next open).
//!
//! So a writer records every host cluster holding metadata; data writes,
//! allocations and frees are checked against the record (one ordered-map
//! lookup per request), and an overlap marks the image corrupt, as QEMU
//! does (the corrupt bit of the header's incompatible features, after which
//! nobody writes to it until `qemu-img check -r all`), and fails the
//! request with nothing written.

use std::collections::BTreeMap;
use std::fmt;

use super::header::{INCOMPAT_CORRUPT, OFF_INCOMPATIBLE};
use super::{State, L1E_OFFSET_MASK, REFT_OFFSET_MASK};
use crate::disk::error::{DiskError, Result};
use crate::escape;

/// What a metadata cluster holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Metadata {
    Header,
    L1Table,
    RefcountTable,
    RefcountBlock,
    L2Table,
}

impl fmt::Display for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Metadata::Header => "the header",
            Metadata::L1Table => "the L1 table",
            Metadata::RefcountTable => "the refcount table",
            Metadata::RefcountBlock => "a refcount block",
            Metadata::L2Table => "an L2 table",
        })
    }
}

/// The host clusters that hold metadata, by cluster index.
#[derive(Default)]
pub(super) struct MetadataMap {
    clusters: BTreeMap<u64, Metadata>,
}

impl MetadataMap {
    /// Records `count` clusters from `first` as `kind`. A cluster already
    /// recorded as another kind is returned as the error; two L1 entries may
    /// share an L2 table.
    fn insert(&mut self, first: u64, count: u64, kind: Metadata) -> Result<(), (u64, Metadata)> {
        for cluster in first..first + count {
            match self.clusters.insert(cluster, kind) {
                Some(old) if old != kind => {
                    self.clusters.insert(cluster, old);
                    return Err((cluster, old));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn remove(&mut self, first: u64, count: u64) {
        for cluster in first..first + count {
            self.clusters.remove(&cluster);
        }
    }

    /// The first metadata cluster among `count` clusters from `first`.
    fn find(&self, first: u64, count: u64) -> Option<(u64, Metadata)> {
        self.clusters
            .range(first..first.saturating_add(count))
            .next()
            .map(|(&c, &k)| (c, k))
    }
}

impl State {
    /// Records where the header, tables, refcount blocks and L2 tables lie,
    /// for a writer; metadata structures overlapping each other make the
    /// image corrupt.
    pub(super) fn map_metadata(&mut self) -> Result<()> {
        let cs = self.cs;
        let mut found: Vec<(u64, u64, Metadata)> = vec![
            (0, 1, Metadata::Header),
            (
                self.hdr.l1_table_offset / cs,
                (self.l1.len() as u64 * 8).div_ceil(cs),
                Metadata::L1Table,
            ),
            (
                self.hdr.refcount_table_offset / cs,
                self.hdr.refcount_table_clusters as u64,
                Metadata::RefcountTable,
            ),
        ];
        // Misaligned entries are refused when they are used.
        let aligned = |off: u64| (off != 0 && off % cs == 0).then_some(off / cs);
        found.extend(
            self.reftable
                .iter()
                .filter_map(|e| aligned(e & REFT_OFFSET_MASK))
                .map(|c| (c, 1, Metadata::RefcountBlock)),
        );
        found.extend(
            self.l1
                .iter()
                .filter_map(|e| aligned(e & L1E_OFFSET_MASK))
                .map(|c| (c, 1, Metadata::L2Table)),
        );
        for (first, count, kind) in found {
            self.record_metadata(first, count, kind)?;
        }
        Ok(())
    }

    /// Records new metadata at `count` clusters from `first`.
    pub(super) fn record_metadata(&mut self, first: u64, count: u64, kind: Metadata) -> Result<()> {
        self.metadata
            .insert(first, count, kind)
            .map_err(|(cluster, old)| {
                self.corruption(format!("{kind} overlaps {old} at {:#x}", cluster * self.cs))
            })
    }

    /// Forgets metadata that nothing points at any more.
    pub(super) fn forget_metadata(&mut self, first: u64, count: u64) {
        self.metadata.remove(first, count);
    }

    /// Refuses to write guest data to host bytes `[host, host + len)`.
    pub(super) fn check_data_write(&mut self, host: u64, len: u64) -> Result<()> {
        self.check_clusters(host, len, "a guest write")
    }

    /// Refuses to drop a reference to host bytes `[offset, offset + len)`.
    pub(super) fn check_free(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_clusters(offset, len, "freeing a data cluster")
    }

    /// Refuses to hand out clusters the refcounts call free but that hold
    /// metadata.
    pub(super) fn check_allocation(&mut self, first: u64, count: u64) -> Result<()> {
        match self.metadata.find(first, count) {
            None => Ok(()),
            Some((cluster, kind)) => Err(self.corruption(format!(
                "the refcounts call {kind} at {:#x} free",
                cluster * self.cs
            ))),
        }
    }

    fn check_clusters(&mut self, offset: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / self.cs;
        let last = (offset.saturating_add(len) - 1) / self.cs;
        match self.metadata.find(first, last - first + 1) {
            None => Ok(()),
            Some((cluster, kind)) => Err(self.corruption(format!(
                "{what} at {offset:#x} would reach {kind} at {:#x}",
                cluster * self.cs
            ))),
        }
    }

    /// Refuses every write once the image was found corrupt.
    pub(super) fn check_intact(&self) -> Result<()> {
        if self.marked_corrupt {
            return Err(self.corrupt(
                "the image was marked corrupt after its metadata and data overlapped; it takes no more writes",
            ));
        }
        Ok(())
    }

    /// Marks the image corrupt (once) and returns the error to report.
    fn corruption(&mut self, why: String) -> DiskError {
        if !self.marked_corrupt {
            self.marked_corrupt = true;
            log::error!(
                "{}: {why}; marking the image corrupt",
                escape::path(&self.path)
            );
            // Version 2 has no feature bits: the image is refused writes
            // for as long as it stays open.
            if self.hdr.version >= 3 {
                self.hdr.incompatible_features |= INCOMPAT_CORRUPT;
                let bits = self.hdr.incompatible_features.to_be_bytes();
                if let Err(e) = self
                    .write_at(&bits, OFF_INCOMPATIBLE)
                    .and_then(|()| self.sync())
                {
                    log::error!("{}: cannot mark it corrupt: {e}", escape::path(&self.path));
                }
            }
        }
        self.corrupt(format!(
            "{why}; the image is now marked corrupt (see qemu-img check)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_overlaps_and_refuses_a_cluster_of_two_kinds() {
        let mut map = MetadataMap::default();
        map.insert(0, 1, Metadata::Header).unwrap();
        map.insert(10, 4, Metadata::L1Table).unwrap();
        map.insert(20, 1, Metadata::L2Table).unwrap();
        map.insert(20, 1, Metadata::L2Table)
            .expect("a shared L2 table");
        assert_eq!(map.find(1, 9), None);
        assert_eq!(map.find(5, 6), Some((10, Metadata::L1Table)));
        assert_eq!(map.find(14, 6), None);
        assert_eq!(map.find(14, 7), Some((20, Metadata::L2Table)));
        assert_eq!(map.find(u64::MAX - 1, 5), None);
        assert_eq!(
            map.insert(12, 1, Metadata::RefcountBlock),
            Err((12, Metadata::L1Table))
        );
        assert_eq!(map.find(12, 1), Some((12, Metadata::L1Table)));
        map.remove(10, 4);
        assert_eq!(map.find(1, 19), None);
    }
}
