//! CPUID for each vCPU: what KVM supports, plus the identity and topology
//! of that vCPU (APIC ID, core count) and the KVM signature leaf so the
//! guest finds kvm-clock and the other paravirtual features.
//!
//! The topology presented is one socket of N single-threaded cores, with
//! APIC ID = vCPU index. The same facts are stated in every leaf Linux may
//! consult (1, 4, 0xB, 0x1F, and AMD's 0x80000001/8/1E) so that Intel and
//! AMD hosts give the guest the same picture.
//!
//! Hardware virtualization (VMX/SVM) is hidden: a lab guest does not run its
//! own VMs, and a guest kernel that sees SVM spends boot time bringing up KVM.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_APIC_ID: u32 = 0x8000_001e;

const FEATURES_ECX_VMX: u32 = 1 << 5;
const FEATURES_ECX_HYPERVISOR: u32 = 1 << 31;
const EXT_FEATURES_ECX_SVM: u32 = 1 << 2;
const FEATURES_EDX_HTT: u32 = 1 << 28;
const EXT_FEATURES_ECX_CMP_LEGACY: u32 = 1 << 1;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Topology level types for leaves 0xB and 0x1F.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// CPU vendor, as far as topology leaves differ between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Reads the vendor string from leaf 0.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to number `count` cores in an APIC ID.
fn core_id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

fn topology_entry(function: u32, index: u32, apic_id: u32, cpus: u8) -> kvm_cpuid_entry2 {
    let bits = core_id_bits(cpus);
    let (eax, ebx, ecx) = match index {
        // SMT level: one thread per core, so the shift to the next level is 0.
        0 => (0, 1, (LEVEL_TYPE_SMT << 8) | index),
        // Core level: all vCPUs in the one package.
        1 => (bits, u32::from(cpus), (LEVEL_TYPE_CORE << 8) | index),
        // Terminating level: type 0.
        _ => (0, 0, index),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx,
        edx: apic_id,
        ..Default::default()
    }
}

