//! `vmlab suspend` and `vmlab resume` of a named VM: the running VM saves
//! itself to `vm.state` in its directory and ends (see `vmm::suspend`); a
//! resume starts it in the background from that file (`vm-daemon` finds
//! it there), and the file's name goes once the VM runs again (the VM
//! keeps the file open and mapped, so its pages stay).

use std::path::Path;
use std::time::{Duration, Instant};

use super::client;
use super::error::{ControlError, Result};
use super::protocol::{Request, Response};
use super::state::VmDir;

/// How long a suspended VM's process may take to end once saved.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a suspend wrote.
#[derive(Clone, Copy, Debug)]
pub struct Suspended {
    pub ram_bytes: u64,
    pub written_bytes: u64,
    pub file_bytes: u64,
    /// From the request to the state being durable, in the VM.
    pub took: Duration,
}

/// Suspends the running VM `name`; returns once its process has ended.
pub fn suspend(name: &str) -> Result<Suspended> {
    let vm = VmDir::existing(name)?;
    if !vm.is_running()? {
        if vm.is_suspended() {
            return Err(ControlError::Refused(format!(
                "VM {name} is already suspended (vmlab resume {name})"
            )));
        }
        return Err(ControlError::NotRunning(name.to_string()));
    }
    // A running VM has no mark; a leftover one must not outlive it.
    forget_generation(&vm);
    let answer = client::request(
        &vm,
        &Request::Suspend {
            path: vm.state_path(),
        },
    )?;
    let Response::Suspended {
        ram_bytes,
        written_bytes,
        file_bytes,
        took_us,
    } = answer
    else {
        return Err(ControlError::Protocol {
            name: name.to_string(),
            message: match answer {
                Response::Error { message } => message,
                other => format!("unexpected answer {other:?} to suspend"),
            },
        });
    };
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while vm.is_running()? {
        if Instant::now() > deadline {
            return Err(ControlError::Refused(format!(
                "VM {name} saved its state but its process (pid {:?}) did not end: check it",
                vm.pid()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Suspended {
        ram_bytes,
        written_bytes,
        file_bytes,
        took: Duration::from_micros(took_us),
    })
}

/// Resumes the suspended VM `name` in the background (`exe` is vmlab's
/// binary; `no_seccomp` runs it without its filters); returns its pid once it
/// runs.
pub fn resume(name: &str, exe: &Path, verbose: u8, no_seccomp: bool) -> Result<u32> {
    let vm = VmDir::existing(name)?;
    if vm.is_running()? {
        return Err(ControlError::Running(name.to_string()));
    }
    if !vm.is_suspended() {
        return Err(ControlError::Refused(format!(
            "VM {name} is not suspended: nothing to resume (start it with vmlab run --name {name} --detach)"
        )));
    }
    super::daemon::spawn_detached(exe, &vm, verbose, no_seccomp)
}

/// For the daemon of a resumed VM: the state to resume from, if any.
pub fn saved_state(vm: &VmDir) -> Option<std::path::PathBuf> {
    let path = vm.state_path();
    path.exists().then_some(path)
}

/// Once the resumed VM is built: its state file's name goes (the VM holds
/// the file itself), so the VM counts as running, not suspended, and a
/// later `run` boots it cold.
pub fn forget_saved_state(vm: &VmDir) -> Result<()> {
    let path = vm.state_path();
    let _ = std::fs::remove_file(generation_path(vm));
    std::fs::remove_file(&path).map_err(ControlError::io("cannot remove", &path))
}

/// Beside `vm.state` when the VM is suspended at a full snapshot it has
/// not run on from (`run --from`, a restore): the identity note its
/// resume gives the guest with a new VM generation ID (`vmm::vmgenid`).
fn generation_path(vm: &VmDir) -> std::path::PathBuf {
    vm.path().join("vm.state.generation")
}

/// What the guest of `vm` is told it is on a resume that makes it a new
/// generation: its hostname, instance id and MAC.
pub fn identity_note(vm: &VmDir, settings: &super::VmSettings) -> String {
    let name = vm.name().as_str();
    format!(
        "hostname={name}\ninstance={name}\nmac={}\n",
        super::settings::format_mac(&settings.mac_for(name))
    )
}

/// Marks `vm`'s saved state as a new generation for it.
pub fn mark_new_generation(vm: &VmDir, settings: &super::VmSettings) -> Result<()> {
    let path = generation_path(vm);
    crate::fsutil::write_private(&path, identity_note(vm, settings).as_bytes())
        .map_err(ControlError::io("cannot write", &path))
}

/// For the daemon of a resumed VM: the identity note, if its resume makes
/// it a new generation.
pub fn new_generation(vm: &VmDir) -> Option<String> {
    std::fs::read_to_string(generation_path(vm)).ok()
}

/// A discarded or replaced saved state takes its mark with it.
pub fn forget_generation(vm: &VmDir) {
    let _ = std::fs::remove_file(generation_path(vm));
}

/// Refuses `what` (a change to the image at `path`: a resize, a
/// replacement) when `path` is one of the files a suspended VM's disks
/// read (its disks and their backing chains): the saved memory expects
/// them as they were. A path that does not exist yet belongs to no VM.
pub fn refuse_if_disk_of_suspended(path: &Path, what: &str) -> Result<()> {
    let Ok(target) = path.canonicalize() else {
        return Ok(());
    };
    for vm in VmDir::list()? {
        if !vm.is_suspended() {
            continue;
        }
        let Ok(settings) = vm.load_settings() else {
            continue;
        };
        let policy = settings.backing_policy();
        let reads_it = settings.disks.iter().any(|disk| {
            disk.path.canonicalize().is_ok_and(|p| p == target)
                || crate::disk::image_info(&disk.path, &policy).is_ok_and(|chain| {
                    chain
                        .iter()
                        .any(|layer| layer.path.canonicalize().is_ok_and(|p| p == target))
                })
        });
        if reads_it {
            vm.refuse_if_suspended(&format!("{what} {}", path.display()))?;
        }
    }
    Ok(())
}
