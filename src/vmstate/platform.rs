//! The VM-wide state KVM keeps in the kernel: the two 8259 PICs and the
//! IOAPIC, the PIT, and kvm-clock.
//!
//! Time: kvm-clock and each vCPU's TSC (an MSR, see `vcpu`) are put back
//! to their saved values, so that the guest's monotonic clock goes on from
//! where it stopped, with no jump for its timers and watchdogs to trip on
//! (KVM could advance kvm-clock by the time suspended, KVM_CLOCK_REALTIME,
//! but every timer due meanwhile would then fire at once, and the soft
//! lockup and RCU stall detectors would see one vCPU stuck for that long).
//! Its wall clock is then behind by the time the VM was suspended: the
//! guest steps it itself from the host's time (`devices::legacy::HostClock`,
//! read by the Debian guest's init; the README's "Suspend and resume").

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::StateError;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlatformState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

fn read_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(kvm("read the interrupt controllers"))?;
    Ok(chip)
}

impl PlatformState {
    /// Reads it while every vCPU is parked.
    pub fn capture(vm: &VmFd) -> Result<PlatformState, StateError> {
        Ok(PlatformState {
            pic_master: read_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: read_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: read_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("read the PIT"))?,
            clock: vm.get_clock().map_err(kvm("read kvm-clock"))?,
        })
    }

    /// Puts it into a new VM whose irqchip and PIT exist.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for (chip, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if chip.chip_id != id {
                return Err(StateError::Damaged {
                    what: format!("interrupt controller {} saved as {}", id, chip.chip_id),
                });
            }
            vm.set_irqchip(chip)
                .map_err(kvm("set the interrupt controllers"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("set the PIT"))?;
        // The saved value alone: flags such as KVM_CLOCK_REALTIME would ask
        // KVM to add the time since the save.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("set kvm-clock"))?;
        Ok(())
    }
}
