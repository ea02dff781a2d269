//! Full snapshots (`snapshot create --full`): the disk snapshot of a
//! running VM plus its memory and devices, saved in the suspend state
//! format (`vmstate`) to a file in the VM's directory that the snapshot's
//! record names, taken in the same pause as the disk switch, so the state
//! and the frozen layers hold one instant. The file is written once and
//! never changed: a restore links it as the VM's `vm.state` (the VM is then
//! suspended at that point), and `run --from` links it into a new VM's
//! directory (`control::from_snapshot`); a resume maps it copy-on-write.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::book::Book;
use super::{ask_switch, unexpected};
use crate::control::error::{ControlError, Result};
use crate::control::protocol::{Request, Response};
use crate::control::state::VmDir;
use crate::disk::FrozenTop;

/// What a full snapshot's state file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateWritten {
    pub ram_bytes: u64,
    /// Bytes of RAM written (the rest are holes).
    pub written_bytes: u64,
    /// Bytes the file takes on the host.
    pub file_bytes: u64,
}

/// Where a full snapshot taken at `stamp` keeps its state.
pub fn state_file(vm: &VmDir, stamp: u128) -> PathBuf {
    vm.path().join(format!("full-{stamp}.state"))
}

/// `--full` of a VM that does not run: there is no memory to save.
pub fn refuse_stopped(vm: &VmDir) -> ControlError {
    let name = vm.name();
    let what = if vm.is_suspended() {
        format!("VM {name} is suspended: resume it first (vmlab resume {name}), then take the full snapshot")
    } else {
        format!("VM {name} is not running: a full snapshot saves a running VM's memory; start it (vmlab run --name {name} --detach) or leave out --full")
    };
    ControlError::Refused(what)
}

/// Asks the running VM to save itself to `state` and switch to the new
/// overlays in one pause; returns how long the guest stood still.
pub fn take(vm: &VmDir, frozen: &[FrozenTop], state: &Path) -> Result<(Duration, StateWritten)> {
    let request = Request::SnapshotFull {
        disks: frozen.iter().map(|f| f.top.clone()).collect(),
        state: state.to_path_buf(),
    };
    match ask_switch(vm, frozen, &request)? {
        Response::FullSnapshotTaken {
            paused_us,
            ram_bytes,
            written_bytes,
            file_bytes,
        } => Ok((
            Duration::from_micros(paused_us),
            StateWritten {
                ram_bytes,
                written_bytes,
                file_bytes,
            },
        )),
        other => Err(unexpected(vm, other)),
    }
}

/// A full snapshot's state file, checked to be there before its disks are
/// restored.
pub fn check_state_present(vm: &VmDir, name: &str, state: &str) -> Result<PathBuf> {
    let path = vm.path().join(state);
    if !path.is_file() {
        return Err(ControlError::Refused(format!(
            "snapshot {name} of VM {} names its memory file {}, which is missing: remove the snapshot (vmlab snapshot rm {} {name})",
            vm.name(),
            path.display(),
            vm.name()
        )));
    }
    Ok(path)
}

/// Makes `vm` (stopped, its disks at the snapshot) suspended at the full
/// snapshot whose state is `state`: its `vm.state` becomes a second name
/// of that file (the file is never written again, so sharing it is safe).
pub fn suspend_at(vm: &VmDir, state: &str) -> Result<()> {
    // Marked first: a restore cut short between the two does it again.
    crate::control::suspend::mark_new_generation(vm, &vm.load_settings()?)?;
    link_state(&vm.path().join(state), &vm.state_path())
}

/// Puts a new name `to` on the state file `from`, replacing what `to`
/// named, in one rename.
pub fn link_state(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension(format!("link{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::fs::hard_link(from, &tmp).map_err(ControlError::io("cannot link", from))?;
    std::fs::rename(&tmp, to).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ControlError::io("cannot put in place", to)(e)
    })
}

/// Deletes a removed full snapshot's state file (a VM suspended at it, or
/// started from it, keeps its own name of the file).
pub fn remove_state(vm: &VmDir, state: &str) {
    let path = vm.path().join(state);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

/// Whether `name` is what `state_file` names a full snapshot's state.
fn is_state_name(name: &str) -> bool {
    name.strip_prefix("full-")
        .and_then(|n| n.strip_suffix(".state"))
        .is_some_and(|stamp| !stamp.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit()))
}

/// Deletes the full snapshot state files no record names, and the VM's
/// unfinished temporaries of them: a `snapshot create --full` killed after
/// the VM wrote its state but before the record was put in place leaves
/// one, as large as the guest's touched RAM, that nothing would ever
/// remove. Called with the snapshot book locked, so no create is under way.
pub fn remove_unrecorded(vm: &VmDir, book: &Book) {
    let Ok(entries) = std::fs::read_dir(vm.path()) else {
        return;
    };
    let recorded = |name: &str| {
        book.snapshots
            .iter()
            .any(|s| s.vm_state.as_deref() == Some(name))
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let orphan = match name.strip_prefix('.') {
            // `fsutil::create_temporary_beside`'s `.NAME.tmpPID-N`.
            Some(tmp) => tmp
                .rsplit_once(".tmp")
                .is_some_and(|(target, _)| is_state_name(target)),
            None => is_state_name(name) && !recorded(name),
        };
        if orphan {
            log::info!("VM {}: removing {name}, which no snapshot names", vm.name());
            remove_state(vm, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_state_name;

    #[test]
    fn only_full_snapshot_state_names_count() {
        assert!(is_state_name("full-1764700000123456789.state"));
        for other in [
            "vm.state",
            "full-.state",
            "full-12.state.gen",
            "full-1a.state",
            "xfull-1.state",
        ] {
            assert!(!is_state_name(other), "{other}");
        }
    }
}
