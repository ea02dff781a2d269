//! `vmlab run --name NEW --from VM@SNAPSHOT`: a new VM that resumes from a
//! full snapshot of another (`snapshot create --full`) instead of booting.
//!
//! The new VM gets the source's settings, less its MAC (derived from the
//! new name, as a clone's), and for each disk the snapshot covers an
//! overlay of its own over the snapshot's frozen layer (constant time,
//! the layer shared as a clone's is); read-only disks are shared as they
//! are. The snapshot's state file gets a second name, the new VM's
//! `vm.state`, so the new VM is suspended at the snapshot until it is
//! started, and starts as `vmlab resume` does. Its identity is its own
//! (name, MAC, instance id); the guest learns it on resume from the VM
//! Generation ID device and vmlab's identity note (see `vmm::vmgenid`).

use std::path::PathBuf;
use std::str::FromStr;

use super::error::{ControlError, Result};
use super::settings::{NetChoice, VmSettings};
use super::snapshot::book::{lock_book, Book, BookLock, Snapshot};
use super::snapshot::full;
use super::state::VmDir;
use crate::cli::DiskSpec;
use crate::disk::{clone_image, CloneOptions};
use crate::vmstate::{MachineSpec, SavedState};

/// `VM@SNAPSHOT` as `--from` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    pub vm: String,
    pub snapshot: String,
}

impl FromStr for SnapshotRef {
    type Err = ControlError;

    fn from_str(text: &str) -> Result<SnapshotRef> {
        match text.split_once('@') {
            Some((vm, snapshot)) if !vm.is_empty() && !snapshot.is_empty() => {
                vm.parse::<super::VmName>()?;
                super::snapshot::check_name(snapshot)?;
                Ok(SnapshotRef {
                    vm: vm.to_string(),
                    snapshot: snapshot.to_string(),
                })
            }
            _ => Err(ControlError::Refused(format!(
                "--from {text}: expected VM@SNAPSHOT, a full snapshot of a VM (vmlab snapshot ls VM)"
            ))),
        }
    }
}

/// A full snapshot opened to start new VMs from; its source's snapshot
/// records stay locked meanwhile (its layers cannot be removed under it).
pub struct FromSnapshot {
    source: VmDir,
    snapshot: Snapshot,
    state: PathBuf,
    spec: MachineSpec,
    _book: BookLock,
}

impl FromSnapshot {
    pub fn open(from: &SnapshotRef) -> Result<FromSnapshot> {
        let source = VmDir::existing(&from.vm)?;
        let book_lock = lock_book(&source)?;
        let snapshot = Book::load(&source)?
            .find(&from.snapshot)
            .cloned()
            .ok_or_else(|| ControlError::NoSnapshot {
                vm: from.vm.clone(),
                name: from.snapshot.clone(),
            })?;
        let Some(state) = &snapshot.vm_state else {
            return Err(ControlError::Refused(format!(
                "snapshot {} of VM {} holds its disks only: --from needs a full snapshot (vmlab snapshot create {} NAME --full while it runs)",
                from.snapshot, from.vm, from.vm
            )));
        };
        let state = full::check_state_present(&source, &from.snapshot, state)?;
        let spec = SavedState::open(&state)
            .map_err(|e| ControlError::Refused(format!("{}: {e}", state.display())))?
            .state
            .spec;
        Ok(FromSnapshot {
            source,
            snapshot,
            state,
            spec,
            _book: book_lock,
        })
    }

    /// The source's settings for the new VM (before the command line's):
    /// no MAC of its own, the disks still the source's (`create` branches
    /// them).
    pub fn settings(&self) -> Result<VmSettings> {
        let mut settings = self.source.load_settings()?;
        settings.forget_macs();
        Ok(settings)
    }

    /// Creates VM `name` with `settings`, suspended at the snapshot.
    /// Refuses, with nothing made, what the saved state cannot resume in.
    pub fn create(&self, name: &str, settings: &VmSettings) -> Result<VmDir> {
        self.check_fits(settings)?;
        let dst = VmDir::named(name)?;
        if dst.exists() || dst.path().exists() {
            return Err(ControlError::Exists(name.to_string()));
        }
        refuse_shared_mac(name, settings)?;
        let held = dst.lock_exclusive()?;
        let result = self.branch(&dst, settings.clone());
        if result.is_err() {
            let _ = dst.remove(&held);
        }
        result.map(|()| dst)
    }

