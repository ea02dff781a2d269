//! What a saved state needs of the VM it is restored into: the same vmlab,
//! vCPU count, memory size and devices; and, checked against each vCPU's
//! saved CPUID, the same CPU model. Each mismatch is one line naming both
//! sides.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use super::StateError;

/// The version every state file records and every restore compares.
pub const VMLAB_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    pub vmlab_version: String,
    pub cpus: u8,
    pub mem_size: u64,
    /// One line per device, in MMIO slot order (`virtio-blk 8589934592
    /// bytes`, ...): what the guest's drivers bound to.
    pub devices: Vec<String>,
}

impl MachineSpec {
    /// Whether a VM built as `self` can take a state saved as `saved`.
    pub fn check(&self, saved: &MachineSpec) -> Result<(), StateError> {
        let mismatch = |what: String| Err(StateError::Mismatch(what));
        if saved.vmlab_version != self.vmlab_version {
            return mismatch(format!(
                "it was saved by vmlab {}, this is vmlab {}",
                saved.vmlab_version, self.vmlab_version
            ));
        }
        if saved.cpus != self.cpus {
            return mismatch(format!(
                "it has {} vCPU(s), the VM now has {}",
                saved.cpus, self.cpus
            ));
        }
        if saved.mem_size != self.mem_size {
            return mismatch(format!(
                "it has {} MiB of memory, the VM now has {} MiB",
                saved.mem_size >> 20,
                self.mem_size >> 20
            ));
        }
        if saved.devices != self.devices {
            return mismatch(format!(
                "its devices were [{}], the VM now has [{}]",
                saved.devices.join(", "),
                self.devices.join(", ")
            ));
        }
        Ok(())
    }
}

/// The CPUID a vCPU would get on this host (set as at boot, read back from
/// KVM, which adjusts it) against the one it was saved with: a guest's
/// kernel chose its code paths from it, so they must match.
pub fn check_cpuid(
    index: u8,
    saved: &[kvm_cpuid_entry2],
    here: &[kvm_cpuid_entry2],
) -> Result<(), StateError> {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    let mut saved: Vec<_> = saved.iter().map(without_runtime_bits).collect();
    let mut here: Vec<_> = here.iter().map(without_runtime_bits).collect();
    saved.sort_by_key(key);
    here.sort_by_key(key);
    let same = saved.len() == here.len()
        && saved.iter().zip(&here).all(|(a, b)| {
            (a.function, a.index, a.flags, a.eax, a.ebx, a.ecx, a.edx)
                == (b.function, b.index, b.flags, b.eax, b.ebx, b.ecx, b.edx)
        });
    if same {
        return Ok(());
    }
    let first = saved
        .iter()
        .zip(&here)
        .find(|(a, b)| {
            key(a) != key(b) || (a.eax, a.ebx, a.ecx, a.edx) != (b.eax, b.ebx, b.ecx, b.edx)
        })
        .map(|(a, _)| format!(" (first difference at leaf {:#x}.{})", a.function, a.index))
        .unwrap_or_default();
    Err(StateError::Mismatch(format!(
        "it was saved on another CPU model: vCPU {index}'s CPUID differs from what this host gives{first}"
    )))
}

/// `entry` without the bits KVM rewrites as the guest runs (from its CR4,
/// XCR0 and APIC base): they say what the guest enabled, not what the CPU
/// is. Leaf 1: OSXSAVE, APIC; leaf 7: OSPKE; leaf 0xd: the XSAVE area
/// sizes for the features enabled.
fn without_runtime_bits(entry: &kvm_cpuid_entry2) -> kvm_cpuid_entry2 {
    let mut e = *entry;
    match (e.function, e.index) {
        (1, _) => {
            e.ecx &= !(1 << 27);
            e.edx &= !(1 << 9);
        }
        (7, 0) => e.ecx &= !(1 << 4),
        (0xd, 0 | 1) => e.ebx = 0,
        _ => {}
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            vmlab_version: VMLAB_VERSION.into(),
            cpus: 1,
            mem_size: 512 << 20,
            devices: vec!["virtio-rng".into(), "virtio-blk 1073741824 bytes".into()],
        }
    }

    #[test]
    fn each_mismatch_is_one_line_naming_both_sides() {
        let here = spec();
        here.check(&spec()).unwrap();
        type Change = fn(&mut MachineSpec);
        let cases: [(Change, &str); 4] = [
            (
                |s| s.vmlab_version = "0.0.1".into(),
                "saved by vmlab 0.0.1, this is vmlab",
            ),
            (|s| s.cpus = 2, "it has 2 vCPU(s), the VM now has 1"),
            (
                |s| s.mem_size = 1 << 30,
                "it has 1024 MiB of memory, the VM now has 512 MiB",
            ),
            (
                |s| s.devices.pop().map(drop).unwrap_or(()),
                "its devices were [virtio-rng]",
            ),
        ];
        for (change, expected) in cases {
            let mut saved = spec();
            change(&mut saved);
            let err = here.check(&saved).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(
                err.starts_with("the saved state does not fit this VM"),
                "{err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn another_cpu_model_is_refused_and_order_does_not_matter() {
        let leaf = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let saved = [leaf(0, 0xd), leaf(1, 0x806f8)];
        check_cpuid(0, &saved, &[leaf(1, 0x806f8), leaf(0, 0xd)]).unwrap();
        let err = check_cpuid(0, &saved, &[leaf(0, 0xd), leaf(1, 0xa0f11)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("another CPU model"), "{err}");
        assert!(err.contains("leaf 0x1.0"), "{err}");
        assert!(check_cpuid(0, &saved, &saved[..1]).is_err());
        // What the guest enabled (OSXSAVE here) is no other CPU model.
        let mut enabled = saved;
        enabled[1].ecx |= 1 << 27;
        check_cpuid(0, &enabled, &saved).unwrap();
    }
}
