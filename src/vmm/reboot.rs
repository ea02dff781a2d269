//! A guest reboot, as a VMM can do it: when the guest resets (ACPI reset
//! register, i8042, `systemctl reboot`), end this machine and build a fresh
//! one from the same settings (new memory, devices in their reset state,
//! the kernel and initrd read again, so a kernel the guest installed boots),
//! rather than ending vmlab. Whether to is the VM's `--on-reboot` policy.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::boot_timer::BootTimeline;
use super::error::VmmError;
use super::exit::ExitReason;
use super::footprint::Footprint;
use super::machine::Vm;

/// What a guest reboot does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReboot {
    /// Start the guest again in the same vmlab process (named VMs' default).
    Restart,
    /// End vmlab with status 0 (unnamed VMs' default, as Firecracker does).
    Exit,
}

impl OnReboot {
    pub fn name(self) -> &'static str {
        match self {
            OnReboot::Restart => "restart",
            OnReboot::Exit => "exit",
        }
    }
}

impl fmt::Display for OnReboot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OnReboot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "restart" => Ok(OnReboot::Restart),
            "exit" => Ok(OnReboot::Exit),
            other => Err(format!("on-reboot '{other}' is not 'restart' or 'exit'")),
        }
    }
}

/// How the last boot of a [`run_rebooting`] ended.
pub struct LastBoot {
    pub reason: ExitReason,
    pub footprint: Option<Footprint>,
    pub timeline: Arc<BootTimeline>,
    /// Boots run, the first included.
    pub boots: u32,
}

/// Runs `first`; each time its guest reboots and `policy` says restart,
/// runs the machine `again(n)` builds for boot `n` (1, 2, ...). `again`
/// returns `None` to end instead (a stop was asked meanwhile): the reboot
/// then ends vmlab. A termination signal that arrives between two boots
/// ends it too.
pub fn run_rebooting<E: From<VmmError>>(
    policy: OnReboot,
    first: Vm,
    mut again: impl FnMut(u32) -> Result<Option<Vm>, E>,
) -> Result<LastBoot, E> {
    let mut vm = first;
    let mut boots = 1;
    loop {
        let timeline = vm.timeline();
        let (reason, footprint) = run_boot(vm)?;
        let mut last = LastBoot {
            reason,
            footprint,
            timeline,
            boots,
        };
        if last.reason != ExitReason::Reset || policy != OnReboot::Restart {
            return Ok(last);
        }
        if let Some(signal) = super::signals::received() {
            last.reason = ExitReason::Signal(signal);
            return Ok(last);
        }
        log::info!("guest rebooted: starting it again (boot {})", boots + 1);
        match again(boots)? {
            Some(next) => vm = next,
            None => return Ok(last),
        }
        boots += 1;
    }
}

/// Runs one boot on a thread of its own. The event loop's seccomp filter
/// binds the thread that runs it for as long as that thread lives, and the
/// next boot is built (a new KVM VM, disks opened, the kernel read, its
/// threads started) on this one, which must stay free of it.
fn run_boot(vm: Vm) -> Result<(ExitReason, Option<Footprint>), VmmError> {
    std::thread::Builder::new()
        .name("event-loop".into())
        .spawn(move || vm.run_measured())
        .map_err(VmmError::io("start the event loop's thread"))?
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print() {
        for policy in [OnReboot::Restart, OnReboot::Exit] {
            assert_eq!(policy.to_string().parse::<OnReboot>(), Ok(policy));
        }
        let err = "reboot".parse::<OnReboot>().unwrap_err();
        assert!(err.contains("'restart' or 'exit'"), "{err}");
    }
}
