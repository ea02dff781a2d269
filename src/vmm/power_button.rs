//! The ACPI power button, pressed from the host (`vmlab stop`): an edge on
//! the Generic Event Device's GSI. The GED's `_EVT` method notifies the
//! power button device, and the guest decides how to power off (the default
//! guest's kernel signals init, which syncs and powers off).

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::error::VmmError;
use crate::arch::x86_64::layout::GED_GSI;

/// Cheap to clone; any thread may press it.
#[derive(Clone)]
pub struct PowerButton(Arc<EventFd>);

impl PowerButton {
    /// Routes an irqfd to the GED's GSI.
    pub(crate) fn new(vm: &VmFd) -> Result<Self, VmmError> {
        let fd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map_err(VmmError::io("create the power button"))?;
        vm.register_irqfd(&fd, GED_GSI)
            .map_err(VmmError::kvm("route the power button interrupt"))?;
        Ok(PowerButton(Arc::new(fd)))
    }

    /// Presses the button once; the guest may ignore it.
    pub fn press(&self) -> std::io::Result<()> {
        log::info!("pressing the ACPI power button");
        self.0.write(1)
    }
}
