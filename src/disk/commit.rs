//! Committing a qcow2 overlay into its backing file (`qemu-img commit -d`):
//! every cluster the overlay holds itself, data or zero, is written at the
//! same place in the backing image, which then reads as the overlay does.
//! And merging: the committed backing file renamed over the overlay, so the
//! two layers become one under the overlay's name.
//!
//! Crash safety: the overlay is only read, and the backing file is written
//! only where the overlay holds clusters of its own, which the overlay's
//! reads never fall through to. So the overlay reads the same at every
//! instant of a commit, whatever state the backing file is in, and the
//! backing file's own metadata goes to disk in the crash-safe order of
//! `qcow2::writeback`. A kill -9 leaves the overlay's content whole and the
//! backing file consistent, partly committed; the merge's rename is atomic.
//! Whatever else reads the backing file sees it change: the caller makes
//! sure nothing does (a process that has it open holds a lock that makes
//! the commit fail at once).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backend::{BlockBackend, ImageFormat};
use super::backing_policy::BackingPolicy;
use super::error::{DiskError, Result};
use super::lock::{lock_image, LockMode};
use super::open::{open_backing_of, open_file, probe, read_qcow2_header, resolve_backing};
use super::open::{OpenOptions, Opened};
use super::qcow2::{Allocation, Qcow2Image};

/// Data moves this much at a time.
const CHUNK: u64 = 1 << 20;
/// Longest run asked about at once (the answer never spans L2 tables).
const MAX_RUN: u64 = 1 << 30;

/// What a commit did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The backing file written to.
    pub backing: PathBuf,
    pub bytes_copied: u64,
    pub bytes_zeroed: u64,
}

/// Writes what the qcow2 image `top` holds into its backing file, growing
/// the backing file first if it is smaller. `top` is left as it was. The
/// backing chain must pass `policy` (a commit writes where it leads), and
/// the writes pass the backing file's overlap checks like a guest's.
pub fn commit_image(top: &Path, policy: &BackingPolicy) -> Result<CommitOutcome> {
    let pair = CommitPair::open(top, policy)?;
    pair.commit()
}

/// Merges the qcow2 image `top` and its backing file into one image at
/// `top`'s path: commits `top` into the backing file, then renames the
/// backing file over `top` (with `top`'s permissions). The backing file must
/// lie in `top`'s directory (its own backing name stays valid), and nothing
/// but `top` may read it; its chain must pass `policy`. Returns where the
/// backing file was.
pub fn merge_into_backing(top: &Path, policy: &BackingPolicy) -> Result<PathBuf> {
    let top_mode = std::fs::metadata(top)
        .map_err(|e| DiskError::io(top, e))?
        .permissions()
        .mode();
    let backing = backing_path(top)?;
    let same_dir = match (canonical_dir(top), canonical_dir(&backing)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    };
    if !same_dir {
        return Err(DiskError::InvalidArgument(format!(
            "{}: its backing file {} is in another directory; only layers side by side can be merged",
            top.display(),
            backing.display()
        )));
    }
    // A frozen layer is read-only on the host; its owner may still commit.
    let backing_mode = std::fs::metadata(&backing)
        .map_err(|e| DiskError::io(&backing, e))?
        .permissions()
        .mode();
    set_mode(&backing, backing_mode | 0o200)?;
    let result = CommitPair::open(top, policy).and_then(|pair| {
        pair.commit()?;
        // Still holding both images (and their locks) while renaming.
        set_mode(&backing, top_mode)?;
        std::fs::rename(&backing, top).map_err(|e| DiskError::io(top, e))?;
        sync_dir(top);
        Ok(())
    });
    if result.is_err() && backing.exists() {
        let _ = set_mode(&backing, backing_mode);
    }
    result.map(|()| backing)
}

/// An overlay open for reading over its backing file open for writing.
struct CommitPair {
    overlay: Qcow2Image,
    backing: Arc<dyn BlockBackend>,
    backing_path: PathBuf,
}

