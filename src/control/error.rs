//! Why a VM-management command failed: each message is one line that names
//! the VM or file and says what to do.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid VM name '{name}': {why} (use lowercase letters, digits and '-', e.g. vm1)")]
    BadName { name: String, why: String },
    #[error("no VM named {0} (see vmlab ps)")]
    NotFound(String),
    #[error("VM {0} is already running (stop it with vmlab stop {0}, or pick another --name)")]
    Running(String),
    #[error("VM {0} is not running (start it with vmlab run --name {0} --detach)")]
    NotRunning(String),
    #[error("VM {name} is suspended: {what} would change the disks its saved memory expects (vmlab resume {name}, or vmlab stop {name} to discard the saved state)")]
    Suspended { name: String, what: String },
    #[error("a VM named {0} already exists (remove it with vmlab rm {0}, or pick another name)")]
    Exists(String),
    #[error("{path}:{line}: {message}")]
    Config {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {name}: {message}")]
    Protocol { name: String, message: String },
    #[error("VM {name} failed to start: {message}")]
    StartFailed { name: String, message: String },
    #[error("VM {vm}: {source}")]
    Disk {
        vm: String,
        source: crate::disk::DiskError,
    },
    #[error(transparent)]
    Vmm(#[from] crate::vmm::VmmError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Net(#[from] crate::net::NatError),
    #[error(transparent)]
    DiskBoot(#[from] crate::image::DiskBootError),
    #[error("invalid snapshot name '{name}': {why} (e.g. before-upgrade)")]
    BadSnapshotName { name: String, why: String },
    #[error("VM {vm} already has a snapshot named {name} (see vmlab snapshot ls {vm}; remove it with vmlab snapshot rm {vm} {name})")]
    SnapshotExists { vm: String, name: String },
    #[error("VM {vm} has no snapshot named {name} (see vmlab snapshot ls {vm})")]
    NoSnapshot { vm: String, name: String },
    /// A request the state of things refuses, worded completely by the caller.
    #[error("{0}")]
    Refused(String),
}

impl ControlError {
    /// Wraps an I/O error with what was being done and to which file.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ControlError {
        let path = path.to_path_buf();
        move |source| ControlError::Io { what, path, source }
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;
