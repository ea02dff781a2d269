//! Why a VM stopped, and the one-shot signal devices and vCPUs use to stop it.

use std::fmt;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register or i8042); vmlab
    /// ends rather than rebooting, as Firecracker does.
    Reset,
    /// The guest halted every vCPU with nothing left to wake it.
    Halted,
    /// The user pressed Ctrl-A x on the console.
    UserQuit,
    /// vmlab received a termination signal.
    Signal(i32),
    /// The guest kernel reported a panic through pvpanic.
    GuestPanic,
    /// The VM was saved to its state file (`vmlab suspend`) and ended.
    Suspended,
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8, registers: String },
    /// KVM could not run the guest (internal error or failed entry).
    KvmFailure {
        vcpu: u8,
        what: String,
        registers: String,
        /// An explanation of the likely cause, when vmlab knows one.
        hint: Option<String>,
    },
}

impl ExitReason {
    /// Process exit status: 0 for an orderly end, 2 for a guest failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff
            | ExitReason::Reset
            | ExitReason::Halted
            | ExitReason::UserQuit
            | ExitReason::Suspended => 0,
            // The shell convention for "ended by signal N".
            ExitReason::Signal(num) => 128 + num,
            ExitReason::GuestPanic
            | ExitReason::TripleFault { .. }
            | ExitReason::KvmFailure { .. } => 2,
        }
    }

    /// The line a VM's end is reported with. A reset only ends the VM when
    /// its reboot policy says so (or a stop was asked), and then says so; a
    /// reset the VM restarts from is only "guest rebooted".
    pub fn ending(&self) -> String {
        match self {
            ExitReason::Reset => format!("{self} (vmlab ends the VM on reset)"),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest rebooted"),
            ExitReason::Halted => write!(f, "guest halted"),
            ExitReason::UserQuit => write!(f, "stopped from the console (Ctrl-A x)"),
            ExitReason::Signal(num) => write!(f, "stopped by signal {num}"),
            ExitReason::GuestPanic => write!(f, "guest kernel panicked"),
            ExitReason::Suspended => write!(f, "suspended (the VM's state is saved)"),
            ExitReason::TripleFault { vcpu, registers } => {
                write!(f, "vCPU {vcpu} triple-faulted\n  registers: {registers}")
            }
            ExitReason::KvmFailure {
                vcpu,
                what,
                registers,
                hint,
            } => {
                match hint {
                    Some(hint) => write!(f, "{hint} (vCPU {vcpu}: {what})")?,
                    None => write!(f, "vCPU {vcpu}: {what}")?,
                }
                if !registers.is_empty() {
                    write!(f, "\n  registers: {registers}")?;
                }
                Ok(())
            }
        }
    }
}

/// The VM's stop request: the first reason wins, later ones are logged and
/// dropped. The event fd wakes the event loop.
#[derive(Clone)]
pub struct ExitSignal {
    reason: Arc<Mutex<Option<ExitReason>>>,
    event: Arc<EventFd>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Arc::new(Mutex::new(None)),
            event: Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?),
        })
    }

    /// Requests that the VM stop for `reason`.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = crate::devices::bus::lock(&self.reason);
        if let Some(first) = slot.as_ref() {
            log::debug!("ignoring stop reason '{reason}': already stopping ({first})");
            return;
        }
        log::info!("stop requested: {reason}");
        *slot = Some(reason);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot wake the event loop to stop: {e}");
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        crate::devices::bus::lock(&self.reason).clone()
    }

    pub fn is_requested(&self) -> bool {
        crate::devices::bus::lock(&self.reason).is_some()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let signal = ExitSignal::new().unwrap();
        assert!(!signal.is_requested());
        signal.request(ExitReason::PowerOff);
        signal.request(ExitReason::GuestPanic);
        assert_eq!(signal.reason(), Some(ExitReason::PowerOff));
        assert_eq!(signal.event().read().unwrap(), 1);
    }

    #[test]
    fn orderly_exits_are_zero_failures_are_not() {
        assert_eq!(ExitReason::PowerOff.exit_code(), 0);
        assert_eq!(ExitReason::Reset.exit_code(), 0);
        assert_ne!(ExitReason::GuestPanic.exit_code(), 0);
        let fault = ExitReason::TripleFault {
            vcpu: 0,
            registers: "rip=0".into(),
        };
        assert_ne!(fault.exit_code(), 0);
        assert!(fault.to_string().contains("triple-faulted"));
    }

    #[test]
    fn only_a_reset_that_ends_the_vm_says_it_ends_it() {
        // Logged at every reset, also one the VM restarts from.
        assert_eq!(ExitReason::Reset.to_string(), "guest rebooted");
        assert_eq!(
            ExitReason::Reset.ending(),
            "guest rebooted (vmlab ends the VM on reset)"
        );
        assert_eq!(ExitReason::PowerOff.ending(), "guest powered off");
    }
}
