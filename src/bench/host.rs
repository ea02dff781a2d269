//! What kind of host a benchmark ran on: timings from hardware KVM, nested
//! KVM, PVM and an emulated CPU mean very different things, so every report
//! names it.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// How this machine's /dev/kvm runs guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKind {
    /// Bare metal: the CPU's own VMX/SVM.
    HardwareKvm,
    /// This machine is itself a VM under another hypervisor (KVM, Hyper-V,
    /// ...): guests here run nested.
    Nested,
    /// /dev/kvm is PVM (kvm_pvm): only PVM-enabled guest kernels run.
    Pvm,
    /// This machine's CPU is emulated (QEMU TCG, e.g. the emulated-SVM test
    /// rig): timings are inflated, only ratios within one run mean anything.
    Emulated,
}

impl HostKind {
    pub fn name(self) -> &'static str {
        match self {
            HostKind::HardwareKvm => "hardware KVM",
            HostKind::Nested => "nested",
            HostKind::Pvm => "PVM",
            HostKind::Emulated => "emulated",
        }
    }
}

/// The host kind and what it was told by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub kind: HostKind,
    /// The evidence, e.g. `CPUID hypervisor signature "TCGTCGTCGTCG" (QEMU TCG)`.
    pub detail: String,
    /// The running kernel's release (`uname -r`).
    pub kernel: String,
    pub cpus: usize,
}

impl HostInfo {
    /// Looks at this machine.
    pub fn detect() -> HostInfo {
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        let (kind, detail) = classify(pvm, hypervisor_signature().as_deref());
        HostInfo {
            kind,
            detail,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// One line for reports: kind, evidence, and what timings mean here.
    pub fn describe(&self) -> String {
        let meaning = match self.kind {
            HostKind::HardwareKvm => "timings are native",
            HostKind::Nested => "guests run nested: timings include the outer hypervisor",
            HostKind::Pvm => "only PVM-enabled guest kernels run here",
            HostKind::Emulated => {
                "timings are inflated by CPU emulation: only ratios within this run mean anything"
            }
        };
        format!(
            "{} ({}; Linux {}, {} CPUs): {meaning}",
            self.kind.name(),
            self.detail,
            self.kernel,
            self.cpus
        )
    }
}

/// The CPUID hypervisor vendor signature (leaf 0x4000_0000), when the
/// hypervisor-present bit (leaf 1, ECX bit 31) is set.
#[cfg(target_arch = "x86_64")]
fn hypervisor_signature() -> Option<String> {
    use std::arch::x86_64::__cpuid;
    if __cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    let leaf = __cpuid(0x4000_0000);
    let bytes: Vec<u8> = [leaf.ebx, leaf.ecx, leaf.edx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    Some(
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_string(),
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn hypervisor_signature() -> Option<String> {
    None
}

/// Decides the kind from what the machine shows: the kvm_pvm module, and the
/// hypervisor signature when CPUID says there is a hypervisor.
fn classify(pvm: bool, signature: Option<&str>) -> (HostKind, String) {
    let known = |sig: &str| match sig {
        "TCGTCGTCGTCG" => " (QEMU TCG)",
        "KVMKVMKVM" => " (KVM)",
        "Microsoft Hv" => " (Hyper-V)",
        "VMwareVMware" => " (VMware)",
        "XenVMMXenVMM" => " (Xen)",
        "VBoxVBoxVBox" => " (VirtualBox)",
        _ => "",
    };
    let sig_text = |sig: &str| format!("CPUID hypervisor signature {sig:?}{}", known(sig));
    match (pvm, signature) {
        (true, Some(sig)) => (HostKind::Pvm, format!("kvm_pvm loaded; {}", sig_text(sig))),
        (true, None) => (HostKind::Pvm, "kvm_pvm loaded".to_string()),
        (false, None) => (
            HostKind::HardwareKvm,
            "no hypervisor bit in CPUID".to_string(),
        ),
        (false, Some("TCGTCGTCGTCG")) => (HostKind::Emulated, sig_text("TCGTCGTCGTCG")),
        (false, Some(sig)) => (HostKind::Nested, sig_text(sig)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_each_kind() {
        assert_eq!(classify(false, None).0, HostKind::HardwareKvm);
        let (kind, detail) = classify(false, Some("TCGTCGTCGTCG"));
        assert_eq!(kind, HostKind::Emulated);
        assert!(detail.contains("QEMU TCG"), "{detail}");
        let (kind, detail) = classify(false, Some("KVMKVMKVM"));
        assert_eq!(kind, HostKind::Nested);
        assert!(detail.contains("\"KVMKVMKVM\" (KVM)"), "{detail}");
        assert_eq!(classify(false, Some("SomethingNew")).0, HostKind::Nested);
        // PVM wins over any signature: it decides what guests can run.
        assert_eq!(classify(true, Some("KVMKVMKVM")).0, HostKind::Pvm);
        assert_eq!(classify(true, None).0, HostKind::Pvm);
    }

    #[test]
    fn detects_this_machine_and_describes_it_in_one_line() {
        let host = HostInfo::detect();
        assert_eq!(
            host.kind == HostKind::Pvm,
            Path::new("/sys/module/kvm_pvm").exists()
        );
        let line = host.describe();
        assert!(line.starts_with(host.kind.name()), "{line}");
        assert!(!line.contains('\n'));
        assert!(host.cpus >= 1);
    }

    #[test]
    fn serializes_kinds_in_kebab_case() {
        let json = serde_json::to_string(&HostKind::HardwareKvm).unwrap();
        assert_eq!(json, "\"hardware-kvm\"");
    }
}
