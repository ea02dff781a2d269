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
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};

use super::exit::{ExitReason, ExitSignal};
use super::memory::GuestMemoryMmap;
use super::pause::VcpuGate;
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
            return Err(StateError::Damaged {
                what: "the VM is already suspended".into(),
            });
        }
        self.captures.ask(usize::from(self.spec.cpus));
        let pause = match self.gate.pause(PAUSE_TIMEOUT) {
            Ok(pause) => pause,
            Err(e) => {
                let _ = self.captures.take();
                return Err(e.into());
            }
        };
        let vcpus = self.captures.take()?;
        let platform = PlatformState::capture(&self.vm)?;
        let saved_at_ns = vmstate::now_ns();
        for d in &self.devices {
            if let Some(handler) = &d.io_handler {
                lock(handler).handle_queue(0);
            }
        }
        // Held until the VM has ended: nothing moves in RAM or on a disk.
        let held: Vec<_> = self.devices.iter().map(|d| lock(&d.device)).collect();
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
}
