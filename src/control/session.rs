//! Starting a named VM: claim its name, wire its console to the serial log
//! (and the terminal or console clients), open its control socket; then
//! run it, starting the guest again in place when it reboots (its
//! `--on-reboot` policy), with the same name, socket, console and log.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::console_hub::ConsoleHub;
use super::error::{ControlError, Result};
use super::server::{self, ControlContext, DiskSwitch, SuspendSource};
use super::settings::VmSettings;
use super::state::{RunLock, VmDir, SERIAL_LOG_LIMIT};
use crate::devices::bus::lock;
use crate::logging::RotatingFile;
use crate::net::{NatSnapshot, NatView};
use crate::vmm::{
    ConsoleConfig, ConsoleInput, LastBoot, LiveDisks, LiveSnapshotError, OnReboot, PowerButton,
    Suspender, Vm, VmConfig,
};

/// Where a named VM's console is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// On this process's terminal (a named VM in the foreground); console
    /// clients may watch but not type.
    Terminal,
    /// Nowhere but the serial log and `vmlab console` clients.
    Detached,
}

/// A named VM, built and reachable through its control socket, ready to
/// run. Dropping it (after the run) removes its socket and pid file and
/// frees the name.
pub struct NamedVm {
    pub vm: Vm,
    _lock: RunLock,
    dir: VmDir,
    console: ConsoleWiring,
    ctx: Arc<ControlContext>,
    current: Arc<CurrentBoot>,
    policy: OnReboot,
}

/// What each boot's console is made of.
struct ConsoleWiring {
    hub: Arc<ConsoleHub>,
    /// The read end of the console clients' keystroke pipe (detached VMs):
    /// each boot reads a duplicate, so it outlives every boot.
    keystrokes: Option<OwnedFd>,
    /// The serial log, to name in messages.
    log_path: PathBuf,
}

impl ConsoleWiring {
    fn config(&self) -> Result<ConsoleConfig> {
        let input = match &self.keystrokes {
            None => ConsoleInput::Stdin,
            Some(read) => ConsoleInput::Fd(read.try_clone().map_err(ControlError::io(
                "cannot duplicate the console pipe of",
                &self.log_path,
            ))?),
        };
        Ok(ConsoleConfig {
            input,
            output: Box::new(self.hub.writer()),
        })
    }
}

/// The running boot's power button, NAT, disks and suspender, which the
/// control socket reaches through this (a reboot makes a new machine).
struct CurrentBoot {
    power_button: Mutex<PowerButton>,
    nat: Mutex<Option<Arc<dyn NatView>>>,
    /// None between two boots: the ended boot's disks are closed before
    /// the next opens them (their write locks would refuse it).
    disks: Mutex<Option<Arc<LiveDisks>>>,
    /// None between two boots: there is no machine to save.
    suspender: Mutex<Option<Arc<Suspender>>>,
}

impl CurrentBoot {
    fn new(vm: &Vm) -> Self {
        CurrentBoot {
            power_button: Mutex::new(vm.power_button()),
            nat: Mutex::new(vm.nat_view()),
            disks: Mutex::new(Some(vm.live_disks())),
            suspender: Mutex::new(Some(vm.suspender())),
        }
    }

    fn set(&self, vm: &Vm) {
        *lock(&self.power_button) = vm.power_button();
        *lock(&self.nat) = vm.nat_view();
        *lock(&self.disks) = Some(vm.live_disks());
        *lock(&self.suspender) = Some(vm.suspender());
    }

    /// Lets go of the boot that ended: its disks, its NAT and its
    /// suspender, which holds the KVM VM and the guest's memory.
    fn ended(&self) {
        *lock(&self.disks) = None;
        *lock(&self.suspender) = None;
        *lock(&self.nat) = None;
    }
}

impl SuspendSource for CurrentBoot {
    fn suspender(&self) -> Option<Arc<Suspender>> {
        lock(&self.suspender).clone()
    }
}

impl DiskSwitch for CurrentBoot {
    fn switch_to_overlays(
        &self,
        paths: &[PathBuf],
    ) -> std::result::Result<Duration, LiveSnapshotError> {
        // A boot that ended meanwhile refuses the pause (its vCPU gate is
        // closed): the snapshot fails whole, nothing switched.
        let disks = lock(&self.disks)
            .clone()
            .ok_or(LiveSnapshotError::Rebooting)?;
        disks.switch_to_overlays(paths)
    }
}

