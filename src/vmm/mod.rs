//! The machine: KVM, guest memory, vCPU threads, devices and the event loop.

pub mod boot_timer;
pub mod config;
pub mod console;
pub mod error;
pub mod exit;
pub mod footprint;
pub mod kvm;
pub mod live_snapshot;
pub mod machine;
pub mod memory;
pub mod pause;
pub mod power_button;
pub mod progress;
pub mod reboot;
pub mod run_report;
pub mod signals;
pub mod suspend;
pub mod vcpu;
pub mod vmgenid;

pub use config::{BootFile, BootSource, ConsoleConfig, ConsoleInput, VmConfig};
pub use error::VmmError;
pub use exit::ExitReason;
pub use live_snapshot::{LiveDisks, LiveSnapshotError};
pub use machine::Vm;
pub use power_button::PowerButton;
pub use reboot::{run_rebooting, LastBoot, OnReboot};
pub use run_report::RunReport;
pub use suspend::{FullSnapshotError, FullSnapshotReport, SuspendReport, Suspender};

/// Builds and runs a VM to its end.
pub fn run(config: VmConfig) -> Result<ExitReason, VmmError> {
    Vm::build(config)?.run()
}
