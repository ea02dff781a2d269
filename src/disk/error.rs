//! Errors of the block layer. Each names the image it concerns and, where the
//! user can act, what to do, so the CLI prints it as one line. Paths and
//! reasons may come from an image (a backing file name): they are shown
//! escaped.

use std::io;
use std::path::{Path, PathBuf};

use super::backing_policy::BackingRefusal;
use crate::escape::{self, Escaped};

fn show(path: &Path) -> String {
    escape::path(path)
}

/// Everything that can go wrong opening, creating or doing I/O on an image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{}: {err}", show(path))]
    Io { path: PathBuf, err: io::Error },

    #[error("{}: no such file", show(path))]
    NotFound { path: PathBuf },

    #[error("{}: {}", show(path), Escaped(reason))]
    InvalidFile { path: PathBuf, reason: String },

    #[error(
        "{}: image is in use by {}; stop it first or clone a different image",
        show(path),
        Escaped(holder)
    )]
    Locked { path: PathBuf, holder: String },

    #[error("{}: corrupt qcow2 image: {}", show(path), Escaped(reason))]
    Corrupt { path: PathBuf, reason: String },

    #[error("{}: unsupported: {}", show(path), Escaped(what))]
    Unsupported { path: PathBuf, what: String },

    #[error("{}: image is read-only", show(path))]
    ReadOnly { path: PathBuf },

    #[error(
        "request at offset {offset} of {len} bytes lies beyond the end of the disk ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },

    #[error("{}: already exists; pass --force to overwrite it", show(path))]
    Exists { path: PathBuf },

    #[error("{}: new size {requested} is smaller than the current {current} bytes; images can only grow", show(path))]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },

    #[error("{}", Escaped(.0))]
    InvalidArgument(String),

    #[error("{}: backing chain: {}", show(path), Escaped(reason))]
    BackingChain { path: PathBuf, reason: String },

    /// A backing file the policy refuses (see `BackingPolicy`); `backing`
    /// is where the name really leads.
    #[error("{}: backing file {} {reason}{}", show(image), show(backing), allow_hint(*reason, backing))]
    BackingNotAllowed {
        image: PathBuf,
        backing: PathBuf,
        reason: BackingRefusal,
    },
}

fn allow_hint(reason: BackingRefusal, backing: &Path) -> String {
    match reason {
        BackingRefusal::Secret => String::new(),
        _ => format!("; if you trust it, pass --allow-backing {}", show(backing)),
    }
}

/// Shorthand for results of the block layer.
pub type Result<T, E = DiskError> = std::result::Result<T, E>;

impl DiskError {
    /// An I/O error on `path`, turning ENOENT into the clearer `NotFound`.
    pub fn io(path: &Path, err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::NotFound {
            DiskError::NotFound {
                path: path.to_path_buf(),
            }
        } else {
            DiskError::Io {
                path: path.to_path_buf(),
                err,
            }
        }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        DiskError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> Self {
        DiskError::Unsupported {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}
