//! The frozen layers in a VM's directory and who needs them, and keeping
//! them few: a layer no snapshot names and no VM's disk starts at is needed
//! only by what reads through it. With nothing reading it, it is deleted;
//! with one reader beside it, the two are merged into one (the reader is
//! committed into the layer, which takes the reader's name); read by more
//! (a clone shares it, or a restore branched off it), it stays.
//!
//! Who reads what is taken from the files themselves, for every VM: the
//! chain behind each disk and behind each snapshot's layers. Layers a
//! running VM has open are locked, so a merge of them fails at once and is
//! left for later.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::book::Book;
use crate::control::error::{ControlError, Result};
use crate::control::state::VmDir;
use crate::disk::{BackingPolicy, DiskError};

/// What marks a file of a VM directory as a frozen layer: disk layers that
/// `vmlab clone` and snapshots leave behind.
const FROZEN_MARK: &str = ".frozen-";
const LAYER_SUFFIX: &str = ".qcow2";
/// Merges done by one compaction at most (each removes a layer).
const MAX_MERGES: usize = 1024;

/// A new layer name for `disk`, beside it: `disk.frozen-STAMP.qcow2`.
pub fn frozen_layer(disk: &Path, stamp: u128) -> PathBuf {
    let file_name = disk.file_name().unwrap_or_default();
    let stem = Path::new(file_name)
        .file_stem()
        .unwrap_or(file_name)
        .to_string_lossy();
    disk.with_file_name(format!("{stem}{FROZEN_MARK}{stamp}{LAYER_SUFFIX}"))
}

fn is_frozen_layer(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains(FROZEN_MARK) && n.ends_with(LAYER_SUFFIX))
}

/// What a compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compaction {
    pub merged: usize,
    pub deleted: usize,
    /// Layers that could have been merged but are in use (a running VM).
    pub in_use: usize,
}

/// Every image of every VM's chains, canonical paths.
#[derive(Default)]
struct LayerGraph {
    /// Image -> the images whose backing file it is.
    readers: BTreeMap<PathBuf, BTreeSet<PathBuf>>,
    /// Images some VM's disk is (a VM's settings name them).
    tops: BTreeSet<PathBuf>,
    /// Layers some snapshot names.
    named: BTreeSet<PathBuf>,
    /// Every image seen.
    known: BTreeSet<PathBuf>,
}

impl LayerGraph {
    /// Reads every VM's settings, records and chains. Any chain it cannot
    /// read makes it fail: a reader it missed could lose its data.
    fn scan() -> Result<LayerGraph> {
        let mut graph = LayerGraph::default();
        for vm in VmDir::list()? {
            let settings = vm.load_settings()?;
            let policy = settings.backing_policy();
            for disk in &settings.disks {
                let top = graph.add_chain(&vm, &disk.path, &policy)?;
                graph.tops.insert(top);
            }
            for snapshot in Book::load(&vm)?.snapshots {
                for part in &snapshot.disks {
                    let layer = graph.add_chain(&vm, &vm.path().join(&part.layer), &policy)?;
                    graph.named.insert(layer);
                }
            }
        }
        Ok(graph)
    }

    /// Adds the chain behind `image`, which must pass `policy`; returns
    /// `image`'s canonical path.
    fn add_chain(&mut self, vm: &VmDir, image: &Path, policy: &BackingPolicy) -> Result<PathBuf> {
        let disk_err = |source| ControlError::Disk {
            vm: vm.name().to_string(),
            source,
        };
        let chain = crate::disk::checked_backing_chain(image, policy).map_err(disk_err)?;
        let canonical = chain
            .iter()
            .map(|p| p.canonicalize().map_err(|e| disk_err(DiskError::io(p, e))))
            .collect::<Result<Vec<_>>>()?;
        for pair in canonical.windows(2) {
            self.readers
                .entry(pair[1].clone())
                .or_default()
                .insert(pair[0].clone());
        }
        self.known.extend(canonical.iter().cloned());
        Ok(canonical[0].clone())
    }

