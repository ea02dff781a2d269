//! Snapshots of a named VM's disks (`vmlab snapshot create|ls|restore|rm`).
//!
//! A snapshot is a point in each disk's qcow2 chain: `create` freezes every
//! writable disk's top image into a layer (a new file in the VM's
//! directory) under a fresh overlay, all disks at once, and records the
//! layers under the snapshot's name. A running VM is switched to its new
//! overlays in one short pause (see `vmm::live_snapshot`): that snapshot is
//! crash-consistent, what a power cut would have left. `restore` (VM
//! stopped) puts a fresh overlay over each of the snapshot's layers; later
//! snapshots stay restorable. `rm` forgets the name and merges or deletes
//! the layers nothing else needs (see `layers`).
//!
//! Crash safety, each operation: the records (`book`) change in one atomic
//! rename, which is the moment the operation takes effect; the disks change
//! only in steps that keep their content (a freeze, a merge), or, for a
//! restore, after the records say a restore is under way, which is then
//! finished (again) before anything else uses the disks. A kill -9 at any
//! instant leaves the old state or the new one, every chain valid.

pub mod book;
pub mod command;
pub mod full;
mod layers;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use self::book::{lock_book, Book, Snapshot, SnapshotDisk};
pub use self::layers::{frozen_layer, Compaction};
use super::client;
use super::error::{ControlError, Result};
use super::protocol::{Request, Response};
use super::settings::VmSettings;
use super::state::{Liveness, RunLock, VmDir};
use crate::disk::{DiskError, FrozenTop, ImageFormat};

/// Longest snapshot name.
const MAX_NAME: usize = 64;

/// What `create` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    pub disks: usize,
    /// For a running VM: how long its guest was paused.
    pub paused: Option<Duration>,
    /// For a full snapshot: what its state file holds.
    pub state: Option<full::StateWritten>,
}

/// One line of `vmlab snapshot ls`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub name: String,
    pub created: u64,
    pub disks: usize,
    /// Bytes the snapshot's layers take on the host.
    pub size: u64,
    pub live: bool,
    /// Memory and devices too (`create --full`).
    pub full: bool,
}

/// Snapshot names: 1 to 64 letters, digits, '.', '_' and '-', starting
/// with a letter or digit.
pub fn check_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME {
        Some("it is longer than 64 characters")
    } else if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some("it must start with a letter or digit")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match why {
        Some(why) => Err(ControlError::BadSnapshotName {
            name: name.to_string(),
            why: why.to_string(),
        }),
        None => Ok(()),
    }
}

fn disk_error(vm: &VmDir) -> impl Fn(DiskError) -> ControlError + '_ {
    move |source| ControlError::Disk {
        vm: vm.name().to_string(),
        source,
    }
}

/// The disks a snapshot covers: every writable disk (read-only ones never
/// change). Each must be a qcow2 image in the VM's directory, where its
/// layers will lie.
fn snapshot_disks(vm: &VmDir, settings: &VmSettings) -> Result<Vec<PathBuf>> {
    let name = vm.name();
    let mut disks = Vec::new();
    for disk in settings.disks.iter().filter(|d| !d.read_only) {
        let path = &disk.path;
        if path.parent() != Some(vm.path()) {
            return Err(ControlError::Refused(format!(
                "VM {name}'s disk {} is not in its directory {}: snapshots keep their layers beside the disk, so copy it there (vmlab clone --full {} {}/NAME.qcow2) and attach that",
                path.display(),
                vm.path().display(),
                path.display(),
                vm.path().display()
            )));
        }
        // Its layers will lead where it leads: refused now, not at the
        // next start or restore.
        crate::disk::checked_backing_chain(path, &settings.backing_policy())
            .map_err(disk_error(vm))?;
        if crate::disk::probe_format(path).map_err(disk_error(vm))? == ImageFormat::Raw {
            return Err(ControlError::Refused(format!(
                "VM {name}'s disk {} is raw: snapshots need qcow2 disks; convert it while the VM is stopped (vmlab clone --full --format qcow2 {} NEW.qcow2) and attach NEW.qcow2 instead",
                path.display(),
                path.display()
            )));
        }
        disks.push(path.clone());
    }
    if disks.is_empty() {
        return Err(ControlError::Refused(format!(
            "VM {name} has no writable disk to snapshot"
        )));
    }
    Ok(disks)
}

