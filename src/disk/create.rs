//! `vmlab disk create` and `vmlab disk resize`.

use std::path::{Path, PathBuf};

use super::backend::ImageFormat;
use super::backing_policy::BackingPolicy;
use super::error::{DiskError, Result};
use super::lock::LockMode;
use super::open::{open_image, open_top, OpenOptions, Opened};
use super::qcow2;
use super::staging::StagedFile;

/// QEMU's default cluster size.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// What `create_image` makes.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Virtual size; defaults to the backing file's.
    pub size: Option<u64>,
    pub format: ImageFormat,
    /// qcow2 only: a power of two from 512 bytes to 2 MiB.
    pub cluster_size: u64,
    /// qcow2 only: the backing file, as the user named it.
    pub backing: Option<PathBuf>,
    /// Replace an existing file (never one in use).
    pub force: bool,
    /// Where the backing file's own chain may lead.
    pub backing_policy: BackingPolicy,
}

impl CreateOptions {
    pub fn qcow2(size: u64) -> Self {
        CreateOptions {
            size: Some(size),
            format: ImageFormat::Qcow2,
            cluster_size: DEFAULT_CLUSTER_SIZE,
            backing: None,
            force: false,
            backing_policy: BackingPolicy::vmlab(),
        }
    }
}

pub(crate) fn check_size(size: u64) -> Result<()> {
    if size % 512 != 0 {
        return Err(DiskError::InvalidArgument(format!(
            "size {size} is not a multiple of 512 bytes"
        )));
    }
    Ok(())
}

/// Refuses to replace a file some process has open for writing.
pub(crate) fn check_replaceable(dst: &Path) -> Result<()> {
    if dst.symlink_metadata().is_err() {
        return Ok(());
    }
    let opts = OpenOptions {
        read_only: true,
        lock: LockMode::Write,
        format: Some(ImageFormat::Raw),
        ..OpenOptions::read_only()
    };
    match open_image(dst, &opts) {
        Err(e @ DiskError::Locked { .. }) => Err(e),
        _ => Ok(()),
    }
}

/// How an overlay at `overlay` should record `backing`: the bare file name
/// when both share a directory (the pair can move together), otherwise the
/// absolute path (the user's relative spelling was relative to their cwd).
pub(crate) fn backing_name(overlay: &Path, backing: &Path) -> Result<String> {
    let abs = backing
        .canonicalize()
        .map_err(|e| DiskError::io(backing, e))?;
    let overlay_dir = match overlay.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let overlay_dir = overlay_dir
        .canonicalize()
        .map_err(|e| DiskError::io(&overlay_dir, e))?;
    let name = if abs.parent() == Some(overlay_dir.as_path()) {
        PathBuf::from(abs.file_name().expect("canonical file path"))
    } else {
        abs
    };
    name.to_str().map(str::to_owned).ok_or_else(|| {
        DiskError::InvalidArgument(format!("{}: path is not valid UTF-8", backing.display()))
    })
}

/// Creates an image; on any failure no file is left at `path`.
pub fn create_image(path: &Path, opts: &CreateOptions) -> Result<()> {
    if !opts.cluster_size.is_power_of_two() {
        return Err(DiskError::InvalidArgument(format!(
            "cluster size {} is not a power of two",
            opts.cluster_size
        )));
    }
    let backing = match &opts.backing {
        Some(b) => {
            if opts.format != ImageFormat::Qcow2 {
                return Err(DiskError::InvalidArgument(
                    "only qcow2 images can have a backing file".into(),
                ));
            }
            // Held open (and locked shared) until the overlay is published.
            let opts = OpenOptions::read_only().with_backing_policy(opts.backing_policy.clone());
            Some((b.clone(), open_image(b, &opts)?))
        }
        None => None,
    };
    let size = match (opts.size, &backing) {
        (Some(s), _) => s,
        (None, Some((_, b))) => b.size(),
        (None, None) => {
            return Err(DiskError::InvalidArgument(
                "give a size (e.g. 10G) or a backing file to take it from".into(),
            ))
        }
    };
    check_size(size)?;
    if opts.force {
        check_replaceable(path)?;
    }
    let staged = StagedFile::create(path, opts.force)?;
    match opts.format {
        ImageFormat::Raw => staged
            .file()
            .set_len(size)
            .map_err(|e| DiskError::io(path, e))?,
        ImageFormat::Qcow2 => {
            let stored = match &backing {
                Some((bpath, b)) => Some((backing_name(path, bpath)?, b.format().name())),
                None => None,
            };
            qcow2::format_new(
                staged.file(),
                path,
                size,
                opts.cluster_size.trailing_zeros(),
                stored.as_ref().map(|(n, f)| (n.as_str(), *f)),
            )?;
        }
    }
    staged.publish()
}

/// Grows the image at `path` to `new_size` bytes; its backing chain is
/// opened under `policy`.
pub fn resize_image(path: &Path, new_size: u64, policy: &BackingPolicy) -> Result<()> {
    check_size(new_size)?;
    let opts = OpenOptions::read_write().with_backing_policy(policy.clone());
    match open_top(path, &opts)? {
        Opened::Raw(r) => r.resize(new_size),
        Opened::Qcow2(mut q) => q.resize(new_size),
    }
}
