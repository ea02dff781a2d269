//! Suspending a running VM to a state file (`vmstate`), from the control
//! thread: the vCPUs park and read their own state at the gate, the
//! devices are drained and held still, the in-kernel chips, the devices
//! and guest RAM are saved, and the VM ends with `ExitReason::Suspended`
//! without its guest running another instruction.
//!
//! Order, and why: each vCPU reads its state as it parks (its fd is its
//! thread's); the VM-wide chips and kvm-clock are read at once after, so
//! they agree with the vCPUs. Disks are drained next (a request in hand
//! finishes, a request posted and not yet taken is served now, so that no
//! disk write happens after the save that the saved queues do not show);
//! their completion interrupts reach the chips after these were read, so
//! a restore raises every interrupt the ISR still shows. Every device is
//! then held locked (the NAT cannot write a received frame into RAM) while
//! the devices and RAM are written.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};

use super::exit::{ExitReason, ExitSignal};
use super::live_snapshot::{LiveDisks, LiveSnapshotError};
use super::memory::GuestMemoryMmap;
use super::pause::{Pause, VcpuGate};
use crate::devices::bus::lock;
use crate::devices::legacy::Serial;
use crate::devices::virtio::events::QueueHandler;
use crate::devices::virtio::{MmioTransport, VirtioDevice};
use crate::vmstate::{self, file::Written, MachineSpec, PlatformState, StateError, VcpuState};

/// How long the vCPUs may take to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One vCPU's saved state, once it has parked.
type Captured = Option<Result<VcpuState, StateError>>;

/// The vCPUs' side of a suspend: asked for, each vCPU thread puts its
/// state here as it parks.
pub struct VcpuCaptures {
    /// The MSRs to save (KVM's list of those it can save and restore).
    msr_indices: Vec<u32>,
    /// One slot per vCPU, Some while a suspend asks.
    slots: Mutex<Option<Vec<Captured>>>,
}

impl VcpuCaptures {
    pub fn new(msr_indices: Vec<u32>) -> Self {
        VcpuCaptures {
            msr_indices,
            slots: Mutex::new(None),
        }
    }

    /// Called by vCPU `index` as it parks: reads its state if asked.
    pub fn capture_if_asked(&self, index: u8, fd: &mut VcpuFd) {
        let wanted = lock(&self.slots)
            .as_ref()
            .is_some_and(|slots| slots.get(usize::from(index)).is_some_and(Option::is_none));
        if !wanted {
            return;
        }
        let state = VcpuState::capture(index, fd, &self.msr_indices);
        if let Some(slot) = lock(&self.slots)
            .as_mut()
            .and_then(|slots| slots.get_mut(usize::from(index)))
        {
            *slot = Some(state);
        }
    }

    fn ask(&self, cpus: usize) {
        *lock(&self.slots) = Some((0..cpus).map(|_| None).collect());
    }

    fn take(&self) -> Result<Vec<VcpuState>, StateError> {
        let slots = lock(&self.slots).take().unwrap_or_default();
        slots
            .into_iter()
            .enumerate()
            .map(|(i, slot)| {
                slot.unwrap_or_else(|| {
                    Err(StateError::Damaged {
                        what: format!("vCPU {i} parked without saving its state"),
                    })
                })
            })
            .collect()
    }
}

/// One virtio device as a suspend sees it.
pub struct SuspendDevice {
    pub transport: Arc<Mutex<MmioTransport>>,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The handler on the device's own I/O thread (a disk), drained first.
    pub io_handler: Option<Arc<Mutex<dyn QueueHandler>>>,
}

/// What a running VM gives a suspend.
pub struct Suspender {
    pub(super) vm: Arc<VmFd>,
    pub(super) gate: Arc<VcpuGate>,
    pub(super) captures: Arc<VcpuCaptures>,
    pub(super) memory: GuestMemoryMmap,
    pub(super) serial: Arc<Mutex<Serial>>,
    pub(super) devices: Vec<SuspendDevice>,
    pub(super) spec: MachineSpec,
    /// The disks a full snapshot switches to new overlays.
    pub(super) disks: Arc<LiveDisks>,
    /// The state file this VM was resumed from: its holes need no reading.
    pub(super) resumed_from: Option<File>,
    pub(super) exit: ExitSignal,
    /// Taken by the first suspend: a VM is saved once.
    pub(super) done: Mutex<bool>,
}

/// What a suspend did.
#[derive(Clone, Copy, Debug)]
pub struct SuspendReport {
    pub written: Written,
    /// How long from the request to the state being durable.
    pub took: Duration,
}

