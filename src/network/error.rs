//! Why a lab-network command failed: one line naming the network, member
//! or file, and what to do.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "invalid network name '{name}': {why} (use lowercase letters, digits and '-', e.g. lab)"
    )]
    BadName { name: String, why: String },
    #[error(
        "no network named {0} (see vmlab network ls, or create it with vmlab network create {0})"
    )]
    NotFound(String),
    #[error("a network named {0} already exists (see vmlab network show {0})")]
    Exists(String),
    #[error("subnet {subnet} overlaps {other}'s {other_subnet}: choose another --subnet")]
    Overlap {
        subnet: String,
        other: String,
        other_subnet: String,
    },
    #[error("no free /24 left from 192.168.100.0 up: give one with --subnet")]
    NoFreeSubnet,
    #[error(transparent)]
    Subnet(#[from] super::subnet::SubnetParseError),
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
    #[error("network {name}: {message}")]
    Daemon { name: String, message: String },
    /// The network refused a request; the daemon worded it.
    #[error("network {name}: {message}")]
    Refused { name: String, message: String },
    #[error(transparent)]
    Nat(#[from] crate::net::NatError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

impl NetworkError {
    /// Wraps an I/O error with what was being done and to which file.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NetworkError {
        let path = path.to_path_buf();
        move |source| NetworkError::Io { what, path, source }
    }
}

pub type Result<T, E = NetworkError> = std::result::Result<T, E>;
