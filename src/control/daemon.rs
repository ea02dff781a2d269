//! `vmlab run --detach`: vmlab starts itself again as a background process
//! (`vmlab vm-daemon NAME`, in a session of its own, console to the serial
//! log), and returns once that process says the VM is running, or with its
//! error.
//!
//! Re-executing rather than forking keeps the daemon a fresh process (no
//! threads or locks inherited half-way). The daemon's stdout is a pipe to
//! the parent that carries one line, `ready`; its stderr is `vmm.log`, so a
//! failure to start is the last line there.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::error::{ControlError, Result};
use super::state::{VmDir, VMM_LOG_LIMIT};
use crate::logging::RotatingFile;

/// The hidden subcommand the daemon runs as.
pub const DAEMON_COMMAND: &str = "vm-daemon";
const READY: &str = "ready";

/// Starts the VM `vm` (its settings already saved) in the background with
/// the vmlab binary `exe`; returns the daemon's pid once the VM runs.
/// `no_seccomp` runs it without its seccomp filters.
pub fn spawn_detached(exe: &Path, vm: &VmDir, verbose: u8, no_seccomp: bool) -> Result<u32> {
    let log_path = vm.vmm_log();
    let log = crate::fsutil::create_private(&log_path)
        .map_err(ControlError::io("cannot create", &log_path))?;
    // The daemon outlives this process: it inherits nothing but its stdio.
    crate::fds::close_on_exec_above_stderr()
        .map_err(ControlError::io("cannot list the descriptors of", exe))?;
    let mut command = Command::new(exe);
    if verbose > 0 {
        command.arg(format!("-{}", "v".repeat(verbose.into())));
    }
    command.arg(DAEMON_COMMAND).arg(vm.name().as_str());
    if no_seccomp {
        command.arg("--no-seccomp");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(ControlError::io("cannot start", exe))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == READY {
        return Ok(child.id());
    }
    let status = child
        .wait()
        .map_err(ControlError::io("cannot wait for", exe))?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let last = log.lines().rev().find(|l| !l.trim().is_empty());
    let message = match last {
        _ if status.code() == Some(crate::seccomp::EXIT_STATUS) => vm
            .seccomp_violation()
            .unwrap_or_else(|| crate::seccomp::KILLED.to_string()),
        // The log may quote what the guest or an image chose.
        Some(line) => crate::escape::Escaped(
            line.trim_start_matches("vmlab: error: ")
                .trim_start_matches("vmlab: "),
        )
        .to_string(),
        None => format!("it exited ({status}) without a message"),
    };
    Err(ControlError::StartFailed {
        name: vm.name().to_string(),
        message,
    })
}

/// The daemon's log: its `vmm.log`, capped and rotated, and its stderr
/// too (so that a failure to start is still the file's last line). None
/// when `name` is no VM name or the file cannot be made (logs go to the
/// stderr the parent gave, uncapped).
pub fn vmm_log(name: &str) -> Option<RotatingFile> {
    let path = VmDir::named(name).ok()?.vmm_log();
    RotatingFile::create(&path, VMM_LOG_LIMIT)
        .and_then(RotatingFile::as_stderr)
        .inspect_err(|e| eprintln!("vmlab: cannot cap {}: {e}", path.display()))
        .ok()
}

/// The daemon's first step: leave the parent's session and terminal, so
/// closing that terminal does not stop the VM.
pub fn detach_from_terminal() {
    if let Err(e) = nix::unistd::setsid() {
        log::warn!("setsid: {e}");
    }
    if let Err(e) = std::env::set_current_dir("/") {
        log::warn!("cannot leave the working directory: {e}");
    }
}

/// Tells the parent the VM runs, then points stdout at /dev/null so a late
/// write cannot fail on the closed pipe.
pub fn signal_ready() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{READY}").and_then(|()| out.flush());
    match std::fs::File::open("/dev/null") {
        Ok(null) => {
            if let Err(e) = nix::unistd::dup2_stdout(&null) {
                log::warn!("cannot redirect stdout: {e}");
            }
        }
        Err(e) => log::warn!("cannot open /dev/null: {e}"),
    }
}
