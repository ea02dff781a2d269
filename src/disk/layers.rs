//! Chain operations on the images of a disk, the building blocks of
//! snapshots: freezing the top image into a layer under a new overlay (and
//! undoing that), a fresh overlay over a layer (a restore), stacking an
//! overlay over an image that is open and in use (a live snapshot), and the
//! chain of file names behind an image.
//!
//! Every step keeps the path of the disk a valid image at each instant: new
//! files are made under a temporary name and renamed into place, and a
//! layer gets its name by a hard link before anything points at it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backend::{BlockBackend, ImageFormat};
use super::backing_policy::{top_dirs, BackingPolicy};
use super::commit::sync_dir;
use super::create::DEFAULT_CLUSTER_SIZE;
use super::error::{DiskError, Result};
use super::lock::{lock_image, LockMode};
use super::open::{open_file, probe, read_qcow2_header, resolve_backing, OpenOptions};
use super::qcow2::{self, Qcow2Image};
use super::raw::file_size;
use super::staging::StagedFile;

/// Longest chain `backing_chain` follows (as `open_image` does).
const MAX_CHAIN_DEPTH: usize = 64;

/// A top image frozen by [`freeze_top`]: what [`unfreeze_top`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrozenTop {
    pub top: PathBuf,
    pub layer: PathBuf,
    /// The top's permissions before it was frozen (a layer is read-only).
    pub mode: u32,
}

/// Freezes the disk image `top` as `layer` (a new name in the same
/// directory) and puts an empty qcow2 overlay over it at `top`, so that the
/// disk reads the same and from now on writes only the overlay. Constant
/// time. A process that has `top` open keeps writing the layer until it
/// switches to the overlay (see [`open_overlay_over`]).
///
/// The steps: `layer` is hard-linked to `top` (one file, two names), the
/// overlay is written under a temporary name and renamed over `top`, then
/// the layer is made read-only. A crash leaves `top` as it was (maybe with
/// a second name) or the overlay over the layer: the same content, each a
/// valid chain. On failure nothing is left.
pub fn freeze_top(top: &Path, layer: &Path) -> Result<FrozenTop> {
    let layer_name = side_by_side(top, layer)?;
    let (size, format) = image_size(top)?;
    let mode = std::fs::metadata(top)
        .map_err(|e| DiskError::io(top, e))?
        .permissions()
        .mode();
    std::fs::hard_link(top, layer).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            DiskError::Exists {
                path: layer.to_path_buf(),
            }
        } else {
            DiskError::io(layer, e)
        }
    })?;
    if let Err(e) = stage_overlay(top, size, &layer_name, format).and_then(StagedFile::publish) {
        let _ = std::fs::remove_file(layer);
        return Err(e);
    }
    // Read-only, and like the disk it was, its owner's only.
    let _ = std::fs::set_permissions(layer, std::fs::Permissions::from_mode(0o400));
    Ok(FrozenTop {
        top: top.to_path_buf(),
        layer: layer.to_path_buf(),
        mode,
    })
}

/// Undoes [`freeze_top`] while nothing has written to the overlay: the layer
/// gets its permissions back and is renamed over the overlay (atomically).
pub fn unfreeze_top(frozen: &FrozenTop) -> Result<()> {
    let layer = &frozen.layer;
    std::fs::set_permissions(layer, std::fs::Permissions::from_mode(frozen.mode & 0o7777))
        .map_err(|e| DiskError::io(layer, e))?;
    std::fs::rename(layer, &frozen.top).map_err(|e| DiskError::io(&frozen.top, e))?;
    sync_dir(&frozen.top);
    Ok(())
}

/// Replaces the image at `top` with an empty qcow2 overlay over `layer`
/// (same directory), of the layer's size: the disk goes back to the layer's
/// content. The old `top` is gone once the new one is in place (one rename);
/// refused while a process has `top` open for writing, or when the layer's
/// chain leads where `policy` forbids.
pub fn overlay_onto(top: &Path, layer: &Path, policy: &BackingPolicy) -> Result<()> {
    prepare_overlay_onto(top, layer, policy)?.publish()
}

