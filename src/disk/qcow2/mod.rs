//! qcow2 images: version 3 (and reading/writing version 2), L1/L2 mapping,
//! refcounted cluster allocation, zero and compressed clusters, backing files.
//!
//! Crash safety comes from the order in which metadata reaches the disk
//! (see `writeback.rs`): data and refcount increments, then L2 tables, then
//! the L1 table, each stage made durable before the next is written; freed
//! clusters are only counted down once the tables no longer naming them are
//! durable. A crash may leak clusters, never corrupt the image. A hostile
//! image cannot make guest data overwrite its metadata (see `overlap.rs`).

mod allocation;
mod cache;
mod create;
mod header;
mod io;
mod overlap;
mod refcount;
mod writeback;

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use allocation::Allocation;
pub use create::format_new;
pub use header::{Header, QCOW2_MAGIC};

use self::cache::TableCache;
use self::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFF_AUTOCLEAR};
use self::overlap::MetadataMap;
use super::backend::{check_range, BlockBackend, BlockStatus, ImageFormat};
use super::error::{DiskError, Result};
use super::iovec;
use super::open::OpenOptions;
use crate::escape;

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;

/// Metadata cache budgets in bytes (QEMU's default L2 cache covers 32 MiB).
const L2_CACHE_BYTES: u64 = 32 << 20;
const REFBLOCK_CACHE_BYTES: u64 = 4 << 20;

/// What one guest cluster maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    /// Not in this image: read from the backing file, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster or 0.
    Zero { host: u64 },
    /// Stored at `host`; `copied` means its refcount is exactly 1.
    Data { host: u64, copied: bool },
    /// zlib-compressed; the raw L2 entry.
    Compressed { entry: u64 },
}

/// A qcow2 image opened for I/O. All operations serialise on one lock: the
/// device thread is the only heavy user, and metadata updates must be atomic.
pub struct Qcow2Image {
    state: Mutex<State>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// Written to no more: the image became a backing file while open (see
    /// [`BlockBackend::freeze`]).
    frozen: AtomicBool,
    backing: Option<Arc<dyn BlockBackend>>,
}

pub(crate) struct State {
    file: File,
    path: PathBuf,
    hdr: Header,
    cluster_bits: u32,
    cs: u64,
    l2_entries: u64,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2_cache: TableCache,
    reftable: Vec<u64>,
    reftable_dirty: bool,
    rb_cache: TableCache,
    backing: Option<Arc<dyn BlockBackend>>,
    /// Physical length of the file.
    file_len: u64,
    /// Host offsets at or beyond this were never written since open: a
    /// cluster allocated there reads as zeroes without being written.
    known_zero_from: u64,
    /// Where the search for a free cluster starts (cluster index).
    free_hint: u64,
    /// Host byte ranges whose references were dropped from L2 tables that
    /// may not be durable yet; counted down at the next flush.
    pending_free: Vec<(u64, u64)>,
    /// Something was written to the file since the last fdatasync.
    unsynced: bool,
    /// A cluster of zeroes, for zeroing partial clusters.
    zeroes: Vec<u8>,
    /// The last decompressed cluster, keyed by its L2 entry.
    decompressed: Option<(u64, Vec<u8>)>,
    /// Where metadata lies (writers only), for the overlap checks.
    metadata: MetadataMap,
    /// An overlap was found: the image takes no more writes.
    marked_corrupt: bool,
}

