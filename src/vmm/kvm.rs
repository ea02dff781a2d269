//! Opening KVM with errors a user can act on, and recognising hosts whose
//! KVM is PVM (a software backend that only runs PVM-patched guests).

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

use super::error::VmmError;

/// Capabilities vmlab relies on, with the names users will see.
const REQUIRED_CAPS: [(Cap, &str); 7] = [
    (
        Cap::Irqchip,
        "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)",
    ),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
    (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Opens /dev/kvm and checks it can run a vmlab guest.
pub fn open() -> Result<Kvm, VmmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmmError::NoKvm,
        libc::EACCES | libc::EPERM => VmmError::KvmPermission,
        _ => VmmError::KvmOpen(std::io::Error::from_raw_os_error(e.errno())),
    })?;
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Largest vCPU count KVM accepts for one VM.
pub fn max_vcpus(kvm: &Kvm) -> usize {
    kvm.get_max_vcpus()
}

/// Whether this host's /dev/kvm is served by PVM.
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// What a user needs to know when an ordinary kernel dies on a PVM host.
pub const PVM_HINT: &str = "this host's KVM is PVM (kvm_pvm), a software backend that can only run guest kernels built with PVM guest support (CONFIG_PVM_GUEST); an ordinary Linux kernel stops at its first exception. Boot a PVM-enabled guest kernel, or run vmlab where KVM uses hardware virtualization (on a PVM machine like this one, inside the emulated-SVM rig: see README)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_hint_names_the_cause_and_the_way_out() {
        assert!(PVM_HINT.contains("PVM"));
        assert!(PVM_HINT.contains("CONFIG_PVM_GUEST"));
        assert!(!PVM_HINT.contains('\n'));
    }
}
