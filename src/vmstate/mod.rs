//! A whole VM's state, saved to one file and taken back: every vCPU
//! (`vcpu`), the in-kernel interrupt controllers, PIT and kvm-clock
//! (`platform`), the devices (UART, virtio-mmio transports and queue
//! positions: `devices::*::save_state`), and guest RAM, written sparsely and
//! mapped back copy-on-write (`memory`). `file` is the format, `spec` what
//! a saved state needs of the VM it is restored into.
//!
//! The saving side runs inside a running VM (`vmm::suspend`); the
//! restoring side is `Vm::resume`.

pub mod file;
pub mod memory;
pub mod platform;
pub mod spec;
pub mod vcpu;

use serde::{Deserialize, Serialize};

use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::state::TransportState;

pub use file::{SavedState, STATE_FORMAT};
pub use memory::MemoryStats;
pub use platform::PlatformState;
pub use spec::MachineSpec;
pub use vcpu::VcpuState;

/// Everything but guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub spec: MachineSpec,
    /// Host wall clock when the state was saved, in ns since the epoch.
    pub saved_at_ns: u64,
    pub vcpus: Vec<VcpuState>,
    pub platform: PlatformState,
    pub serial: SerialSnapshot,
    /// The virtio devices, in MMIO slot order.
    pub virtio: Vec<TransportState>,
    /// The in-process NAT's TCP flows, reset in the guest on resume.
    #[serde(default)]
    pub nat_flows: crate::net::SavedFlows,
}

/// Why a state could not be saved or restored. Mismatches are worded to
/// follow "the saved state ...".
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{path} is not a vmlab state file")]
    NotAStateFile { path: String },
    #[error("{path} is damaged: {what}")]
    DamagedFile { path: String, what: String },
    #[error("the saved state is damaged: {what}")]
    Damaged { what: String },
    #[error("the saved state is in format {found}, this vmlab reads format {STATE_FORMAT}")]
    Format { found: u32 },
    #[error("the saved state does not fit this VM: {0}")]
    Mismatch(String),
    #[error("KVM refused to restore MSR {index:#x} = {value:#x}")]
    Msr { index: u32, value: u64 },
    #[error("cannot pause the guest: {0}")]
    Pause(#[from] crate::vmm::pause::PauseError),
    #[error("virtio device {slot}: {source}")]
    Virtio {
        slot: usize,
        source: crate::devices::virtio::state::TransportStateError,
    },
}

/// Host wall clock now, in ns since the epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
