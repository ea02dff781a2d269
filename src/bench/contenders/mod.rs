//! The real contenders of `vmlab bench boot`: vmlab itself, QEMU microvm,
//! runc, and the ones planned but not yet possible (reported missing).

mod oci;
mod planned;
mod qemu;
mod runc;
mod vmlab;

use std::path::PathBuf;

pub use planned::Planned;
pub use qemu::QemuMicrovm;
pub use runc::Runc;
pub use vmlab::Vmlab;

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
