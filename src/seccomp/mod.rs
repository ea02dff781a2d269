//! Process hardening: a seccomp filter on every thread of a running VM, of
//! a lab network's process and of `vmlab nat`, one per thread class
//! (`lists.rs` says what each class may do).
//!
//! Each thread installs its class's filter itself once its setup is done
//! and before the guest runs (vCPU threads wait for the event loop's filter
//! before their first `KVM_RUN`). A syscall outside the list traps: the
//! SIGSYS handler (`sigsys.rs`) writes one line naming the syscall and the
//! thread class to stderr (a detached VM's vmm.log) and to the VM's
//! `seccomp.violation`, then ends the process with status 159 (128 + SIGSYS), so
//! `ps`, `stop` and `run --detach` can say "killed by its seccomp filter
//! (SIGSYS)". `PR_SET_NO_NEW_PRIVS` comes with the first filter.
//!
//! Nothing is installed unless the process called [`prepare`] (the `run`,
//! `vm-daemon`, `network-daemon` and `nat` commands do, unless
//! `--no-seccomp`); library users and in-process tests run unfiltered.

mod lists;
mod sigsys;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use sigsys::{violation, EXIT_STATUS, KILLED};

/// The kinds of thread vmlab runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadClass {
    /// `vcpuN`: runs the guest, handles its port and MMIO exits.
    Vcpu,
    /// The main thread's event loop: NAT, console input, signals.
    EventLoop,
    /// `virtioN-io`: a disk's requests.
    BlockIo,
    /// The control socket's server and its connections.
    Control,
    /// A lab network's process (`network-daemon`): its one event loop
    /// with the switch, the members' sockets and TAPs, the gateway's NAT.
    Network,
    /// The network process's namespace helper: enters a namespace to make
    /// a member's TAP there, then comes back.
    Netns,
    /// `vmlab nat --tap`: the NAT's event loop serving a TAP device.
    Nat,
}

impl ThreadClass {
    pub const ALL: [ThreadClass; 7] = [
        ThreadClass::Vcpu,
        ThreadClass::EventLoop,
        ThreadClass::BlockIo,
        ThreadClass::Control,
        ThreadClass::Network,
        ThreadClass::Netns,
        ThreadClass::Nat,
    ];

    /// As the SIGSYS line and the tests name it.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::EventLoop => "event-loop",
            ThreadClass::BlockIo => "disk-io",
            ThreadClass::Control => "control",
            ThreadClass::Network => "network",
            ThreadClass::Netns => "netns",
            ThreadClass::Nat => "nat",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {0} threads: {1}")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of a {0} thread: {1} (try --no-seccomp)")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot catch SIGSYS for the seccomp filters: {0}")]
    Handler(#[source] std::io::Error),
}

/// The compiled filters of this process.
struct Filters {
    programs: BTreeMap<ThreadClass, BpfProgram>,
    /// Test hook (`VMLAB_SECCOMP_SELFTEST=CLASS`): a thread of that class
    /// makes one forbidden syscall right after installing its filter.
    probe: Option<ThreadClass>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// The environment variable of the test hook.
pub const SELFTEST_VAR: &str = "VMLAB_SECCOMP_SELFTEST";

/// Compiles every class's filter and catches SIGSYS; from now on
/// [`install`] filters the calling thread. Call once, early, on the main
/// thread.
pub fn prepare() -> Result<(), SeccompError> {
    let mut programs = BTreeMap::new();
    for class in ThreadClass::ALL {
        programs.insert(class, compile(class)?);
    }
    sigsys::catch().map_err(SeccompError::Handler)?;
    let probe = std::env::var(SELFTEST_VAR)
        .ok()
        .and_then(|name| ThreadClass::ALL.into_iter().find(|c| c.name() == name));
    let _ = FILTERS.set(Filters { programs, probe });
    Ok(())
}

/// Whether [`prepare`] ran (the threads of this process get filters).
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Filters the calling thread as a `class` thread, when [`prepare`] ran.
/// Threads it starts later inherit the filter.
pub fn install(class: ThreadClass) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    sigsys::set_thread_class(class);
    seccompiler::apply_filter(&filters.programs[&class])
        .map_err(|e| SeccompError::Install(class.name(), e))?;
    if filters.probe == Some(class) {
        sigsys::forbidden_syscall();
    }
    Ok(())
}

/// Where a VM's violation line also goes (its `seccomp.violation`), so that
/// `ps` and `stop` can tell after the process is gone. Emptied now: a
/// violation of an earlier run is history once the VM runs again.
pub fn record_violations_in(path: &Path) -> std::io::Result<()> {
    sigsys::record_in(path)
}

fn compile(class: ThreadClass) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(class.name(), e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for syscall in lists::allowed(class) {
        rules.insert(syscall, Vec::new());
    }
    // ioctl only for the request types the class needs.
    if let Some(ioctl) = rules.get_mut(&libc::SYS_ioctl) {
        for &kind in lists::ioctl_types(class) {
            let condition = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                kind << 8,
            )
            .map_err(build)?;
            ioctl.push(SeccompRule::new(vec![condition]).map_err(build)?);
        }
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_compiles() {
        for class in ThreadClass::ALL {
            let program = compile(class).unwrap();
            assert!(!program.is_empty(), "{class:?}");
        }
    }
}