/// What a full snapshot did: the state file written, and how long the
/// guest stood still (state, memory and disk switch together).
#[derive(Clone, Copy, Debug)]
pub struct FullSnapshotReport {
    pub written: Written,
    pub paused: Duration,
}

/// Why a full snapshot was not taken; in every case the guest runs on, no
/// disk switched and nothing is left at the state's path.
#[derive(Debug, thiserror::Error)]
pub enum FullSnapshotError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Disks(#[from] LiveSnapshotError),
}

/// The devices held still while their state and RAM are written.
type Held<'a> = Vec<MutexGuard<'a, dyn VirtioDevice + 'static>>;

impl Suspender {
    /// Saves the VM to `path` and ends it (`ExitReason::Suspended`), with
    /// `announce` called once the state is durable and before the VM ends
    /// (so that an answer reaches the asker before the process exits). On
    /// an error the guest goes on running and nothing is left at `path`.
    pub fn suspend(
        &self,
        path: &Path,
        announce: impl FnOnce(&SuspendReport),
    ) -> Result<SuspendReport, StateError> {
        let started = Instant::now();
        let mut done = lock(&self.done);
        if *done {
            return Err(already_suspended());
        }
        let pause = self.pause_capturing()?;
        let (written, held) = self.save_paused(path)?;
        *done = true;
        let report = SuspendReport {
            written,
            took: started.elapsed(),
        };
        announce(&report);
        // Asked while the guest is parked: it runs no further instruction.
        self.exit.request(ExitReason::Suspended);
        drop(held);
        drop(pause);
        Ok(report)
    }

    /// A full snapshot of the running VM: in one pause, its state and RAM
    /// go to `path` and the disks at `disks` switch to the overlays now
    /// there (see `LiveDisks`), so the state file and the images the disks
    /// leave behind hold the same instant. The guest then runs on.
    pub fn snapshot(
        &self,
        path: &Path,
        disks: &[PathBuf],
    ) -> Result<FullSnapshotReport, FullSnapshotError> {
        let done = lock(&self.done);
        if *done {
            return Err(already_suspended().into());
        }
        let prepared = self.disks.prepare(disks)?;
        let started = Instant::now();
        let pause = self.pause_capturing()?;
        let (written, held) = self.save_paused(path)?;
        drop(held);
        if let Err(e) = self.disks.switch_paused(prepared) {
            let _ = std::fs::remove_file(path);
            return Err(e.into());
        }
        drop(pause);
        let paused = started.elapsed();
        drop(done);
        Ok(FullSnapshotReport { written, paused })
    }

    /// Parks the vCPUs, each reading its state as it parks.
    fn pause_capturing(&self) -> Result<Pause<'_>, StateError> {
        self.captures.ask(usize::from(self.spec.cpus));
        self.gate.pause(PAUSE_TIMEOUT).map_err(|e| {
            let _ = self.captures.take();
            e.into()
        })
    }

    /// With the vCPUs parked: the chips, devices and RAM to `path`; the
    /// devices stay held (nothing moves in RAM or on a disk) until the
    /// caller lets go.
    fn save_paused(&self, path: &Path) -> Result<(Written, Held<'_>), StateError> {
        let vcpus = self.captures.take()?;
        let platform = PlatformState::capture(&self.vm)?;
        let saved_at_ns = vmstate::now_ns();
        for d in &self.devices {
            if let Some(handler) = &d.io_handler {
                lock(handler).handle_queue(0);
            }
        }
        let held: Held<'_> = self.devices.iter().map(|d| lock(&d.device)).collect();
        let virtio = self
            .devices
            .iter()
            .zip(&held)
            .map(|(d, device)| {
                let running = match &d.io_handler {
                    Some(handler) => lock(handler).running_queues(),
                    None => device.running_queues(),
                };
                lock(&d.transport).save_state(running)
            })
            .collect();
        let nat_flows = held
            .iter()
            .find_map(|device| device.saved_flows())
            .unwrap_or_default();
        let state = vmstate::VmState {
            spec: self.spec.clone(),
            saved_at_ns,
            vcpus,
            platform,
            serial: lock(&self.serial).save_state(),
            virtio,
            nat_flows,
        };
        let written = vmstate::file::write(path, &state, |file, offset| {
            vmstate::memory::save(&self.memory, file, offset, self.resumed_from.as_ref())
        })?;
        Ok((written, held))
    }
}

fn already_suspended() -> StateError {
    StateError::Damaged {
        what: "the VM is already suspended".into(),
    }
}