    fn branch(&self, dst: &VmDir, mut settings: VmSettings) -> Result<()> {
        let opts = CloneOptions {
            backing_policy: settings.backing_policy(),
            ..CloneOptions::default()
        };
        let mut disks = Vec::with_capacity(settings.disks.len());
        for disk in &settings.disks {
            if disk.read_only {
                disks.push(disk.clone());
                continue;
            }
            let file = disk.path.file_name().map(|n| n.to_string_lossy());
            let part = self
                .snapshot
                .disks
                .iter()
                .find(|p| disk.path.parent() == Some(self.source.path()) && file.as_deref() == Some(&p.disk))
                .ok_or_else(|| {
                    ControlError::Refused(format!(
                        "VM {}'s disk {} is not in snapshot {} (attached since?): take a new full snapshot",
                        self.source.name(),
                        disk.path.display(),
                        self.snapshot.name
                    ))
                })?;
            let target = dst.path().join(&part.disk);
            clone_image(&self.source.path().join(&part.layer), &target, &opts).map_err(
                |source| ControlError::Disk {
                    vm: dst.name().to_string(),
                    source,
                },
            )?;
            disks.push(DiskSpec {
                path: target,
                read_only: false,
            });
        }
        settings.disks = disks;
        dst.save_settings(&settings)?;
        super::suspend::mark_new_generation(dst, &settings)?;
        full::link_state(&self.state, &dst.state_path())
    }

    /// What the saved memory needs: the vCPUs and memory it was saved
    /// with, and a network card if (and only if) it had one.
    fn check_fits(&self, settings: &VmSettings) -> Result<()> {
        let from = format!("{}@{}", self.source.name(), self.snapshot.name);
        let refuse = |what: String| Err(ControlError::Refused(format!("--from {from}: {what}")));
        if settings.cpus != self.spec.cpus {
            return refuse(format!(
                "its memory was saved with {} vCPU(s), not {}: drop --cpus",
                self.spec.cpus, settings.cpus
            ));
        }
        if settings.mem.bytes() != self.spec.mem_size {
            return refuse(format!(
                "its memory was saved at {} MiB, not {} MiB: drop --mem",
                self.spec.mem_size >> 20,
                settings.mem.bytes() >> 20
            ));
        }
        let had_card = self.spec.devices.iter().any(|d| d == "virtio-net");
        if had_card != (settings.net != NetChoice::None) {
            return refuse(format!(
                "it was saved {} a network card: --net {} cannot change that",
                if had_card { "with" } else { "without" },
                if had_card { "none" } else { "user|NETWORK" },
            ));
        }
        Ok(())
    }
}

/// On a lab network, two members may not share a MAC: a VM whose MAC
/// (derived from its name, or given) another member of the network has is
/// refused with a hint.
fn refuse_shared_mac(name: &str, settings: &VmSettings) -> Result<()> {
    let NetChoice::Lab(network) = &settings.net else {
        return Ok(());
    };
    let mac = settings.mac_for(name);
    for other in VmDir::list()? {
        let Ok(theirs) = other.load_settings() else {
            continue;
        };
        if theirs.net == settings.net && theirs.mac_for(other.name().as_str()) == mac {
            return Err(ControlError::Refused(format!(
                "VM {} on network {network} already has MAC {}: give VM {name} another with --mac",
                other.name(),
                super::settings::format_mac(&mac)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_takes_vm_at_snapshot_and_refuses_anything_else_in_one_line() {
        let r: SnapshotRef = "vm1@warm".parse().unwrap();
        assert_eq!((r.vm.as_str(), r.snapshot.as_str()), ("vm1", "warm"));
        for bad in ["vm1", "@warm", "vm1@", "vm1@bad name", "bad/vm@warm"] {
            let err = bad.parse::<SnapshotRef>().unwrap_err().to_string();
            assert!(!err.contains('\n'), "{err}");
        }
        let err = "vm1".parse::<SnapshotRef>().unwrap_err().to_string();
        assert!(err.contains("expected VM@SNAPSHOT"), "{err}");
    }
}
