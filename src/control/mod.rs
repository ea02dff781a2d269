//! Named VMs: their state directory and configuration, the per-VM control
//! socket (status, stop, console, NAT table), and the commands built on
//! them (`run --name --detach`, `ps`, `stop`, `console`, `rm`, `ssh`,
//! `clone` of a VM, `snapshot`).
//!
//! A VM without a name (`vmlab run` alone) uses none of this: it lives and
//! dies with its terminal.

pub mod cards;
pub mod client;
pub mod console_hub;
pub mod daemon;
pub mod error;
#[doc(hidden)]
pub mod from_snapshot;
pub mod fuzzing;
pub mod launch;
pub mod name;
pub mod protocol;
pub mod ps;
pub mod server;
pub mod session;
pub mod settings;
pub mod snapshot;
pub mod ssh;
pub mod state;
pub mod stop;
pub mod suspend;
pub mod vm_clone;

pub use error::ControlError;
pub use name::VmName;
pub use protocol::{Request, Response, VmStatus};
pub use session::{start_named, Attach, NamedVm};
pub use settings::{derived_mac, VmSettings};
pub use state::{Liveness, VmDir};
pub use stop::{stop_all, StopOutcome};
pub use vm_clone::clone_vm;

/// `vmlab rm`: deletes a stopped VM's directory (disks included), unless
/// another VM's disk reads through one of its files.
pub fn remove_vm(name: &str) -> error::Result<()> {
    let vm = VmDir::existing(name)?;
    let held = vm.lock_exclusive().map_err(|e| match e {
        ControlError::Running(name) => ControlError::Refused(format!(
            "VM {name} is running: stop it first (vmlab stop {name})"
        )),
        other => other,
    })?;
    let dependents = vm_clone::dependents(&vm)?;
    if !dependents.is_empty() {
        return Err(ControlError::Refused(format!(
            "VM {name}'s disk is the base of {}'s (a linked clone): remove {} first",
            dependents.join(", "),
            if dependents.len() == 1 { "it" } else { "them" }
        )));
    }
    vm.remove(&held)?;
    ssh::forget_host_key(name)
}
