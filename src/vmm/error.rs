//! Errors setting up or running a VM. Each message says what was wrong and
//! what to do, since most reach the user as vmlab's one error line.

use crate::arch::x86_64::boot::BootError;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("/dev/kvm does not exist: this host has no KVM. Enable virtualization in the firmware and load kvm_intel or kvm_amd, or use a VM with nested virtualization")]
    NoKvm,
    #[error("permission denied opening /dev/kvm: add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(std::io::Error),
    #[error("this host's KVM lacks {0}, which vmlab needs: use a newer host kernel")]
    MissingCapability(&'static str),
    #[error("--cpus {requested} is more than this host's KVM allows ({max})")]
    TooManyCpus { requested: u8, max: usize },
    #[error("--mem {requested_mib}M is more than this host can give ({available_mib} MiB available): choose a smaller --mem")]
    MemoryTooLarge {
        requested_mib: u64,
        available_mib: u64,
    },
    #[error("--mem {0} bytes is too small: give at least 16M")]
    MemoryTooSmall(u64),
    #[error("cannot allocate guest memory: {0}")]
    GuestMemory(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up device {what}: {reason}")]
    Device { what: &'static str, reason: String },
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

impl VmmError {
    /// Wraps a KVM ioctl failure with what vmlab was doing.
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        move |source| VmmError::Kvm { what, source }
    }

    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
        move |source| VmmError::Io { what, source }
    }

    pub fn device(what: &'static str) -> impl FnOnce(String) -> VmmError {
        move |reason| VmmError::Device { what, reason }
    }
}
