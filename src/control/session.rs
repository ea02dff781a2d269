//! Starting a named VM: claim its name, wire its console to the serial log
//! (and the terminal or console clients), open its control socket.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::console_hub::ConsoleHub;
use super::error::{ControlError, Result};
use super::server::{self, ControlContext};
use super::settings::VmSettings;
use super::state::{RunLock, VmDir, SERIAL_LOG_LIMIT};
use crate::logging::RotatingFile;
use crate::vmm::{ConsoleConfig, ConsoleInput, Vm, VmConfig};

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
}

/// Claims `dir`'s name and builds the VM with `build`, which turns the
/// console wiring into a `VmConfig`.
pub fn start_named(
    dir: &VmDir,
    settings: &VmSettings,
    attach: Attach,
    build: impl FnOnce(ConsoleConfig) -> Result<VmConfig>,
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
    let (input, keystrokes) = match attach {
        Attach::Terminal => (ConsoleInput::Stdin, None),
        Attach::Detached => {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| ControlError::io("cannot create a pipe for", &log_path)(e.into()))?;
            (ConsoleInput::Fd(read), Some(Mutex::new(File::from(write))))
        }
    };
    let config = build(ConsoleConfig {
        input,
        output: Box::new(hub.writer()),
    })?;
    let vm = Vm::build(config)?;

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
    let button = vm.power_button();
    let mut ctx = ControlContext::new(
        dir.name().to_string(),
        settings.forwards.clone(),
        Box::new(move || button.press()),
        hub,
    );
    ctx.started = Instant::now();
    ctx.nat = vm.nat_view();
    ctx.disks = Some(vm.live_disks());
    ctx.suspender = Some(vm.suspender());
    ctx.console_input = keystrokes;
    server::spawn(listener, Arc::new(ctx)).map_err(ControlError::io("cannot serve", &socket))?;
    Ok(NamedVm { vm, _lock: lock })
}

impl NamedVm {
    /// Runs the VM to its end, then frees the name (socket, pid file).
    pub fn run_measured(
        self,
    ) -> Result<
        (
            crate::vmm::ExitReason,
            Option<crate::vmm::footprint::Footprint>,
        ),
        crate::vmm::VmmError,
    > {
        let NamedVm { vm, _lock } = self;
        vm.run_measured()
    }
}
