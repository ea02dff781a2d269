//! The kernel and initrd a VM's own disk carries, as a cloud image's boot
//! loader finds them: `/boot/vmlinuz` and `/boot/initrd.img`, symlinks
//! followed, read out of the disk's ext4 filesystem through vmlab's own
//! disk layer (so a qcow2 chain reads as the guest last left it). A kernel
//! installed or upgraded inside the guest boots next time.
//!
//! The disk is the guest's and untrusted: ext4-view checks every structure
//! it reads and never writes, the sizes read are bounded, and every failure
//! is one line naming the disk and the file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use ext4_view::{Ext4, Ext4Error, Ext4Read};

use crate::disk::{self, BackingPolicy, BlockBackend, DiskError};
use crate::vmm::BootFile;

/// The link to the kernel to boot, as Debian's kernel packages keep it
/// (`link_in_boot = yes` in /etc/kernel-img.conf).
pub const KERNEL_LINK: &str = "/boot/vmlinuz";
/// The link to its initrd.
pub const INITRD_LINK: &str = "/boot/initrd.img";
/// Far above any real kernel (Debian's are 8 to 15 MiB).
const MAX_KERNEL: u64 = 256 << 20;

/// What vmlab boots a full-flavor VM with.
#[derive(Debug)]
pub struct DiskBoot {
    pub kernel: BootFile,
    pub initrd: BootFile,
    /// Where the links led, e.g. `/boot/vmlinuz-6.1.0-50-cloud-amd64`.
    pub kernel_path: String,
    pub initrd_path: String,
}

/// Why a disk's kernel or initrd could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiskBootError {
    #[error("cannot read the kernel from the VM's disk: {0}")]
    Open(DiskError),
    #[error("{} holds no ext4 filesystem vmlab can read ({source}): vmlab boots the kernel of an unpartitioned ext4 root disk", disk.display())]
    NoFilesystem { disk: PathBuf, source: Ext4Error },
    #[error("{} has no {what} at {link}{detail}: install a kernel in the guest (apt install linux-image-cloud-amd64), or boot it with --kernel and --initrd", disk.display())]
    Missing {
        disk: PathBuf,
        what: &'static str,
        link: &'static str,
        /// Where a dangling link points, when it does.
        detail: String,
    },
    #[error("cannot read {path} from {}: {source}", disk.display())]
    Unreadable {
        disk: PathBuf,
        path: String,
        source: Ext4Error,
    },
    #[error("{path} on {} is {size} bytes, more than the {limit} vmlab reads for a {what}", disk.display())]
    TooLarge {
        disk: PathBuf,
        path: String,
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("cannot hold {path} in memory: {source}")]
    Memory {
        path: String,
        source: std::io::Error,
    },
}

/// ext4-view's view of a vmlab disk.
struct DiskReader(Box<dyn BlockBackend>);

impl Ext4Read for DiskReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(start_byte, dst).map_err(Into::into)
    }
}

/// Reads the kernel and initrd the disk image at `disk` (raw or qcow2, any
/// backing chain) carries. `max_initrd` bounds the initrd (it must fit in
/// the guest's memory anyway). Opens the image read-only, sharing it, its
/// backing files checked against `backing` as the VM's disks are.
pub fn read_disk_boot(
    disk: &Path,
    max_initrd: u64,
    backing: &BackingPolicy,
) -> Result<DiskBoot, DiskBootError> {
    let options = disk::OpenOptions::read_only().with_backing_policy(backing.clone());
    let backend = disk::open_image(disk, &options).map_err(DiskBootError::Open)?;
    let fs = Ext4::load(Box::new(DiskReader(backend))).map_err(|source| {
        DiskBootError::NoFilesystem {
            disk: disk.to_path_buf(),
            source,
        }
    })?;
    let (kernel, kernel_path) = read_linked(&fs, disk, KERNEL_LINK, "kernel", MAX_KERNEL)?;
    let (initrd, initrd_path) = read_linked(&fs, disk, INITRD_LINK, "initrd", max_initrd)?;
    Ok(DiskBoot {
        kernel,
        initrd,
        kernel_path,
        initrd_path,
    })
}

/// The file `link` leads to, in memory, and its resolved path.
fn read_linked(
    fs: &Ext4,
    disk: &Path,
    link: &'static str,
    what: &'static str,
    limit: u64,
) -> Result<(BootFile, String), DiskBootError> {
    let unreadable = |path: &str, source| DiskBootError::Unreadable {
        disk: disk.to_path_buf(),
        path: path.to_string(),
        source,
    };
    let resolved = match fs.canonicalize(link) {
        Ok(resolved) => resolved,
        Err(Ext4Error::NotFound) => {
            let detail = match fs.read_link(link) {
                Ok(to) => format!(" (it links to {}, which does not exist)", to.display()),
                Err(_) => String::new(),
            };
            return Err(DiskBootError::Missing {
                disk: disk.to_path_buf(),
                what,
                link,
                detail,
            });
        }
        Err(source) => return Err(unreadable(link, source)),
    };
    let target = resolved.display().to_string();
    let size = fs
        .metadata(&resolved)
        .map_err(|e| unreadable(&target, e))?
        .len();
    if size > limit {
        return Err(DiskBootError::TooLarge {
            disk: disk.to_path_buf(),
            path: target,
            what,
            size,
            limit,
        });
    }
    let bytes = fs.read(&resolved).map_err(|e| unreadable(&target, e))?;
    let memory = |source| DiskBootError::Memory {
        path: target.clone(),
        source,
    };
    let name = format!("vmlab-{what}");
    let mut file = File::from(
        nix::sys::memfd::memfd_create(name.as_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| memory(e.into()))?,
    );
    file.write_all(&bytes).map_err(memory)?;
    let label = format!("{}:{target}", disk.display());
    Ok((BootFile::in_memory(label, file), target))
}