/// An overlay written under a temporary name, not yet renamed into place:
/// several disks can be prepared (where a full host disk would fail) before
/// any of them changes. Dropped unpublished, it leaves nothing.
pub struct PreparedOverlay(StagedFile);

/// The first half of [`overlay_onto`].
pub fn prepare_overlay_onto(
    top: &Path,
    layer: &Path,
    policy: &BackingPolicy,
) -> Result<PreparedOverlay> {
    let layer_name = side_by_side(top, layer)?;
    // The new overlay's chain is the layer's: checked as opening it will be.
    checked_backing_chain(layer, policy)?;
    let (size, format) = image_size(layer)?;
    super::create::check_replaceable(top)?;
    stage_overlay(top, size, &layer_name, format).map(PreparedOverlay)
}

impl PreparedOverlay {
    /// Renames the overlay over its top image (atomically, durably).
    pub fn publish(self) -> Result<()> {
        self.0.publish()
    }
}

/// Writes an empty qcow2 overlay of `size` bytes naming `backing` (of
/// `format`) under a temporary name, to be renamed over `top`.
fn stage_overlay(top: &Path, size: u64, backing: &str, format: ImageFormat) -> Result<StagedFile> {
    let staged = StagedFile::create(top, true)?;
    qcow2::format_new(
        staged.file(),
        top,
        size,
        DEFAULT_CLUSTER_SIZE.trailing_zeros(),
        Some((backing, format.name())),
    )?;
    Ok(staged)
}

/// Opens the qcow2 image at `path` for writing over `backing`, an image
/// already open (and in use): `path`'s chain must lead to that very file,
/// directly or through qcow2 layers opened here read-only (overlays a
/// killed snapshot command froze but never switched the VM to: they hold
/// nothing the open image does not). For a live snapshot, after
/// [`freeze_top`]; `backing` is frozen (see [`BlockBackend::freeze`])
/// before the new overlay is written. Each backing file named on the way
/// down must pass `policy`.
pub fn open_overlay_over(
    path: &Path,
    backing: Arc<dyn BlockBackend>,
    policy: &BackingPolicy,
) -> Result<Box<dyn BlockBackend>> {
    let target = backing.file_identity().ok_or_else(|| {
        DiskError::unsupported(backing.path(), "stacking an overlay over this image")
    })?;
    let down = DownTo {
        backing: &backing,
        target,
        policy,
        top_dirs: top_dirs(path),
    };
    let (top, size) = open_down_to(path, false, &down, 0)?;
    if size != backing.size() {
        return Err(DiskError::BackingChain {
            path: path.to_path_buf(),
            reason: "its size differs from the image it was made over".into(),
        });
    }
    Ok(Box::new(top))
}

/// Where [`open_down_to`] is headed, and under which rule.
struct DownTo<'a> {
    /// The open image, whose file is `target`.
    backing: &'a Arc<dyn BlockBackend>,
    target: (u64, u64),
    policy: &'a BackingPolicy,
    /// Where the chain's top image lies, for the policy.
    top_dirs: Vec<PathBuf>,
}

