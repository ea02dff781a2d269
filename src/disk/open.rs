//! Opening an image and its backing chain: format by content, locks as QEMU
//! takes them, backing files read-only and shared, loops and depth bounded,
//! and each backing file checked against the [`BackingPolicy`].

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::backend::{BlockBackend, ImageFormat};
use super::backing_policy::{top_dirs, AllowedBacking, BackingPolicy};
use super::error::{DiskError, Result};
use super::lock::{lock_image, LockMode};
use super::qcow2::{Header, Qcow2Image, QCOW2_MAGIC};
use super::raw::RawImage;

/// Backing chains deeper than this are refused (QEMU allows about as many).
const MAX_CHAIN_DEPTH: usize = 64;

/// How to open an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Locks on the top image; backing files get `SharedRead` (or nothing
    /// when this is `LockMode::None`).
    pub lock: LockMode,
    /// The format, when the caller knows it; otherwise probed from content.
    pub format: Option<ImageFormat>,
    /// qcow2 metadata cache budget per image in bytes (default 32 MiB of
    /// L2 tables, as QEMU); small values exercise eviction in tests.
    pub cache_bytes: Option<u64>,
    /// Where the chain's backing files may lie.
    pub backing_policy: BackingPolicy,
}

impl OpenOptions {
    /// For a VM's disk: read-write, locked against other writers.
    pub fn read_write() -> Self {
        OpenOptions {
            read_only: false,
            lock: LockMode::Write,
            format: None,
            cache_bytes: None,
            backing_policy: BackingPolicy::vmlab(),
        }
    }

    /// Read-only, keeping writers away while open.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            lock: LockMode::SharedRead,
            format: None,
            cache_bytes: None,
            backing_policy: BackingPolicy::vmlab(),
        }
    }

    /// The same options with another backing policy.
    pub fn with_backing_policy(mut self, policy: BackingPolicy) -> Self {
        self.backing_policy = policy;
        self
    }
}

/// Opens the image at `path` (and its backing chain).
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockBackend>> {
    Ok(match open_top(path, opts)? {
        Opened::Raw(r) => Box::new(r),
        Opened::Qcow2(q) => q,
    })
}

/// Opens the image at `path` as the top of a chain.
pub(crate) fn open_top(path: &Path, opts: &OpenOptions) -> Result<Opened> {
    let mut walk = ChainWalk {
        top_dirs: top_dirs(path),
        seen: Vec::new(),
    };
    open_chain(path, opts, &mut walk, 0, None)
}

/// The format of the image at `path`, judged by its content.
pub fn probe_format(path: &Path) -> Result<ImageFormat> {
    let file = open_file(path, true)?;
    probe(&file, path)
}

pub(crate) enum Opened {
    Raw(RawImage),
    Qcow2(Box<Qcow2Image>),
}

pub(crate) fn open_file(path: &Path, read_only: bool) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| DiskError::io(path, e))?;
    let ft = meta.file_type();
    // FIFOs and character devices could block or never end.
    if !ft.is_file() && !ft.is_block_device() {
        return Err(DiskError::InvalidFile {
            path: path.to_path_buf(),
            reason: "not a regular file or block device".into(),
        });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| DiskError::io(path, e))
}

