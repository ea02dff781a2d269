//! The one interface every image format offers to the rest of vmlab.
//!
//! Offsets and lengths are in bytes; virtio-blk converts its 512-byte sectors.
//! Methods take `&self` and backends are `Send + Sync`, so a device thread can
//! own an `Arc<dyn BlockBackend>` while another thread (control socket, stats)
//! asks for the size; each backend serialises its own metadata updates.
//! Data moves through `IoSlice`/`IoSliceMut` lists so that a descriptor chain
//! with several data buffers becomes one call and, where the layout allows,
//! one `preadv`/`pwritev`.

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

use super::error::Result;

/// How an image stores its blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU uses for the format (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses QEMU's format names.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Self::from_name(s).ok_or_else(|| format!("unknown image format '{s}': use raw or qcow2"))
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a range of the disk holds data or reads as zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatus {
    /// May hold non-zero bytes (in this image or one of its backing files).
    Data,
    /// Reads as zeroes without being stored.
    Zero,
}

/// A virtual disk: raw file, qcow2 image (with its backing chain), ...
///
/// After `discard` or `write_zeroes` the range reads as zeroes in every
/// backend, so a guest may rely on either for zeroing.
pub trait BlockBackend: Send + Sync {
    /// Virtual size of the disk in bytes.
    fn size(&self) -> u64;

    /// True when writes are refused (opened read-only, or a backing file).
    fn is_read_only(&self) -> bool;

    /// Fills `bufs` in order with the bytes starting at `offset`.
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()>;

    /// Writes the concatenation of `bufs` at `offset`.
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()>;

    /// Makes every write completed so far durable (metadata in order, then
    /// `fdatasync`). A guest flush is acknowledged only after this returns.
    fn flush(&self) -> Result<()>;

    /// Releases the range; it reads as zeroes afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes the range read as zeroes, deallocating where the format can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Status of the run starting at `offset`: what it is and how many bytes
    /// (at least 1, at most `len`) share that status.
    fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)>;

    /// The file this backend reads, as it was opened.
    fn path(&self) -> &Path;

    /// The on-disk format.
    fn format(&self) -> ImageFormat;

    /// The backing image reads fall through to, if any.
    fn backing(&self) -> Option<&dyn BlockBackend>;

    /// Makes every write durable, then refuses further writes and trades
    /// the image's write lock for a shared read lock, so that the open image
    /// can serve as the backing file of a new overlay (a live snapshot).
    /// Formats that cannot say so.
    fn freeze(&self) -> Result<()> {
        Err(super::error::DiskError::unsupported(
            self.path(),
            format!("freezing an open {} image", self.format()),
        ))
    }

    /// Device and inode of the file this backend has open, to tell whether
    /// a path names that same file.
    fn file_identity(&self) -> Option<(u64, u64)> {
        None
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored_at(offset, &mut [IoSliceMut::new(buf)])
    }

    /// Writes `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_vectored_at(offset, &[IoSlice::new(buf)])
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(super::error::DiskError::OutOfRange { offset, len, size }),
    }
}
