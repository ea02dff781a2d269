//! `vmlab stop`: press each VM's power button, wait for the guests to power
//! off, and kill the VMs that did not within the timeout.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::client;
use super::error::{ControlError, Result};
use super::protocol::Request;
use super::state::{Liveness, VmDir};

/// Time a killed VM's process is given to disappear.
const KILL_GRACE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest powered off after the button press.
    PoweredOff,
    /// The guest did not power off in time; vmlab killed the VM.
    Killed,
    /// It was not running.
    NotRunning,
    /// It was suspended: its saved state is deleted.
    Discarded,
    /// It is not running because its seccomp filter killed it (the
    /// recorded violation).
    SeccompKilled(String),
}

/// Stops every VM in `vms` at once; one result per VM, in order.
pub fn stop_all(vms: &[VmDir], timeout: Duration) -> Vec<Result<StopOutcome>> {
    let mut results: Vec<Option<Result<StopOutcome>>> = vms
        .iter()
        .map(|vm| match vm.liveness() {
            Err(e) => Some(Err(e)),
            Ok(Liveness::Stopped { .. }) => Some(discard_saved_state(vm)),
            Ok(Liveness::Running { .. }) => {
                // A VM still starting has no socket yet; it gets killed at
                // the timeout like one that ignores the button.
                if let Err(e) = client::request(vm, &Request::Stop) {
                    log::info!("{}: {e}", vm.name());
                }
                None
            }
        })
        .collect();
    let deadline = Instant::now() + timeout;
    while results.iter().any(Option::is_none) && Instant::now() < deadline {
        std::thread::sleep(POLL);
        settle(vms, &mut results, StopOutcome::PoweredOff);
    }
    for (vm, result) in vms.iter().zip(&mut results) {
        if result.is_none() {
            if let Some(pid) = vm.pid() {
                log::info!(
                    "{}: did not power off in {timeout:?}; killing pid {pid}",
                    vm.name()
                );
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + KILL_GRACE;
    while results.iter().any(Option::is_none) && Instant::now() < deadline {
        std::thread::sleep(POLL);
        settle(vms, &mut results, StopOutcome::Killed);
    }
    vms.iter()
        .zip(results)
        .map(|(vm, result)| {
            result.unwrap_or_else(|| {
                Err(ControlError::Refused(format!(
                    "VM {} did not stop, even when killed (pid {:?}); check its process",
                    vm.name(),
                    vm.pid()
                )))
            })
        })
        .collect()
}

/// A VM that does not run: its saved state, if it is suspended, goes.
fn discard_saved_state(vm: &VmDir) -> Result<StopOutcome> {
    let path = vm.state_path();
    super::suspend::forget_generation(vm);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(StopOutcome::Discarded),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vm
            .seccomp_violation()
            .map_or(StopOutcome::NotRunning, StopOutcome::SeccompKilled)),
        Err(e) => Err(ControlError::io("cannot remove", &path)(e)),
    }
}

/// Records `outcome` for the VMs whose process is gone (their socket and
/// pid file are cleaned by the liveness probe).
fn settle(vms: &[VmDir], results: &mut [Option<Result<StopOutcome>>], outcome: StopOutcome) {
    for (vm, result) in vms.iter().zip(results.iter_mut()) {
        if result.is_none() {
            match vm.liveness() {
                Ok(Liveness::Stopped { .. }) => {
                    *result = Some(Ok(vm
                        .seccomp_violation()
                        .map_or_else(|| outcome.clone(), StopOutcome::SeccompKilled)))
                }
                Ok(Liveness::Running { .. }) => {}
                Err(e) => *result = Some(Err(e)),
            }
        }
    }
}