    fn readers_of(&self, image: &Path) -> Vec<&PathBuf> {
        self.readers
            .get(image)
            .map_or_else(Vec::new, |r| r.iter().collect())
    }
}

/// Deletes and merges the layers of `vm`'s directory that nothing needs on
/// their own (see the module's description). The caller holds the VM's
/// snapshot lock, and its run lock when it is stopped. Each step is crash-
/// safe: the disks read the same before and after it.
pub fn compact(vm: &VmDir) -> Result<Compaction> {
    let dir = vm
        .path()
        .canonicalize()
        .map_err(ControlError::io("cannot read", vm.path()))?;
    let policy = vm.load_settings()?.backing_policy();
    let mut done = Compaction::default();
    let mut skipped = BTreeSet::new();
    for _ in 0..MAX_MERGES {
        let graph = LayerGraph::scan()?;
        done.deleted += delete_orphans(&dir, &graph);
        delete_stale_temporaries(&dir);
        let next = graph
            .known
            .iter()
            .filter(|layer| {
                layer.parent() == Some(dir.as_path())
                    && is_frozen_layer(layer)
                    && !graph.named.contains(*layer)
                    && !graph.tops.contains(*layer)
                    && !skipped.contains(*layer)
            })
            .find_map(|layer| match graph.readers_of(layer).as_slice() {
                [only] if only.parent() == Some(dir.as_path()) => {
                    Some((layer.clone(), (*only).clone()))
                }
                _ => None,
            });
        let Some((layer, reader)) = next else {
            break;
        };
        match crate::disk::merge_into_backing(&reader, &policy) {
            Ok(_) => done.merged += 1,
            Err(DiskError::Locked { .. }) => {
                log::info!(
                    "{}: in use, merged later",
                    layer.file_name().unwrap_or_default().to_string_lossy()
                );
                done.in_use += 1;
                skipped.insert(layer);
            }
            Err(e) => {
                log::warn!(
                    "cannot merge {} into {}: {e}",
                    reader.display(),
                    layer.display()
                );
                skipped.insert(layer);
            }
        }
    }
    Ok(done)
}

/// Deletes the frozen layers in `dir` that no chain reads (left by a
/// command that was killed); returns how many.
fn delete_orphans(dir: &Path, graph: &LayerGraph) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut deleted = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if is_frozen_layer(&path) && !graph.known.contains(&path) {
            match std::fs::remove_file(&path) {
                Ok(()) => deleted += 1,
                Err(e) => log::warn!("cannot delete {}: {e}", path.display()),
            }
        }
    }
    deleted
}

/// Deletes what killed commands left half-written in `dir`: a staged image
/// (`.NAME.vmlab-PID-NANOS.tmp`) or staged records (`.snapshots.json.tmpPID-N`)
/// of a process that is gone.
fn delete_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Some(pid) = temporary_owner(name) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The pid in the name of one of those temporary files.
fn temporary_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let digits = if let Some(i) = rest.find(".vmlab-") {
        rest.strip_suffix(".tmp")?;
        &rest[i + ".vmlab-".len()..]
    } else {
        rest.strip_prefix("snapshots.json.tmp")?
    };
    digits
        .split('-')
        .next()
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_sit_beside_the_disk_and_are_recognised() {
        let layer = frozen_layer(Path::new("/v/vm1/disk.qcow2"), 42);
        assert_eq!(layer, Path::new("/v/vm1/disk.frozen-42.qcow2"));
        assert!(is_frozen_layer(&layer));
        assert!(!is_frozen_layer(Path::new("/v/vm1/disk.qcow2")));
        assert!(!is_frozen_layer(Path::new("/v/vm1/serial.log")));
    }

    #[test]
    fn temporaries_name_their_owner() {
        assert_eq!(temporary_owner(".disk.qcow2.vmlab-123-456.tmp"), Some(123));
        assert_eq!(temporary_owner(".snapshots.json.tmp77-0"), Some(77));
        assert_eq!(temporary_owner(".vm.conf.tmp77"), None);
        assert_eq!(temporary_owner("disk.qcow2"), None);
        assert_eq!(temporary_owner(".disk.vmlab-x-1.tmp"), None);
    }
}
