//! A live snapshot's moment inside the running VM: with a new, empty qcow2
//! overlay already at each disk's path (over the image the VM has open,
//! frozen there under a new name by `disk::freeze_top`), the guest is
//! paused, each disk drained and flushed, switched to its overlay, and the
//! guest resumed. What the old images hold then is what a power cut at that
//! instant would have left: a crash-consistent snapshot of every disk at
//! once.
//!
//! All or nothing: everything that can fail (opening the overlays, pausing,
//! draining, flushing) happens before the first disk switches, and nothing
//! fails after. So an error answer means no disk switched.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::pause::{PauseError, VcpuGate};
use crate::devices::virtio::block::BlockWorker;
use crate::disk::{BackingPolicy, BlockBackend, DiskError};

/// How long the vCPUs may take to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the disks may take to finish the requests in hand.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum LiveSnapshotError {
    #[error("{0} is not one of this VM's disks")]
    UnknownDisk(PathBuf),
    #[error("{0} is attached read-only; it needs no snapshot")]
    ReadOnly(PathBuf),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("cannot pause the guest: {0}")]
    Pause(#[from] PauseError),
    #[error("{} did not finish its requests within {DRAIN_TIMEOUT:?}", .0.display())]
    Busy(PathBuf),
    #[error("{}: the file changed while the snapshot was being taken", .0.display())]
    Changed(PathBuf),
    #[error("the guest is rebooting: take the snapshot again once it is up")]
    Rebooting,
}

/// One virtio disk of the VM, as a live snapshot sees it.
pub struct LiveDisk {
    pub path: PathBuf,
    pub read_only: bool,
    pub worker: Arc<Mutex<BlockWorker>>,
}

/// What a live snapshot needs of a running VM: its vCPUs and its disks.
pub struct LiveDisks {
    gate: Arc<VcpuGate>,
    disks: Vec<LiveDisk>,
    /// What the new overlays' chains may name (the VM's own rule).
    policy: BackingPolicy,
}

impl LiveDisks {
    pub fn new(gate: Arc<VcpuGate>, disks: Vec<LiveDisk>, policy: BackingPolicy) -> Self {
        LiveDisks {
            gate,
            disks,
            policy,
        }
    }

    /// Switches the disks at `paths` to the overlays now at those paths;
    /// returns how long the guest stood still.
    pub fn switch_to_overlays(&self, paths: &[PathBuf]) -> Result<Duration, LiveSnapshotError> {
        let prepared = self.prepare(paths)?;
        let started = Instant::now();
        let _pause = self.gate.pause(PAUSE_TIMEOUT)?;
        self.switch_paused(prepared)?;
        Ok(started.elapsed())
    }

    /// Opens the overlays now at `paths` over the images the disks there
    /// have open, while the guest runs (constant time, but not nothing).
    pub(super) fn prepare(
        &self,
        paths: &[PathBuf],
    ) -> Result<PreparedSwitch<'_>, LiveSnapshotError> {
        let mut picked = Vec::with_capacity(paths.len());
        for path in paths {
            let disk = self
                .disks
                .iter()
                .find(|d| d.path == *path)
                .ok_or_else(|| LiveSnapshotError::UnknownDisk(path.clone()))?;
            if disk.read_only {
                return Err(LiveSnapshotError::ReadOnly(path.clone()));
            }
            let old = lock(&disk.worker).backend();
            let new = crate::disk::open_overlay_over(path, old.clone(), &self.policy)?;
            picked.push((disk, old, Arc::<dyn BlockBackend>::from(new)));
        }
        Ok(PreparedSwitch { picked })
    }

    /// With the guest paused (the caller holds the gate): drains, flushes
    /// and switches the prepared disks, all or none.
    pub(super) fn switch_paused(
        &self,
        prepared: PreparedSwitch<'_>,
    ) -> Result<(), LiveSnapshotError> {
        let picked = prepared.picked;
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut workers = Vec::with_capacity(picked.len());
        for (disk, old, new) in &picked {
            // The I/O thread holds its worker for the request in hand.
            workers.push(lock_until(&disk.worker, deadline, &disk.path)?);
            if file_identity(&disk.path) != new.file_identity() {
                return Err(LiveSnapshotError::Changed(disk.path.clone()));
            }
            // Twice: the second makes the first's last refcount updates
            // durable too, so that freezing has nothing left to write.
            old.flush()?;
            old.flush()?;
        }
        for ((disk, old, new), worker) in picked.iter().zip(workers.iter_mut()) {
            if let Err(e) = old.freeze() {
                // Its data is durable and nothing writes it any more; only
                // its lock stays a writer's.
                log::warn!("{}: {e}", disk.path.display());
            }
            worker.replace_backend(new.clone());
        }
        Ok(())
    }
}

/// Overlays opened for a switch, each with the disk it goes on and the
/// image it goes over.
pub struct PreparedSwitch<'a> {
    picked: Vec<DiskSwitch<'a>>,
}

/// A disk, the image it has open and the overlay it switches to.
type DiskSwitch<'a> = (&'a LiveDisk, Arc<dyn BlockBackend>, Arc<dyn BlockBackend>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes `m`, waiting for its holder until `deadline`.
fn lock_until<'a, T>(
    m: &'a Mutex<T>,
    deadline: Instant,
    path: &Path,
) -> Result<MutexGuard<'a, T>, LiveSnapshotError> {
    loop {
        match m.try_lock() {
            Ok(guard) => return Ok(guard),
            Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(LiveSnapshotError::Busy(path.to_path_buf()))
            }
        }
    }
}

fn file_identity(path: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}