impl NatView for CurrentBoot {
    fn snapshot(&self) -> NatSnapshot {
        lock(&self.nat)
            .as_ref()
            .map_or_else(NatSnapshot::default, |nat| nat.snapshot())
    }
}

/// Turns the console wiring and the boot's number (0 first, 1 after the
/// first reboot, ...) into the machine's configuration.
pub trait BuildBoot: FnMut(ConsoleConfig, u32) -> Result<VmConfig> {}
impl<F: FnMut(ConsoleConfig, u32) -> Result<VmConfig>> BuildBoot for F {}

/// Claims `dir`'s name and builds its first boot with `build`.
pub fn start_named(
    dir: &VmDir,
    settings: &VmSettings,
    attach: Attach,
    build: &mut impl BuildBoot,
) -> Result<NamedVm> {
    let lock = dir.lock_exclusive()?;
    // Never boot disks a killed `snapshot restore` left half-restored.
    super::snapshot::finish_restore(dir)?;
    let record = dir.seccomp_record();
    crate::seccomp::record_violations_in(&record)
        .map_err(ControlError::io("cannot create", &record))?;
    let log_path = dir.serial_log();
    let log = RotatingFile::create(&log_path, SERIAL_LOG_LIMIT)
        .map_err(ControlError::io("cannot create", &log_path))?;
    let hub = ConsoleHub::new(Some(Box::new(log)), attach == Attach::Terminal);
    let (keystrokes, keystroke_writer) = match attach {
        Attach::Terminal => (None, None),
        Attach::Detached => {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| ControlError::io("cannot create a pipe for", &log_path)(e.into()))?;
            (Some(read), Some(Mutex::new(File::from(write))))
        }
    };
    let console = ConsoleWiring {
        hub: hub.clone(),
        keystrokes,
        log_path: log_path.clone(),
    };
    let vm = Vm::build(build(console.config()?, 0)?)?;

    let runtime = crate::dirs::ensure_runtime_dir().map_err(ControlError::io(
        "cannot prepare the runtime directory",
        &crate::dirs::runtime_dir(),
    ))?;
    log::debug!("control sockets in {}", runtime.display());
    let socket = dir.socket_path();
    let listener = UnixListener::bind(&socket).map_err(ControlError::io(
        "cannot create the control socket",
        &socket,
    ))?;
    lock.write_pid()?;
    let current = Arc::new(CurrentBoot::new(&vm));
    let button = current.clone();
    let mut ctx = ControlContext::new(
        dir.name().to_string(),
        settings.all_forwards(),
        Box::new(move || crate::devices::bus::lock(&button.power_button).press()),
        hub,
    );
    ctx.started = Instant::now();
    if vm.nat_view().is_some() {
        ctx.nat = Some(current.clone());
    }
    ctx.disks = Some(current.clone());
    ctx.suspender = Some(current.clone());
    ctx.console_input = keystroke_writer;
    let ctx = Arc::new(ctx);
    server::spawn(listener, ctx.clone()).map_err(ControlError::io("cannot serve", &socket))?;
    Ok(NamedVm {
        vm,
        _lock: lock,
        dir: dir.clone(),
        console,
        ctx,
        current,
        policy: settings.reboot_policy(),
    })
}

impl NamedVm {
    /// Runs the VM to its end, each reboot a fresh boot from `build` (as
    /// the policy says; not once `vmlab stop` was asked), then frees the
    /// name (socket, pid file).
    pub fn run(self, build: &mut impl BuildBoot) -> Result<LastBoot> {
        let NamedVm {
            vm,
            _lock,
            dir,
            console,
            ctx,
            current,
            policy,
        } = self;
        let last = crate::vmm::run_rebooting(policy, vm, |boot| {
            if ctx.is_stopping() {
                return Ok(None);
            }
            eprintln!(
                "vmlab: guest rebooted: starting it again (--on-reboot exit ends it instead)"
            );
            // `snapshot create` holds this lock from freezing the disks to
            // switching the running boot onto its overlays: the new boot
            // opens its disks (and reads its kernel) either before the
            // freeze, and is the one switched, or after it is whole.
            let _snapshots = super::snapshot::book::lock_book(&dir)?;
            current.ended();
            let vm = Vm::build(build(console.config()?, boot)?)?;
            current.set(&vm);
            Ok(Some(vm))
        });
        // The control server's threads outlive the run: without this they
        // would hold the last machine (its KVM VM, its memory) until the
        // process exits, after the name is freed, and `vmlab stop` would
        // return while the process is still tearing it down.
        current.ended();
        last
    }
}
