//! `vmlab clone SRC DST` on VM names, and the check that keeps `vmlab rm`
//! from deleting a disk layer another VM still reads.
//!
//! A linked clone must not sit on top of a disk that keeps changing, so the
//! source's overlay is frozen first (`disk::freeze_top`: renamed in its own
//! directory, so its own backing reference stays valid, made read-only, a
//! fresh overlay at its path); then the clone gets an overlay over it too.
//! Both steps are constant time whatever the disk's size, and a kill at any
//! point leaves the source's disk whole.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::error::{ControlError, Result};
use super::snapshot::frozen_layer;
use super::state::VmDir;
use crate::cli::DiskSpec;
use crate::disk::{clone_image, freeze_top, unfreeze_top, BackingPolicy, CloneOptions};

/// Creates VM `dst` from the stopped VM `src`: same settings, its own disk
/// overlays, and no MAC of its own (derived from the new name).
pub fn clone_vm(src: &str, dst: &str) -> Result<()> {
    let src = VmDir::existing(src)?;
    let dst = VmDir::named(dst)?;
    if dst.exists() || dst.path().exists() {
        return Err(ControlError::Exists(dst.name().to_string()));
    }
    let _src_lock = src.lock_exclusive().map_err(|e| match e {
        ControlError::Running(name) => ControlError::Refused(format!(
            "VM {name} is running: stop it before cloning (vmlab stop {name})"
        )),
        other => other,
    })?;
    src.refuse_if_suspended("cloning it")?;
    let settings = src.load_settings()?;
    let owned = |disk: &DiskSpec| disk.path.parent() == Some(src.path());
    if let Some(disk) = settings.disks.iter().find(|d| !owned(d)) {
        return Err(ControlError::Refused(format!(
            "VM {}'s disk {} is not in its directory, so cloning the VM cannot share it: clone the disk itself with vmlab clone PATH NEWPATH",
            src.name(),
            disk.path.display()
        )));
    }
    // Never branch disks a killed `snapshot restore` left half-restored.
    super::snapshot::finish_restore(&src)?;
    let dst_lock = dst.lock_exclusive()?;
    let policy = settings.backing_policy();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let result = (|| {
        let mut new = settings.clone();
        // Every card's MAC is derived from the clone's own name.
        new.forget_macs();
        new.disks = Vec::new();
        for disk in &settings.disks {
            new.disks.push(DiskSpec {
                path: branch_disk(&src, &disk.path, dst.path(), stamp, &policy)?,
                read_only: disk.read_only,
            });
        }
        dst.save_settings(&new)
    })();
    if result.is_err() {
        let _ = dst.remove(&dst_lock);
    }
    result
}

/// Freezes `disk` and puts a new overlay over it for the source (at the
/// same path) and for the clone (in `dst_dir`, same file name).
fn branch_disk(
    src: &VmDir,
    disk: &Path,
    dst_dir: &Path,
    stamp: u128,
    policy: &BackingPolicy,
) -> Result<PathBuf> {
    let disk_err = |source| ControlError::Disk {
        vm: src.name().to_string(),
        source,
    };
    let file_name = disk
        .file_name()
        .expect("owned disks are files in the VM directory");
    let frozen = freeze_top(disk, &frozen_layer(disk, stamp)).map_err(disk_err)?;
    let target = dst_dir.join(file_name);
    let opts = CloneOptions {
        backing_policy: policy.clone(),
        ..CloneOptions::default()
    };
    if let Err(e) = clone_image(&frozen.layer, &target, &opts) {
        if let Err(undo) = unfreeze_top(&frozen) {
            log::error!("cannot undo the freeze of {}: {undo}", disk.display());
        }
        return Err(disk_err(e));
    }
    Ok(target)
}