/// Opens the qcow2 image at `path` over the chain down to the open image
/// `down.backing`; returns it and its virtual size.
fn open_down_to(
    path: &Path,
    read_only: bool,
    down: &DownTo<'_>,
    depth: usize,
) -> Result<(Qcow2Image, u64)> {
    let backing = down.backing;
    let not_over = || DiskError::BackingChain {
        path: path.to_path_buf(),
        reason: format!(
            "its backing chain does not lead to the open image {} it was made over",
            backing.path().display()
        ),
    };
    if depth >= MAX_CHAIN_DEPTH {
        return Err(not_over());
    }
    let file = open_file(path, read_only)?;
    let lock = if read_only {
        LockMode::SharedRead
    } else {
        LockMode::Write
    };
    lock_image(&file, path, lock)?;
    if probe(&file, path)? != ImageFormat::Qcow2 {
        return Err(not_over());
    }
    let hdr = read_qcow2_header(&file, path)?;
    let named = hdr.backing_file.as_deref().ok_or_else(not_over)?;
    let named = resolve_backing(path, named);
    if !named.exists() {
        return Err(not_over());
    }
    let named_id = down.policy.check(path, &named, &down.top_dirs)?.id;
    let below: Arc<dyn BlockBackend> = if named_id == down.target {
        backing.clone()
    } else {
        let (layer, _) = open_down_to(&named, true, down, depth + 1)?;
        Arc::new(layer)
    };
    let opts = OpenOptions {
        read_only,
        lock,
        format: Some(ImageFormat::Qcow2),
        ..OpenOptions::read_only()
    };
    let size = hdr.size;
    Ok((Qcow2Image::open(file, path, hdr, &opts, Some(below))?, size))
}

/// The files of the chain behind the image at `path`, `path` first, as the
/// headers name them (resolved, not canonicalised). Reads headers only and
/// takes no lock, so it works on images in use.
pub fn backing_chain(path: &Path) -> Result<Vec<PathBuf>> {
    walk_chain(path, None)
}

/// [`backing_chain`], each backing file checked against `policy` as opening
/// the chain would check it.
pub fn checked_backing_chain(path: &Path, policy: &BackingPolicy) -> Result<Vec<PathBuf>> {
    walk_chain(path, Some((policy, top_dirs(path))))
}

fn walk_chain(path: &Path, policy: Option<(&BackingPolicy, Vec<PathBuf>)>) -> Result<Vec<PathBuf>> {
    let mut chain = vec![path.to_path_buf()];
    let mut seen = Vec::new();
    loop {
        let current = chain.last().expect("never empty").clone();
        let file = open_file(&current, true)?;
        let meta = file.metadata().map_err(|e| DiskError::io(&current, e))?;
        if seen.contains(&(meta.dev(), meta.ino())) {
            return Err(DiskError::BackingChain {
                path: current,
                reason: "the chain loops back to this image".into(),
            });
        }
        seen.push((meta.dev(), meta.ino()));
        if probe(&file, &current)? != ImageFormat::Qcow2 {
            return Ok(chain);
        }
        match read_qcow2_header(&file, &current)?.backing_file {
            None => return Ok(chain),
            Some(_) if chain.len() >= MAX_CHAIN_DEPTH => {
                return Err(DiskError::BackingChain {
                    path: current,
                    reason: format!("more than {MAX_CHAIN_DEPTH} images deep"),
                })
            }
            Some(name) => {
                let next = resolve_backing(&current, &name);
                if let Some((policy, top_dirs)) = &policy {
                    policy.check(&current, &next, top_dirs)?;
                }
                chain.push(next);
            }
        }
    }
}

/// Checks that `layer` is a new name beside `top`; returns its file name,
/// which is how an overlay at `top` names it.
fn side_by_side(top: &Path, layer: &Path) -> Result<String> {
    let name = layer.file_name().and_then(|n| n.to_str());
    match name {
        Some(name) if layer.parent() == top.parent() => Ok(name.to_string()),
        _ => Err(DiskError::InvalidArgument(format!(
            "{}: a layer must be a UTF-8 file name in the directory of {}",
            layer.display(),
            top.display()
        ))),
    }
}

/// Virtual size and format of the image at `path`, without taking a lock.
fn image_size(path: &Path) -> Result<(u64, ImageFormat)> {
    let file = open_file(path, true)?;
    match probe(&file, path)? {
        ImageFormat::Qcow2 => Ok((read_qcow2_header(&file, path)?.size, ImageFormat::Qcow2)),
        ImageFormat::Raw => Ok((
            file_size(&file).map_err(|e| DiskError::io(path, e))?,
            ImageFormat::Raw,
        )),
    }
}