/// The CPUID entries for vCPU `index` of `cpus`, from KVM's supported set.
pub fn vcpu_cpuid(supported: &[kvm_cpuid_entry2], index: u8, cpus: u8) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(index);
    let bits = core_id_bits(cpus);
    let vendor = vendor(supported);
    let max_basic = supported
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map_or(0, |e| e.eax);

    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| {
            !matches!(
                e.function,
                LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 | LEAF_KVM_SIGNATURE
            )
        })
        .copied()
        .collect();

    for entry in &mut out {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((1 << bits) << 16);
                entry.ecx |= FEATURES_ECX_HYPERVISOR;
                entry.ecx &= !FEATURES_ECX_VMX;
                if cpus > 1 {
                    entry.edx |= FEATURES_EDX_HTT;
                } else {
                    entry.edx &= !FEATURES_EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { (1 << bits) - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | (((1u32 << bits) - 1) << 26);
            }
            LEAF_EXT_FEATURES => {
                entry.ecx &= !EXT_FEATURES_ECX_SVM;
                if vendor != Vendor::Amd {
                    continue;
                }
                if cpus > 1 {
                    entry.ecx |= EXT_FEATURES_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !EXT_FEATURES_ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_SIZES if vendor == Vendor::Amd => {
                entry.ecx = (entry.ecx & !0xf0ff) | (bits << 12) | (u32::from(cpus) - 1);
            }
            LEAF_EXT_APIC_ID if vendor == Vendor::Amd => {
                entry.eax = apic_id;
                // One thread per core; core ID = vCPU index.
                entry.ebx = apic_id & 0xff;
                // One node, node ID 0.
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }

    if max_basic >= LEAF_TOPOLOGY {
        out.extend((0..3).map(|i| topology_entry(LEAF_TOPOLOGY, i, apic_id, cpus)));
    }
    if max_basic >= LEAF_TOPOLOGY_V2 {
        out.extend((0..3).map(|i| topology_entry(LEAF_TOPOLOGY_V2, i, apic_id, cpus)));
    }

    // KVM reports its own signature leaf, but a guest must see it even if a
    // host (or a nested KVM) leaves it out: kvm-clock depends on it.
    let kvm_features_leaf = supported
        .iter()
        .find(|e| e.function == LEAF_KVM_SIGNATURE)
        .map_or(LEAF_KVM_SIGNATURE + 1, |e| {
            e.eax.max(LEAF_KVM_SIGNATURE + 1)
        });
    out.push(kvm_cpuid_entry2 {
        function: LEAF_KVM_SIGNATURE,
        eax: kvm_features_leaf,
        ebx: KVM_SIGNATURE[0],
        ecx: KVM_SIGNATURE[1],
        edx: KVM_SIGNATURE[2],
        ..Default::default()
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A trimmed-down supported set, shaped like an AMD host's.
    fn amd_host() -> Vec<kvm_cpuid_entry2> {
        vec![
            // "AuthenticAMD": EBX="Auth", EDX="enti", ECX="cAMD"; max leaf 0x1f.
            leaf(0, 0, [0x1f, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(1, 0, [0x00a2_0f10, 0x0008_0800, 0x0000_0001, 0x0000_0000]),
            leaf(0xb, 0, [9, 9, 9, 9]),
            leaf(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
            leaf(0x4000_0001, 0, [0x0100_00fb, 0, 0, 0]),
            leaf(0x8000_0001, 0, [0, 0, 0x0040_0000, 0]),
            leaf(0x8000_0008, 0, [0x3030, 0, 0x0000_f0ff, 0]),
            leaf(0x8000_001e, 0, [7, 7, 7, 7]),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        let matching: Vec<_> = entries
            .iter()
            .filter(|e| e.function == function && e.index == index)
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "leaf {function:#x}.{index} must appear once"
        );
        *matching[0]
    }

    #[test]
    fn detects_vendor() {
        assert_eq!(vendor(&amd_host()), Vendor::Amd);
        let intel = [leaf(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69])];
        assert_eq!(vendor(&intel), Vendor::Intel);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let out = vcpu_cpuid(&amd_host(), 3, 4);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "addressable logical IDs");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & FEATURES_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & FEATURES_EDX_HTT, 0);
        let single = find(&vcpu_cpuid(&amd_host(), 0, 1), 1, 0);
        assert_eq!(single.edx & FEATURES_EDX_HTT, 0);
    }

    #[test]
    fn hides_hardware_virtualization() {
        let mut host = amd_host();
        for e in &mut host {
            match e.function {
                1 => e.ecx |= FEATURES_ECX_VMX,
                0x8000_0001 => e.ecx |= EXT_FEATURES_ECX_SVM,
                _ => {}
            }
        }
        let out = vcpu_cpuid(&host, 0, 1);
        assert_eq!(find(&out, 1, 0).ecx & FEATURES_ECX_VMX, 0);
        assert_eq!(find(&out, 0x8000_0001, 0).ecx & EXT_FEATURES_ECX_SVM, 0);
    }

    #[test]
    fn topology_leaves_describe_one_package_of_n_cores() {
        let out = vcpu_cpuid(&amd_host(), 2, 3);
        for function in [0xb, 0x1f] {
            let smt = find(&out, function, 0);
            let core = find(&out, function, 1);
            let end = find(&out, function, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 2));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 3, 2, 2));
            assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
    }

    #[test]
    fn amd_extended_leaves() {
        let out = vcpu_cpuid(&amd_host(), 1, 2);
        let sizes = find(&out, 0x8000_0008, 0);
        assert_eq!(sizes.ecx & 0xff, 1, "NC = cores - 1");
        assert_eq!((sizes.ecx >> 12) & 0xf, 1, "ApicIdCoreIdSize");
        let ext = find(&out, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (1, 1, 0));
        let feats = find(&out, 0x8000_0001, 0);
        assert_ne!(feats.ecx & EXT_FEATURES_ECX_CMP_LEGACY, 0);
        assert_ne!(feats.ecx & 0x0040_0000, 0, "other bits kept");
    }

    #[test]
    fn kvm_signature_present_once_even_if_host_omits_it() {
        let out = vcpu_cpuid(&amd_host(), 0, 1);
        let sig = find(&out, 0x4000_0000, 0);
        assert_eq!([sig.ebx, sig.ecx, sig.edx], KVM_SIGNATURE);
        let bytes: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&bytes, b"KVMKVMKVM\0\0\0");
        assert_eq!(sig.eax, 0x4000_0001);
        find(&out, 0x4000_0001, 0);

        let mut bare = amd_host();
        bare.retain(|e| e.function != 0x4000_0000);
        let out = vcpu_cpuid(&bare, 0, 1);
        assert_eq!(find(&out, 0x4000_0000, 0).ebx, KVM_SIGNATURE[0]);
    }

    #[test]
    fn intel_cache_leaf_reports_sharing() {
        let intel = vec![
            leaf(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            // L1 data cache (level 1) and L3 (level 3).
            kvm_cpuid_entry2 {
                function: 4,
                index: 0,
                eax: 0x121,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: 0x163,
                ..Default::default()
            },
        ];
        let out = vcpu_cpuid(&intel, 0, 4);
        let l1 = find(&out, 4, 0);
        let l3 = find(&out, 4, 3);
        assert_eq!(l1.eax >> 26, 3);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, 0x163);
    }
}