impl CommitPair {
    fn open(top: &Path, policy: &BackingPolicy) -> Result<Self> {
        let file = open_file(top, true)?;
        // Nobody may write the overlay while it is committed.
        lock_image(&file, top, LockMode::SharedRead)?;
        if probe(&file, top)? != ImageFormat::Qcow2 {
            return Err(DiskError::InvalidArgument(format!(
                "{}: not a qcow2 image; only a qcow2 overlay can be committed",
                top.display()
            )));
        }
        let hdr = read_qcow2_header(&file, top)?;
        let Some(name) = hdr.backing_file.clone() else {
            return Err(DiskError::InvalidArgument(format!(
                "{}: has no backing file to commit into",
                top.display()
            )));
        };
        let format = match hdr.backing_format.as_deref() {
            None => None,
            Some(f) => Some(ImageFormat::from_name(f).ok_or_else(|| {
                DiskError::unsupported(top, format!("backing file format '{f}'"))
            })?),
        };
        let backing_path = resolve_backing(top, &name);
        let meta = file.metadata().map_err(|e| DiskError::io(top, e))?;
        let overlay_id = (meta.dev(), meta.ino());
        let opts = OpenOptions {
            format,
            ..OpenOptions::read_write().with_backing_policy(policy.clone())
        };
        let backing: Arc<dyn BlockBackend> = match open_backing_of(top, overlay_id, &name, &opts)? {
            Opened::Qcow2(mut q) => {
                if q.size() < hdr.size {
                    q.resize(hdr.size)?;
                }
                Arc::from(q as Box<dyn BlockBackend>)
            }
            Opened::Raw(r) if r.size() < hdr.size => {
                r.resize(hdr.size)?;
                drop(r);
                match open_backing_of(top, overlay_id, &name, &opts)? {
                    Opened::Raw(r) => Arc::new(r),
                    Opened::Qcow2(q) => Arc::from(q as Box<dyn BlockBackend>),
                }
            }
            Opened::Raw(r) => Arc::new(r),
        };
        let overlay_opts = OpenOptions {
            format: Some(ImageFormat::Qcow2),
            ..OpenOptions::read_only()
        };
        let overlay = Qcow2Image::open(file, top, hdr, &overlay_opts, Some(backing.clone()))?;
        Ok(CommitPair {
            overlay,
            backing,
            backing_path,
        })
    }

    fn commit(self) -> Result<CommitOutcome> {
        let size = self.overlay.size();
        let mut outcome = CommitOutcome {
            backing: self.backing_path.clone(),
            bytes_copied: 0,
            bytes_zeroed: 0,
        };
        let mut buf = vec![0u8; CHUNK as usize];
        let mut pos = 0;
        while pos < size {
            let (kind, run) = self.overlay.allocation(pos, (size - pos).min(MAX_RUN))?;
            match kind {
                Allocation::Data => {
                    let mut done = 0;
                    while done < run {
                        let n = (run - done).min(CHUNK) as usize;
                        self.overlay.read_at(pos + done, &mut buf[..n])?;
                        self.backing.write_at(pos + done, &buf[..n])?;
                        done += n as u64;
                    }
                    outcome.bytes_copied += run;
                }
                Allocation::Zero => {
                    self.backing.write_zeroes(pos, run)?;
                    outcome.bytes_zeroed += run;
                }
                Allocation::Unallocated => {}
            }
            pos += run;
        }
        self.backing.flush()?;
        Ok(outcome)
    }
}

/// Where the backing file of the qcow2 image `top` is.
fn backing_path(top: &Path) -> Result<PathBuf> {
    let file = open_file(top, true)?;
    if probe(&file, top)? != ImageFormat::Qcow2 {
        return Err(DiskError::InvalidArgument(format!(
            "{}: not a qcow2 image",
            top.display()
        )));
    }
    match read_qcow2_header(&file, top)?.backing_file {
        Some(name) => Ok(resolve_backing(top, &name)),
        None => Err(DiskError::InvalidArgument(format!(
            "{}: has no backing file to merge with",
            top.display()
        ))),
    }
}

fn canonical_dir(path: &Path) -> Option<PathBuf> {
    path.canonicalize().ok()?.parent().map(Path::to_path_buf)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| DiskError::io(path, e))
}

/// Makes a rename in `path`'s directory durable (best effort).
pub(crate) fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
