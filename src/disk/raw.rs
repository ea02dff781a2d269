//! Raw images: the file is the disk, byte for byte. Holes stay holes:
//! discard punches them and `block_status` reports them via SEEK_DATA/HOLE.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use super::backend::{check_range, BlockBackend, BlockStatus, ImageFormat};
use super::error::{DiskError, Result};
use super::iovec;
use super::qcow2::QCOW2_MAGIC;

/// A raw disk image (regular file or block device).
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    /// The format was guessed from content: refuse guest writes that would
    /// make the next probe see another format (a qcow2 header could name any
    /// host file as its backing file).
    probed: bool,
}

impl RawImage {
    /// Wraps an open, already locked file.
    pub(crate) fn from_file(
        file: File,
        path: &Path,
        read_only: bool,
        probed: bool,
    ) -> Result<Self> {
        let size = file_size(&file).map_err(|e| DiskError::io(path, e))?;
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            probed,
        })
    }

    /// Grows the file to `new_size` bytes (the new part is a hole).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if new_size < self.size {
            return Err(DiskError::Shrink {
                path: self.path.clone(),
                current: self.size,
                requested: new_size,
            });
        }
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        self.file.set_len(new_size).map_err(|e| self.io(e))?;
        self.file.sync_all().map_err(|e| self.io(e))
    }

    fn io(&self, e: impl Into<std::io::Error>) -> DiskError {
        DiskError::io(&self.path, e.into())
    }

    /// Zeroes a range: punch a hole, or write zeroes where that fails.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate(&self.file, mode, offset as i64, len as i64).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(zeros.len() as u64);
            self.file
                .write_all_at(&zeros[..n as usize], offset + pos)
                .map_err(|e| self.io(e))?;
            pos += n;
        }
        Ok(())
    }
}

/// Length of a regular file, or of a block device (seek to its end).
pub(crate) fn file_size(file: &File) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    let end = lseek(file, 0, Whence::SeekEnd)?;
    Ok(end as u64)
}

impl BlockBackend for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> Result<()> {
        let len = iovec::total_len(bufs);
        check_range(offset, len, self.size)?;
        let got = iovec::pread_vectored(&self.file, bufs, offset).map_err(|e| self.io(e))?;
        if got < len {
            // The file shrank under us; what is gone reads as zeroes.
            iovec::fill_zero(bufs, got, len - got);
        }
        Ok(())
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> Result<()> {
        if self.read_only {
            return Err(DiskError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let len = iovec::total_len(bufs);
        check_range(offset, len, self.size)?;
        if self.probed && offset < QCOW2_MAGIC.len() as u64 && len > 0 {
            let mut head = [0u8; 4];
            let mut current = [0u8; 4];
            let _ = self.file.read_at(&mut current, 0);
            let n = (4 - offset).min(len) as usize;
            iovec::copy_out(bufs, 0, &mut head[..n]);
            current[offset as usize..offset as usize + n].copy_from_slice(&head[..n]);
            if current == QCOW2_MAGIC {
                return Err(DiskError::unsupported(
                    &self.path,
                    "refusing to write a qcow2 header into an image whose raw format was guessed",
                ));
            }
        }
        let mut bufs = bufs.to_vec();
        iovec::pwrite_vectored(&self.file, &mut bufs, offset).map_err(|e| self.io(e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.io(e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        check_range(offset, len, self.size)?;
        let len = len.max(1).min(self.size.saturating_sub(offset).max(1));
        let end = offset + len;
        // SEEK_DATA fails with ENXIO when only a hole is left.
        match lseek(&self.file, offset as i64, Whence::SeekData) {
            Ok(data) if data as u64 > offset => {
                Ok((BlockStatus::Zero, (data as u64).min(end) - offset))
            }
            Ok(_) => {
                let hole = lseek(&self.file, offset as i64, Whence::SeekHole)
                    .map(|h| h as u64)
                    .unwrap_or(end);
                Ok((BlockStatus::Data, hole.clamp(offset + 1, end) - offset))
            }
            Err(nix::errno::Errno::ENXIO) => Ok((BlockStatus::Zero, len)),
            Err(_) => Ok((BlockStatus::Data, len)),
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn backing(&self) -> Option<&dyn BlockBackend> {
        None
    }
}