/// Takes the name of a stopped VM, so it cannot start meanwhile.
fn lock_stopped(vm: &VmDir, doing: &str) -> Result<RunLock> {
    vm.lock_exclusive().map_err(|e| match e {
        ControlError::Running(name) => ControlError::Refused(format!(
            "VM {name} started while {doing}: try again (or stop it first)"
        )),
        other => other,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `vmlab snapshot create VM NAME`: every writable disk of the VM, running
/// or stopped, at this moment.
pub fn create(vm_name: &str, name: &str) -> Result<Created> {
    create_with(vm_name, name, false)
}

/// `vmlab snapshot create VM NAME --full`: the running VM's disks, memory
/// and devices at one instant (see `full`); the VM runs on.
pub fn create_full(vm_name: &str, name: &str) -> Result<Created> {
    create_with(vm_name, name, true)
}

fn create_with(vm_name: &str, name: &str, full: bool) -> Result<Created> {
    check_name(name)?;
    let vm = VmDir::existing(vm_name)?;
    vm.refuse_if_suspended("taking a snapshot")?;
    let _book_lock = lock_book(&vm)?;
    finish_restore_locked(&vm)?;
    let mut book = Book::load(&vm)?;
    full::remove_unrecorded(&vm, &book);
    if book.find(name).is_some() {
        return Err(ControlError::SnapshotExists {
            vm: vm_name.to_string(),
            name: name.to_string(),
        });
    }
    let disks = snapshot_disks(&vm, &vm.load_settings()?)?;
    let running = matches!(vm.liveness()?, Liveness::Running { .. });
    if full && !running {
        return Err(full::refuse_stopped(&vm));
    }
    let _run_lock = if running {
        // A VM answers on its socket only once its disks are open.
        client::request(&vm, &Request::Status)?;
        None
    } else {
        Some(lock_stopped(&vm, "the snapshot was being taken")?)
    };

    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let state_path = full.then(|| full::state_file(&vm, stamp));
    let mut frozen: Vec<FrozenTop> = Vec::new();
    for disk in &disks {
        match crate::disk::freeze_top(disk, &frozen_layer(disk, stamp)) {
            Ok(f) => frozen.push(f),
            Err(e) => {
                undo(&vm, &frozen);
                return Err(disk_error(&vm)(e));
            }
        }
    }
    book.snapshots.push(Snapshot {
        name: name.to_string(),
        created: now_secs(),
        live: running,
        disks: frozen
            .iter()
            .map(|f| SnapshotDisk {
                disk: file_name(&f.top),
                layer: file_name(&f.layer),
            })
            .collect(),
        vm_state: state_path.as_deref().map(file_name),
    });
    // Written now, put in place last: a full host disk fails here, while
    // everything can still be undone.
    let staged = match book.stage(&vm) {
        Ok(staged) => staged,
        Err(e) => {
            undo(&vm, &frozen);
            return Err(e);
        }
    };
    let (paused, state) = match &state_path {
        Some(path) => {
            let (paused, state) = full::take(&vm, &frozen, path)?;
            (Some(paused), Some(state))
        }
        None if running => (Some(switch_running(&vm, &frozen)?), None),
        None => (None, None),
    };
    if let Err(e) = staged.commit() {
        if !running {
            undo(&vm, &frozen);
        }
        if let Some(path) = &state_path {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    Ok(Created {
        disks: frozen.len(),
        paused,
        state,
    })
}

/// Asks the running VM to move onto the new overlays.
fn switch_running(vm: &VmDir, frozen: &[FrozenTop]) -> Result<Duration> {
    let request = Request::SnapshotDisks {
        disks: frozen.iter().map(|f| f.top.clone()).collect(),
    };
    match ask_switch(vm, frozen, &request)? {
        Response::DisksSwitched { paused_us } => Ok(Duration::from_micros(paused_us)),
        other => Err(unexpected(vm, other)),
    }
}

/// A running VM's answer to a request that switches `frozen`'s disks; an
/// error answer (nothing switched) puts the old images back.
fn ask_switch(vm: &VmDir, frozen: &[FrozenTop], request: &Request) -> Result<Response> {
    match client::request_answer(vm, request) {
        Ok(Response::Error { message }) => {
            // The VM switched nothing: its old images go back in place.
            undo(vm, frozen);
            Err(ControlError::Refused(format!(
                "VM {} could not take the snapshot live: {message}",
                vm.name()
            )))
        }
        Ok(answer) => Ok(answer),
        // No answer: the VM may have switched, so the layers stay (unnamed:
        // the disks read the same either way, and they merge away later).
        Err(e) => Err(ControlError::Protocol {
            name: vm.name().to_string(),
            message: match e {
                // Already names the VM.
                ControlError::Protocol { message, .. } => {
                    format!("{message}; no snapshot was recorded")
                }
                e => format!("{e}; no snapshot was recorded"),
            },
        }),
    }
}

/// An answer of the wrong kind: the VM may have switched, so the layers
/// stay, unnamed, as for no answer.
fn unexpected(vm: &VmDir, answer: Response) -> ControlError {
    ControlError::Protocol {
        name: vm.name().to_string(),
        message: format!("unexpected answer {answer:?}; no snapshot was recorded"),
    }
}

/// Puts frozen tops back as they were (nothing has written their overlays).
fn undo(vm: &VmDir, frozen: &[FrozenTop]) {
    for f in frozen.iter().rev() {
        if let Err(e) = crate::disk::unfreeze_top(f) {
            log::error!(
                "VM {}: cannot undo the freeze of {}: {e}",
                vm.name(),
                f.top.display()
            );
        }
    }
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `vmlab snapshot ls VM`, oldest first.
pub fn list(vm_name: &str) -> Result<Vec<SnapshotRow>> {
    let vm = VmDir::existing(vm_name)?;
    let book = Book::load(&vm)?;
    Ok(book
        .snapshots
        .iter()
        .map(|s| SnapshotRow {
            name: s.name.clone(),
            created: s.created,
            disks: s.disks.len(),
            size: s
                .disks
                .iter()
                .map(|d| &d.layer)
                .chain(&s.vm_state)
                .filter_map(|file| std::fs::metadata(vm.path().join(file)).ok())
                .map(|m| m.blocks() * 512)
                .sum(),
            live: s.live,
            full: s.vm_state.is_some(),
        })
        .collect())
}

/// `vmlab snapshot restore VM NAME`: the stopped VM's disks go back to the
/// snapshot; the state they had is gone. A full snapshot's VM is then
/// suspended at that point (its next start is `vmlab resume`).
pub fn restore(vm_name: &str, name: &str) -> Result<Compaction> {
    check_name(name)?;
    let vm = VmDir::existing(vm_name)?;
    let _book_lock = lock_book(&vm)?;
    finish_restore_locked(&vm)?;
    let mut book = Book::load(&vm)?;
    let snapshot = book
        .find(name)
        .cloned()
        .ok_or_else(|| no_snapshot(vm_name, name))?;
    if matches!(vm.liveness()?, Liveness::Running { .. }) {
        return Err(ControlError::Refused(format!(
            "VM {vm_name} is running: stop it before restoring a snapshot (vmlab stop {vm_name})"
        )));
    }
    vm.refuse_if_suspended("restoring a snapshot")?;
    let _run_lock = lock_stopped(&vm, "the snapshot was being restored")?;
    if let Some(state) = &snapshot.vm_state {
        full::check_state_present(&vm, name, state)?;
    }
    // Every overlay written before any disk changes: a full host disk fails
    // here with nothing changed.
    let prepared = prepare_restore(&vm, &snapshot)?;
    book.restoring = Some(name.to_string());
    book.save(&vm)?;
    publish_restore(&vm, &mut book, &snapshot, prepared)?;
    Ok(compact_quietly(&vm))
}

fn prepare_restore(vm: &VmDir, snapshot: &Snapshot) -> Result<Vec<crate::disk::PreparedOverlay>> {
    let policy = vm.load_settings()?.backing_policy();
    snapshot
        .disks
        .iter()
        .map(|part| {
            crate::disk::prepare_overlay_onto(
                &vm.path().join(&part.disk),
                &vm.path().join(&part.layer),
                &policy,
            )
            .map_err(disk_error(vm))
        })
        .collect()
}

fn publish_restore(
    vm: &VmDir,
    book: &mut Book,
    snapshot: &Snapshot,
    prepared: Vec<crate::disk::PreparedOverlay>,
) -> Result<()> {
    for overlay in prepared {
        overlay.publish().map_err(disk_error(vm))?;
    }
    // Before the record says done: a restore cut short links it again.
    if let Some(state) = &snapshot.vm_state {
        full::suspend_at(vm, state)?;
    }
    book.restoring = None;
    book.save(vm)
}

/// Finishes a restore a killed command left under way. The caller holds
/// the book lock and the VM is stopped.
fn finish_restore_locked(vm: &VmDir) -> Result<()> {
    let mut book = Book::load(vm)?;
    let Some(name) = book.restoring.clone() else {
        return Ok(());
    };
    let snapshot = book
        .find(&name)
        .cloned()
        .ok_or_else(|| no_snapshot(vm.name().as_str(), &name))?;
    log::info!("VM {}: finishing the restore of snapshot {name}", vm.name());
    let prepared = prepare_restore(vm, &snapshot)?;
    publish_restore(vm, &mut book, &snapshot, prepared)
}

/// Before a VM starts (its caller holds the VM's name): finishes a restore
/// a killed command left under way, so the VM never boots half-restored
/// disks.
pub fn finish_restore(vm: &VmDir) -> Result<()> {
    // Read without the lock first: the common case costs one small read.
    if Book::load(vm)?.restoring.is_none() {
        return Ok(());
    }
    let _book_lock = lock_book(vm)?;
    finish_restore_locked(vm)
}

fn no_snapshot(vm: &str, name: &str) -> ControlError {
    ControlError::NoSnapshot {
        vm: vm.to_string(),
        name: name.to_string(),
    }
}

/// `vmlab snapshot rm VM NAME`: forgets the snapshot, then merges or
/// deletes what of its layers nothing else needs (at once if the VM is
/// stopped; layers a running VM reads wait for a later command).
pub fn remove(vm_name: &str, name: &str) -> Result<Compaction> {
    check_name(name)?;
    let vm = VmDir::existing(vm_name)?;
    let _book_lock = lock_book(&vm)?;
    finish_restore_locked(&vm)?;
    let mut book = Book::load(&vm)?;
    if book.find(name).is_none() {
        return Err(no_snapshot(vm_name, name));
    }
    // Its layers would merge into the disks the saved memory expects.
    vm.refuse_if_suspended("removing a snapshot")?;
    let _run_lock = match vm.liveness()? {
        Liveness::Running { .. } => None,
        Liveness::Stopped { .. } => Some(lock_stopped(&vm, "the snapshot was being removed")?),
    };
    let state = book.find(name).and_then(|s| s.vm_state.clone());
    book.snapshots.retain(|s| s.name != name);
    book.save(&vm)?;
    if let Some(state) = state {
        full::remove_state(&vm, &state);
    }
    full::remove_unrecorded(&vm, &book);
    Ok(compact_quietly(&vm))
}

/// Compacts `vm`'s layers; a failure only leaves layers for next time.
fn compact_quietly(vm: &VmDir) -> Compaction {
    layers::compact(vm).unwrap_or_else(|e| {
        log::warn!("VM {}: layers left as they are: {e}", vm.name());
        Compaction::default()
    })
}
