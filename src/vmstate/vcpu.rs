//! One vCPU's architectural state, as KVM hands it out and takes it back:
//! general and segment registers, XSAVE (the FPU and vector state) with
//! XCR0, debug registers, the local APIC, pending events, the MP state, the
//! MSRs KVM can save, and the CPUID the vCPU was given.
//!
//! Captured on the vCPU's own thread while it is parked between two
//! `KVM_RUN`s; first one `KVM_RUN` with `immediate_exit` set completes what
//! the last exit left half done (an `in` whose value KVM has not yet put in
//! RAX, a string I/O instruction), as KVM's API asks before a save.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::StateError;

/// Most MSRs KVM accepts in one `KVM_GET_MSRS`/`KVM_SET_MSRS`.
const MSR_CHUNK: usize = 255;

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<kvm_msr_entry>,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

impl VcpuState {
    /// Reads vCPU `index`'s state. `msr_indices`: the MSRs to save (KVM's
    /// `KVM_GET_MSR_INDEX_LIST`); those this vCPU cannot read are left out.
    pub fn capture(
        index: u8,
        fd: &mut VcpuFd,
        msr_indices: &[u32],
    ) -> Result<VcpuState, StateError> {
        complete_pending_exit(fd)?;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("read the vCPU's CPUID"))?;
        Ok(VcpuState {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            regs: fd.get_regs().map_err(kvm("read registers"))?,
            sregs: fd.get_sregs().map_err(kvm("read segment registers"))?,
            xsave: fd.get_xsave().map_err(kvm("read the XSAVE state"))?,
            xcrs: fd.get_xcrs().map_err(kvm("read XCR0"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("read debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm("read the local APIC"))?,
            mp_state: fd.get_mp_state().map_err(kvm("read the MP state"))?,
            events: fd.get_vcpu_events().map_err(kvm("read pending events"))?,
            msrs: read_msrs(fd, msr_indices)?,
        })
    }

    /// Gives a freshly created vCPU this state. CPUID first (KVM checks the
    /// rest against it), MSRs after the LAPIC (the TSC deadline needs it) and
    /// events last, as KVM's documentation orders them.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| StateError::Damaged {
            what: format!("vCPU {} CPUID: {e:?}", self.index),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm("set the vCPU's CPUID"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set the MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm("set registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set segment registers"))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy XSAVE area that
        // KVM_SET_XSAVE reads, no more: no XSAVE2 extension follows it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set the XSAVE state"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("set XCR0"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("set debug registers"))?;
        fd.set_lapic(&self.lapic)
            .map_err(kvm("set the local APIC"))?;
        write_msrs(fd, &self.msrs)?;
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("set pending events"))?;
        // Tells a kvm-clock guest it was stopped, so its soft-lockup
        // watchdog does not count the time it stood still. A guest that
        // never enabled kvm-clock makes KVM refuse; nothing to tell then.
        if let Err(e) = fd.kvmclock_ctrl() {
            log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.index);
        }
        Ok(())
    }
}

/// One `KVM_RUN` that returns at once after finishing the last exit's
/// instruction (immediate_exit makes it fail with EINTR once done).
fn complete_pending_exit(fd: &mut VcpuFd) -> Result<(), StateError> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ()).err();
    fd.set_kvm_immediate_exit(0);
    match result {
        Some(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Some(source) => Err(StateError::Kvm {
            what: "complete the vCPU's last exit",
            source,
        }),
        // An exit instead of EINTR: KVM ran nothing new, the state is sound.
        None => Ok(()),
    }
}

/// Reads every MSR of `indices` this vCPU has; KVM stops a batch at the
/// first it refuses, which is skipped.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| StateError::Damaged {
            what: format!("MSR list: {e:?}"),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("read MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < chunk.len() {
            log::debug!("MSR {:#x} cannot be read: not saved", chunk[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// Writes `entries` in order. An MSR KVM refuses is fine when it already
/// holds the saved value (some are read-only to the VMM on some hosts);
/// otherwise the restore fails naming it.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let msrs = Msrs::from_entries(chunk).map_err(|e| StateError::Damaged {
            what: format!("MSR list: {e:?}"),
        })?;
        let written = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if written < chunk.len() {
            let refused = chunk[written];
            let current = read_msrs(fd, &[refused.index])?;
            if current.first().map(|m| m.data) != Some(refused.data) {
                return Err(StateError::Msr {
                    index: refused.index,
                    value: refused.data,
                });
            }
            rest = &rest[written + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(())
}
