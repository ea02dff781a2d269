//! `vmlab clone` for disks: a linked clone is a new qcow2 overlay whose
//! backing file is the source (constant time, whatever the size); a full
//! clone copies the data, keeping holes.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::backend::{BlockBackend, BlockStatus, ImageFormat};
use super::backing_policy::BackingPolicy;
use super::create::{backing_name, check_replaceable, DEFAULT_CLUSTER_SIZE};
use super::error::{DiskError, Result};
use super::lock::LockMode;
use super::open::{open_image, open_top, OpenOptions, Opened};
use super::qcow2;
use super::staging::StagedFile;

/// Linked (shares the source's blocks) or full (standalone copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneMode {
    Linked,
    Full,
}

#[derive(Clone, Debug)]
pub struct CloneOptions {
    pub mode: CloneMode,
    /// Output format; linked clones are always qcow2, full clones default
    /// to the source's format.
    pub format: Option<ImageFormat>,
    /// Replace an existing destination (never one in use).
    pub force: bool,
    /// Where the source's backing chain may lead.
    pub backing_policy: BackingPolicy,
}

impl Default for CloneOptions {
    fn default() -> Self {
        CloneOptions {
            mode: CloneMode::Linked,
            format: None,
            force: false,
            backing_policy: BackingPolicy::vmlab(),
        }
    }
}

/// What a clone produced.
#[derive(Clone, Debug)]
pub struct CloneOutcome {
    pub format: ImageFormat,
    pub virtual_size: u64,
    /// Bytes of data copied (0 for a linked clone).
    pub bytes_copied: u64,
}

/// Copying moves this much at a time.
const COPY_CHUNK: u64 = 1 << 20;

/// Clones the disk image `src` to `dst`. The source is opened read-only with
/// a shared lock, so a source that another process has open for writing (it
/// could be mid-write) is refused, naming that process.
pub fn clone_image(src: &Path, dst: &Path, opts: &CloneOptions) -> Result<CloneOutcome> {
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dst.canonicalize()) {
        if a == b {
            return Err(DiskError::InvalidArgument(format!(
                "{}: source and destination are the same file",
                dst.display()
            )));
        }
    }
    let source = open_image(
        src,
        &OpenOptions::read_only().with_backing_policy(opts.backing_policy.clone()),
    )?;
    if opts.force {
        check_replaceable(dst)?;
    }
    match opts.mode {
        CloneMode::Linked => {
            if opts.format.is_some_and(|f| f != ImageFormat::Qcow2) {
                return Err(DiskError::InvalidArgument(
                    "a linked clone is always qcow2; add --full for a standalone raw copy".into(),
                ));
            }
            let staged = StagedFile::create(dst, opts.force)?;
            let name = backing_name(dst, src)?;
            qcow2::format_new(
                staged.file(),
                dst,
                source.size(),
                DEFAULT_CLUSTER_SIZE.trailing_zeros(),
                Some((&name, source.format().name())),
            )?;
            staged.publish()?;
            Ok(CloneOutcome {
                format: ImageFormat::Qcow2,
                virtual_size: source.size(),
                bytes_copied: 0,
            })
        }
        CloneMode::Full => {
            let format = opts.format.unwrap_or(source.format());
            let staged = StagedFile::create(dst, opts.force)?;
            let size = source.size();
            let copied = match format {
                ImageFormat::Raw => {
                    staged
                        .file()
                        .set_len(size)
                        .map_err(|e| DiskError::io(dst, e))?;
                    copy_data(source.as_ref(), |off, buf| {
                        staged
                            .file()
                            .write_all_at(buf, off)
                            .map_err(|e| DiskError::io(dst, e))
                    })?
                }
                ImageFormat::Qcow2 => {
                    qcow2::format_new(
                        staged.file(),
                        dst,
                        size,
                        DEFAULT_CLUSTER_SIZE.trailing_zeros(),
                        None,
                    )?;
                    let opts = OpenOptions {
                        read_only: false,
                        lock: LockMode::None,
                        format: Some(ImageFormat::Qcow2),
                        ..OpenOptions::read_write()
                    };
                    let Opened::Qcow2(out) = open_top(staged.tmp_path(), &opts)? else {
                        unreachable!("opened with an explicit qcow2 format")
                    };
                    let copied = copy_data(source.as_ref(), |off, buf| out.write_at(off, buf))?;
                    out.flush()?;
                    copied
                }
            };
            staged.publish()?;
            Ok(CloneOutcome {
                format,
                virtual_size: size,
                bytes_copied: copied,
            })
        }
    }
}

/// Feeds every non-zero chunk of `src` to `write`; returns bytes written.
fn copy_data(
    src: &dyn BlockBackend,
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let size = src.size();
    let mut buf = vec![0u8; COPY_CHUNK as usize];
    let mut pos = 0;
    let mut copied = 0;
    while pos < size {
        let (status, run) = src.block_status(pos, (size - pos).min(64 * COPY_CHUNK))?;
        if status == BlockStatus::Data {
            let mut done = 0;
            while done < run {
                let n = (run - done).min(COPY_CHUNK) as usize;
                src.read_at(pos + done, &mut buf[..n])?;
                if buf[..n].iter().any(|&b| b != 0) {
                    write(pos + done, &buf[..n])?;
                    copied += n as u64;
                }
                done += n as u64;
            }
        }
        pos += run;
    }
    Ok(copied)
}