impl Qcow2Image {
    /// Opens the qcow2 image in `file` (already locked); `backing` is the
    /// opened backing image, if the header names one.
    pub(crate) fn open(
        file: File,
        path: &Path,
        hdr: Header,
        opts: &OpenOptions,
        backing: Option<Arc<dyn BlockBackend>>,
    ) -> Result<Self> {
        let read_only = opts.read_only;
        let l2_budget = opts.cache_bytes.unwrap_or(L2_CACHE_BYTES);
        let rb_budget = opts.cache_bytes.map_or(REFBLOCK_CACHE_BYTES, |b| b / 8);
        let file_len = file.metadata().map_err(|e| DiskError::io(path, e))?.len();
        if !read_only {
            check_writable(&hdr, path)?;
        }
        let cs = hdr.cluster_size();
        let mut l1_bytes = vec![0u8; hdr.l1_size as usize * 8];
        read_exact(&file, path, &mut l1_bytes, hdr.l1_table_offset)?;
        let l1: Vec<u64> = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        // Refcounts matter only to writers.
        let reftable = if read_only {
            Vec::new()
        } else {
            let mut bytes = vec![0u8; (hdr.refcount_table_clusters as u64 * cs) as usize];
            read_exact(&file, path, &mut bytes, hdr.refcount_table_offset)?;
            bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                .collect()
        };
        check_reftable(&reftable, cs, file_len, path)?;
        let mut state = State {
            path: path.to_path_buf(),
            cluster_bits: hdr.cluster_bits,
            cs,
            l2_entries: cs / 8,
            l1,
            l1_dirty: false,
            l2_cache: TableCache::new((l2_budget / cs) as usize),
            reftable,
            reftable_dirty: false,
            rb_cache: TableCache::new((rb_budget / cs) as usize),
            backing: backing.clone(),
            file_len,
            known_zero_from: file_len.div_ceil(cs) * cs,
            free_hint: 0,
            pending_free: Vec::new(),
            unsynced: false,
            zeroes: Vec::new(),
            decompressed: None,
            metadata: MetadataMap::default(),
            marked_corrupt: false,
            hdr,
            file,
        };
        if !read_only {
            state.map_metadata()?;
        }
        if !read_only && state.hdr.autoclear_features != 0 {
            // Autoclear features we do not maintain must be cleared by a
            // writer, so that their stale data is not trusted later.
            state.hdr.autoclear_features = 0;
            state.write_at(&0u64.to_be_bytes(), OFF_AUTOCLEAR)?;
            state.sync()?;
        }
        Ok(Qcow2Image {
            path: path.to_path_buf(),
            size: state.hdr.size,
            read_only,
            frozen: AtomicBool::new(false),
            backing,
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the image state unknown;
        // carrying on with it is still better than poisoning every request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opened read-only, or frozen since.
    fn writes_refused(&self) -> bool {
        self.read_only || self.frozen.load(Ordering::SeqCst)
    }

    fn check_write(&self) -> Result<()> {
        if self.writes_refused() {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// The parsed header (for `disk info`).
    pub fn header(&self) -> Header {
        self.lock().hdr.clone()
    }

    /// Grows the virtual size to `new_size` bytes.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_write()?;
        let mut st = self.lock();
        st.resize(new_size)?;
        drop(st);
        self.size = new_size;
        Ok(())
    }
}

fn check_writable(hdr: &Header, path: &Path) -> Result<()> {
    if hdr.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(DiskError::InvalidFile {
            path: path.to_path_buf(),
            reason: "image is marked corrupt; repair it with `qemu-img check -r all` before writing to it".into(),
        });
    }
    if hdr.incompatible_features & INCOMPAT_DIRTY != 0 {
        return Err(DiskError::InvalidFile {
            path: path.to_path_buf(),
            reason: "image was not closed cleanly (dirty bit with lazy refcounts); repair it with `qemu-img check -r all` first".into(),
        });
    }
    if hdr.nb_snapshots != 0 {
        return Err(DiskError::unsupported(
            path,
            "writing to images with internal snapshots (open it read-only, or delete them with `qemu-img snapshot -d`)",
        ));
    }
    Ok(())
}

/// Refcount blocks must lie in the file and be distinct: a table naming one
/// block many times would make every free-cluster search crawl.
fn check_reftable(table: &[u64], cs: u64, file_len: u64, path: &Path) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for &entry in table {
        let off = entry & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || off.saturating_add(cs) > file_len || !seen.insert(off) {
            return Err(DiskError::corrupt(
                path,
                format!(
                    "refcount block at {off:#x} is misaligned, outside the file or listed twice"
                ),
            ));
        }
    }
    Ok(())
}

fn read_exact(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            DiskError::corrupt(
                path,
                format!("table at {offset:#x} extends beyond the end of the file"),
            )
        } else {
            DiskError::io(path, e)
        }
    })
}

impl State {
    fn io_err(&self, e: impl Into<std::io::Error>) -> DiskError {
        DiskError::io(&self.path, e.into())
    }

    fn corrupt(&self, why: impl Into<String>) -> DiskError {
        DiskError::corrupt(&self.path, why)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.unsynced = true;
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err(e))
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| self.io_err(e))?;
        self.unsynced = false;
        Ok(())
    }
}

impl BlockBackend for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.writes_refused()
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iovec::total_len(bufs);
        check_range(offset, len, self.size)?;
        self.lock().read(offset, bufs, len)
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        self.check_write()?;
        let len = iovec::total_len(bufs);
        check_range(offset, len, self.size)?;
        self.lock().write(offset, bufs, len)
    }

    fn flush(&self) -> Result<()> {
        if self.writes_refused() {
            return Ok(());
        }
        self.lock().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write()?;
        check_range(offset, len, self.size)?;
        self.lock().zero_range(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        check_range(offset, len, self.size)?;
        self.lock()
            .block_status(offset, len.max(1).min(self.size - offset))
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn backing(&self) -> Option<&dyn BlockBackend> {
        self.backing.as_deref()
    }

    fn freeze(&self) -> Result<()> {
        self.check_write()?;
        let mut st = self.lock();
        // Everything durable, the last refcount decrements included, before
        // anything may read this image as a backing file.
        st.close()?;
        self.frozen.store(true, Ordering::SeqCst);
        super::lock::downgrade_to_shared_read(&st.file, &self.path)
    }

    fn file_identity(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.lock().file.metadata().ok()?;
        Some((meta.dev(), meta.ino()))
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.writes_refused() {
            return;
        }
        let mut st = self.lock();
        if let Err(e) = st.close() {
            log::error!("{}: closing image: {e}", escape::path(&self.path));
        }
    }
}
