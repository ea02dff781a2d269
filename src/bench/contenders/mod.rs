//! The real contenders of `vmlab bench boot`: vmlab, QEMU microvm and runc,
//! each to the guest's init (the default kernel and initramfs) and to
//! ssh-ready (the default Debian image).

mod debian;
mod oci;
mod qemu;
mod qemu_ssh;
mod rootfs;
mod runc;
mod runc_sshd;
mod scratch;
mod ssh_probe;
mod ssh_run;
mod vmlab;
mod vmlab_resume;
mod vmlab_ssh;

use std::path::PathBuf;

#[cfg(test)]
pub(crate) use debian::spec as debian_spec_for_tests;
pub use debian::{DebianGuest, DebianSpec};
pub use qemu::QemuMicrovm;
pub use qemu_ssh::QemuSsh;
pub use runc::Runc;
pub use runc_sshd::RuncSshd;
pub use vmlab::Vmlab;
pub use vmlab_resume::VmlabResume;
pub use vmlab_ssh::VmlabSsh;

/// The guest every VM contender boots, the same for all of them.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub mem_mib: u64,
    /// Appended to vmlab's base command line; QEMU gets the same whole line.
    pub cmdline: String,
}

/// What the guest's kernel command line adds for a benchmark boot: a quiet
/// console, and the init's benchmark mode (power off right after the
/// boot-timer write, see guest/README.md).
pub const BENCH_CMDLINE: &str = "quiet vmlab.bench=1";