pub(crate) fn probe(file: &File, path: &Path) -> Result<ImageFormat> {
    let mut magic = [0u8; 4];
    let mut reader = file;
    let mut got = 0;
    while got < 4 {
        match reader.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DiskError::io(path, e)),
        }
    }
    Ok(if got == 4 && magic == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Reads and checks the header of the qcow2 image in `file`.
pub(crate) fn read_qcow2_header(file: &File, path: &Path) -> Result<Header> {
    use std::os::unix::fs::FileExt;
    let file_len = file.metadata().map_err(|e| DiskError::io(path, e))?.len();
    let mut fixed = [0u8; 24];
    let n = file
        .read_at(&mut fixed, 0)
        .map_err(|e| DiskError::io(path, e))?;
    if n < 24 {
        return Err(DiskError::corrupt(path, "header is truncated"));
    }
    let cluster_bits = u32::from_be_bytes(fixed[20..24].try_into().expect("4 bytes"));
    let cs = 1u64 << cluster_bits.clamp(9, 21);
    let mut head = vec![0u8; cs.min(file_len) as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| DiskError::io(path, e))?;
    Header::parse(&head, file_len, path)
}

/// Where a backing file name recorded in `overlay` points: relative names
/// are relative to the overlay's directory, as in QEMU.
pub(crate) fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// Opens the backing file `name` that the image `overlay` (the file
/// `overlay_id`, the top of its chain) records, with `opts`, checked against
/// the backing policy as [`open_image`] would check it: for a caller that
/// opens the overlay's backing file itself (a commit writes it).
pub(crate) fn open_backing_of(
    overlay: &Path,
    overlay_id: (u64, u64),
    name: &str,
    opts: &OpenOptions,
) -> Result<Opened> {
    let mut walk = ChainWalk {
        top_dirs: top_dirs(overlay),
        // The overlay itself counts as seen: a chain looping back to it is
        // refused.
        seen: vec![overlay_id],
    };
    let bpath = resolve_backing(overlay, name);
    let allowed = opts.backing_policy.check(overlay, &bpath, &walk.top_dirs)?;
    open_chain(&bpath, opts, &mut walk, 1, Some(&allowed))
}

/// What a walk down one chain has learnt so far.
struct ChainWalk {
    /// Where the top image lies, for the backing policy.
    top_dirs: Vec<PathBuf>,
    /// (device, inode) of every image opened, to refuse loops.
    seen: Vec<(u64, u64)>,
}

/// Opens `path`, the `depth`th image of a chain; a backing file comes with
/// what the policy checked, and must still be that file once open.
fn open_chain(
    path: &Path,
    opts: &OpenOptions,
    walk: &mut ChainWalk,
    depth: usize,
    checked: Option<&AllowedBacking>,
) -> Result<Opened> {
    let file = open_file(path, opts.read_only)?;
    let meta = file.metadata().map_err(|e| DiskError::io(path, e))?;
    let id = (meta.dev(), meta.ino());
    if checked.is_some_and(|c| c.id != id) {
        return Err(DiskError::BackingChain {
            path: path.to_path_buf(),
            reason: "the file changed while it was being opened".into(),
        });
    }
    if walk.seen.contains(&id) {
        return Err(DiskError::BackingChain {
            path: path.to_path_buf(),
            reason: "the chain loops back to this image".into(),
        });
    }
    walk.seen.push(id);
    lock_image(&file, path, opts.lock)?;
    let detected = probe(&file, path)?;
    match opts.format.unwrap_or(detected) {
        ImageFormat::Raw => Ok(Opened::Raw(RawImage::from_file(
            file,
            path,
            opts.read_only,
            opts.format.is_none(),
        )?)),
        ImageFormat::Qcow2 => {
            if detected != ImageFormat::Qcow2 {
                return Err(DiskError::InvalidFile {
                    path: path.to_path_buf(),
                    reason: "not a qcow2 image (no qcow2 magic)".into(),
                });
            }
            let hdr = read_qcow2_header(&file, path)?;
            let backing = match &hdr.backing_file {
                Some(name) => {
                    if depth + 1 >= MAX_CHAIN_DEPTH {
                        return Err(DiskError::BackingChain {
                            path: path.to_path_buf(),
                            reason: format!("more than {MAX_CHAIN_DEPTH} images deep"),
                        });
                    }
                    let format = match hdr.backing_format.as_deref() {
                        None => None,
                        Some(f) => Some(ImageFormat::from_name(f).ok_or_else(|| {
                            DiskError::unsupported(path, format!("backing file format '{f}'"))
                        })?),
                    };
                    let bopts = OpenOptions {
                        read_only: true,
                        lock: if opts.lock == LockMode::None {
                            LockMode::None
                        } else {
                            LockMode::SharedRead
                        },
                        format,
                        cache_bytes: opts.cache_bytes,
                        backing_policy: opts.backing_policy.clone(),
                    };
                    let bpath = resolve_backing(path, name);
                    let opened = opts
                        .backing_policy
                        .check(path, &bpath, &walk.top_dirs)
                        .and_then(|allowed| {
                            open_chain(&bpath, &bopts, walk, depth + 1, Some(&allowed))
                        })
                        .map_err(|e| match e {
                            e @ (DiskError::BackingChain { .. }
                            | DiskError::BackingNotAllowed { .. }) => e,
                            e => DiskError::BackingChain {
                                path: path.to_path_buf(),
                                reason: e.to_string(),
                            },
                        })?;
                    Some(match opened {
                        Opened::Raw(r) => Arc::new(r) as Arc<dyn BlockBackend>,
                        Opened::Qcow2(q) => Arc::from(q as Box<dyn BlockBackend>),
                    })
                }
                None => None,
            };
            let image = Qcow2Image::open(file, path, hdr, opts, backing)?;
            Ok(Opened::Qcow2(Box::new(image)))
        }
    }
}
