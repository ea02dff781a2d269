//! `vmlab disk info`: format, sizes and backing chain of an image.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::backend::{BlockBackend, ImageFormat};
use super::backing_policy::BackingPolicy;
use super::error::{DiskError, Result};
use super::lock::LockMode;
use super::open::{open_image, read_qcow2_header, OpenOptions};
use crate::cli::ByteSize;
use crate::escape::{self, Escaped};

/// One image of a chain.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub format: ImageFormat,
    pub virtual_size: u64,
    /// Bytes the file occupies on the host filesystem.
    pub allocated: u64,
    /// qcow2 only.
    pub cluster_size: Option<u64>,
    pub qcow2_version: Option<u32>,
    /// The backing file name as recorded in the image.
    pub backing_name: Option<String>,
    /// Held open for writing by some process (QEMU's or vmlab's lock).
    pub in_use: bool,
}

/// Describes the image at `path` and each image behind it, top first,
/// following the chain under `policy`. Takes no lock, so it works on images
/// in use.
pub fn image_info(path: &Path, policy: &BackingPolicy) -> Result<Vec<ImageInfo>> {
    let opts = OpenOptions {
        lock: LockMode::None,
        ..OpenOptions::read_only().with_backing_policy(policy.clone())
    };
    let top = open_image(path, &opts)?;
    let mut chain = Vec::new();
    let mut node: Option<&dyn BlockBackend> = Some(top.as_ref());
    while let Some(img) = node {
        chain.push(describe(img)?);
        node = img.backing();
    }
    Ok(chain)
}

fn describe(img: &dyn BlockBackend) -> Result<ImageInfo> {
    let path = img.path();
    let file = std::fs::File::open(path).map_err(|e| DiskError::io(path, e))?;
    let meta = file.metadata().map_err(|e| DiskError::io(path, e))?;
    let header = match img.format() {
        ImageFormat::Qcow2 => Some(read_qcow2_header(&file, path)?),
        ImageFormat::Raw => None,
    };
    Ok(ImageInfo {
        path: path.to_path_buf(),
        format: img.format(),
        virtual_size: img.size(),
        allocated: meta.blocks() * 512,
        cluster_size: header.as_ref().map(|h| h.cluster_size()),
        qcow2_version: header.as_ref().map(|h| h.version),
        backing_name: header.and_then(|h| h.backing_file),
        in_use: super::lock::held_for_writing(&file),
    })
}

/// A byte count for people: `12.3 MiB`.
pub fn human_size(bytes: u64) -> String {
    let units = [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in units {
        if bytes >= unit {
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} B")
}

impl fmt::Display for ImageInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "image: {}", escape::path(&self.path))?;
        match (self.qcow2_version, self.cluster_size) {
            (Some(v), Some(cs)) => writeln!(
                f,
                "format: {} (version {v}, cluster size {})",
                self.format,
                ByteSize(cs)
            )?,
            _ => writeln!(f, "format: {}", self.format)?,
        }
        writeln!(
            f,
            "virtual size: {} ({} bytes)",
            human_size(self.virtual_size),
            self.virtual_size
        )?;
        writeln!(
            f,
            "allocated: {} ({} bytes)",
            human_size(self.allocated),
            self.allocated
        )?;
        if let Some(b) = &self.backing_name {
            writeln!(f, "backing file: {}", Escaped(b))?;
        }
        if self.in_use {
            writeln!(f, "in use: open for writing by another process")?;
        }
        Ok(())
    }
}