/// Other VMs whose disks read through a file in `vm`'s directory.
pub fn dependents(vm: &VmDir) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for other in VmDir::list()? {
        if other.name() == vm.name() {
            continue;
        }
        let Ok(settings) = other.load_settings() else {
            continue;
        };
        let policy = settings.backing_policy();
        let uses = settings.disks.iter().any(|disk| {
            crate::disk::image_info(&disk.path, &policy)
                .map(|chain| {
                    chain.iter().any(|layer| {
                        layer
                            .path
                            .canonicalize()
                            .is_ok_and(|p| p.starts_with(vm.path()))
                    })
                })
                .unwrap_or(false)
        });
        if uses {
            found.push(other.name().to_string());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::VmSettings;
    use crate::disk::{create_image, CreateOptions};

    fn vm_with_disk(name: &str) -> (VmDir, PathBuf) {
        let vm = VmDir::named(name).unwrap();
        std::fs::create_dir_all(vm.path()).unwrap();
        let disk = vm.path().join("disk.qcow2");
        create_image(&disk, &CreateOptions::qcow2(1 << 20)).unwrap();
        let settings = VmSettings {
            disks: vec![DiskSpec {
                path: disk.clone(),
                read_only: false,
            }],
            mac: Some([0x52, 0x54, 0, 9, 9, 9]),
            forwards: vec!["tcp:2222:22".parse().unwrap()],
            more_cards: vec![crate::control::cards::CardSettings {
                net: crate::control::settings::NetChoice::Lab("dmz".into()),
                mac: Some([0x52, 0x54, 0, 9, 9, 10]),
                ..Default::default()
            }],
            ..VmSettings::default()
        };
        vm.save_settings(&settings).unwrap();
        (vm, disk)
    }

    #[test]
    fn clone_gets_new_overlays_over_a_frozen_layer_and_no_mac() {
        let _home = crate::control::state::tests::temp_home();
        let (vm1, disk1) = vm_with_disk("vm1");
        clone_vm("vm1", "vm2").unwrap();
        let vm2 = VmDir::existing("vm2").unwrap();
        let s2 = vm2.load_settings().unwrap();
        assert_eq!(s2.mac, None, "the clone's MAC is derived from its name");
        assert_eq!(s2.more_cards.len(), 1);
        assert_eq!(s2.more_cards[0].mac, None, "every card's");
        assert_eq!(s2.forwards, vm1.load_settings().unwrap().forwards);
        assert_eq!(s2.disks[0].path, vm2.path().join("disk.qcow2"));
        assert_eq!(s2.disks.len(), 1);
        // Both overlays read through the same frozen layer in vm1's dir.
        let policy = BackingPolicy::vmlab();
        let chain1 = crate::disk::image_info(&disk1, &policy).unwrap();
        let chain2 = crate::disk::image_info(&s2.disks[0].path, &policy).unwrap();
        assert_eq!(chain1.len(), 2);
        assert_eq!(chain2.len(), 2);
        assert_eq!(
            chain1[1].path.canonicalize().unwrap(),
            chain2[1].path.canonicalize().unwrap()
        );
        assert!(chain1[1].path.to_string_lossy().contains(".frozen-"));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&chain1[1].path),
            0o400,
            "frozen: read-only, owner only"
        );
        assert_eq!((mode(&disk1), mode(&s2.disks[0].path)), (0o600, 0o600));
        assert_eq!(mode(vm2.path()), 0o700);
        assert_eq!(dependents(&vm1).unwrap(), ["vm2"]);
        assert!(dependents(&vm2).unwrap().is_empty());
    }

    #[test]
    fn clone_is_refused_for_a_running_source_an_existing_target_or_bad_names() {
        let _home = crate::control::state::tests::temp_home();
        vm_with_disk("vm1");
        vm_with_disk("vm3");
        let held = VmDir::named("vm1").unwrap().lock_exclusive().unwrap();
        let err = clone_vm("vm1", "vm2").unwrap_err().to_string();
        assert!(err.contains("is running: stop it before cloning"), "{err}");
        assert!(
            !VmDir::named("vm2").unwrap().path().exists(),
            "nothing half-made"
        );
        drop(held);
        let err = clone_vm("vm1", "vm3").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(clone_vm("nope", "vm4")
            .unwrap_err()
            .to_string()
            .contains("no VM named nope"));
        assert!(clone_vm("vm1", "Bad")
            .unwrap_err()
            .to_string()
            .contains("invalid VM name"));
    }
}
