//! What a VM is made of, as the CLI (or a test) describes it.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Instant;

pub use crate::arch::x86_64::kernel::BootFile;
use crate::cli::DiskSpec;
use crate::devices::virtio::net::NetSettings;
use crate::disk::BackingPolicy;

/// The command line vmlab always gives a Linux guest; device entries and
/// the user's `--cmdline` are appended after it.
pub const BASE_CMDLINE: &str = "console=ttyS0 8250.nr_uarts=1 pci=off";

/// What the boot vCPU runs.
pub enum BootSource {
    /// A Linux kernel (ELF vmlinux or bzImage) with an optional initrd.
    /// `cmdline` is the user's part, appended to vmlab's own.
    Linux {
        kernel: BootFile,
        initrd: Option<BootFile>,
        cmdline: String,
    },
    /// A flat binary copied to `load_addr` and entered there in 64-bit
    /// mode with identity paging: for bare-metal test programs.
    Flat { image: Vec<u8>, load_addr: u64 },
}

/// Where console input comes from.
pub enum ConsoleInput {
    /// The process's stdin; a terminal gets raw mode and the Ctrl-A escape.
    Stdin,
    /// Any readable descriptor, passed through byte for byte.
    Fd(OwnedFd),
    /// No input.
    None,
}

pub struct ConsoleConfig {
    pub input: ConsoleInput,
    pub output: Box<dyn Write + Send>,
}

impl ConsoleConfig {
    /// The terminal: stdin in, stdout out.
    pub fn stdio() -> Self {
        ConsoleConfig {
            input: ConsoleInput::Stdin,
            output: Box::new(std::io::stdout()),
        }
    }
}

pub struct VmConfig {
    pub name: String,
    pub cpus: u8,
    pub mem_size: u64,
    pub boot: BootSource,
    pub console: ConsoleConfig,
    /// virtio-blk disks, in order: the guest sees /dev/vda, /dev/vdb, ...
    pub disks: Vec<DiskSpec>,
    /// Print the boot timeline on stderr as soon as userspace starts.
    pub boot_timer: bool,
    /// When vmlab started: the origin of the boot timeline.
    pub started: Instant,
    /// The guest's network cards, eth0 first; none gives it no NIC.
    pub nets: Vec<NetSettings>,
    /// Resume from this state file (`vmlab suspend`) instead of booting:
    /// `boot` is then not used, and the rest must match what was saved.
    pub resume: Option<PathBuf>,
    /// With `resume`: the VM is a new one from a full snapshot (`run
    /// --from`) or one taken back to it (a restore), so it gets a new VM
    /// generation ID and this identity note (`vmm::vmgenid`); None for a
    /// plain resume, where the guest's own go on.
    pub new_generation: Option<String>,
    /// Where the disks' backing files may lie; refused ones fail the build.
    pub backing_policy: BackingPolicy,
}
