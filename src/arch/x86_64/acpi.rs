//! ACPI tables: how the guest learns its CPUs (MADT), how it powers off and
//! resets (FADT sleep and reset registers in hardware-reduced mode, `_S5_`),
//! and its platform devices (DSDT: power button, pvpanic).
//!
//! Hardware-reduced ACPI needs no PM timer, GPE blocks or SCI: three one-byte
//! I/O registers are the whole "chipset". The tables live in the reserved
//! BIOS area at `ACPI_START`, RSDP first, where Linux finds it by pointer
//! (zero page / PVH start info) or by its legacy scan.

use acpi_tables::aml::{
    self, Arg, Device, EISAName, Equal, If, Interrupt, Method, Name, Notify, Package, Path,
    ResourceTemplate, Return, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_START, CMOS_CENTURY, CMOS_RTC_PORT, GED_GSI, IOAPIC_ADDR,
    LAPIC_ADDR, PVPANIC_PORT, SERIAL_IRQ, SERIAL_PORT, VMGENID_ADDR, VMGENID_GSI,
};

const OEM_ID: [u8; 6] = *b"VMLAB ";
const OEM_REVISION: u32 = 1;
/// "VMLAB\0\0\0" in the FADT's hypervisor vendor identity.
const HYPERVISOR_ID: u64 = u64::from_le_bytes(*b"VMLAB\0\0\0");

/// Tables the XSDT points to: FADT and MADT (the DSDT hangs off the FADT).
const XSDT_ENTRIES: u64 = 2;
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LOCAL_APIC: u8 = 0;
const MADT_TYPE_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_ENABLED: u32 = 1;

/// A virtio-mmio device window and its interrupt, declared in the DSDT so
/// Linux's virtio_mmio driver finds it (ACPI ID LNRO0005).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// Table bytes to copy to guest memory, each at its address.
pub struct AcpiTables {
    pub rsdp_addr: u64,
    pub tables: Vec<(u64, Vec<u8>)>,
}

/// Errors building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes, more than the {1} reserved for them")]
    TooLarge(u64, u64),
}

fn aml_bytes(object: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT's AML: `_S5_`, COM1, the power button behind a GED, pvpanic
/// and the virtio-mmio devices.
fn dsdt_aml(virtio: &[VirtioMmioSlot]) -> Vec<u8> {
    let mut aml = Vec::new();
    // Linux reads SLP_TYPa from the first element.
    Name::new("_S5_".into(), &Package::new(vec![&ACPI_S5_SLEEP_TYPE])).to_aml_bytes(&mut aml);

    // COM1. In hardware-reduced mode Linux drops the legacy PIC and with
    // it the ISA IRQ mappings, so the UART's IRQ 4 only works when the
    // port is declared here and registered through ACPI.
    let com1_hid = EISAName::new("PNP0501");
    let com1_port = IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = ResourceTemplate::new(vec![&com1_port, &com1_irq]);
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &com1_hid),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut aml);

    // The CMOS RTC, without an IRQ (it raises none): Linux's rtc_cmos
    // binds it through PNP and runs it without alarms.
    let rtc_hid = EISAName::new("PNP0B00");
    let rtc_port = IO::new(CMOS_RTC_PORT, CMOS_RTC_PORT, 1, 2);
    let rtc_crs = ResourceTemplate::new(vec![&rtc_port]);
    Device::new(
        "_SB_.RTC_".into(),
        vec![
            &Name::new("_HID".into(), &rtc_hid),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &rtc_crs),
        ],
    )
    .to_aml_bytes(&mut aml);

    let pwrb_hid = EISAName::new("PNP0C0C");
    Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &pwrb_hid),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut aml);

    // The VM Generation ID (Microsoft's "Virtual Machine Generation ID"
    // device, which Linux's vmgenid driver binds by VMGENCTR or the
    // VM_Gen_Counter CID): ADDR gives the GUID's guest-physical address as
    // two 32-bit halves; a Notify says it changed (`vmm::vmgenid`).
    let low = VMGENID_ADDR as u32;
    let high = (VMGENID_ADDR >> 32) as u32;
    let addr = Package::new(vec![&low, &high]);
    Device::new(
        "_SB_.VGEN".into(),
        vec![
            &Name::new("_HID".into(), &"VMGENCTR"),
            &Name::new("_CID".into(), &"VM_Gen_Counter"),
            &Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &Method::new("ADDR".into(), 0, false, vec![&Return::new(&addr)]),
        ],
    )
    .to_aml_bytes(&mut aml);

    // The GED calls _EVT with the GSI that fired: the power button's (the
    // tiny power-button driver turns it into a signal to init) or the
    // generation ID's.
    let irq = Interrupt::new(true, true, false, false, GED_GSI);
    let genid_irq = Interrupt::new(true, true, false, false, VMGENID_GSI);
    let crs = ResourceTemplate::new(vec![&irq, &genid_irq]);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &0x80u8);
    let is_button = Equal::new(&Arg(0), &GED_GSI);
    let on_button = If::new(&is_button, vec![&notify]);
    let genid = Path::new("\\_SB_.VGEN");
    let notify_genid = Notify::new(&genid, &0x80u8);
    let is_genid = Equal::new(&Arg(0), &VMGENID_GSI);
    let on_genid = If::new(&is_genid, vec![&notify_genid]);
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
            &Method::new("_EVT".into(), 1, true, vec![&on_button, &on_genid]),
        ],
    )
    .to_aml_bytes(&mut aml);

    let port = IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_crs = ResourceTemplate::new(vec![&port]);
    Device::new(
        "_SB_.PVPN".into(),
        vec![
            &Name::new("_HID".into(), &"QEMU0001"),
            &Name::new("_STA".into(), &0xfu8),
            &Name::new("_CRS".into(), &pvpanic_crs),
        ],
    )
    .to_aml_bytes(&mut aml);

    for (index, slot) in virtio.iter().enumerate() {
        let window = aml::Memory32Fixed::new(true, slot.base as u32, slot.len as u32);
        let irq = Interrupt::new(true, true, false, false, slot.gsi);
        let crs = ResourceTemplate::new(vec![&window, &irq]);
        let uid = index as u32;
        Device::new(
            format!("_SB_.V{index:03X}").as_str().into(),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut aml);
    }
    aml
}

/// MADT: one enabled local APIC per vCPU (APIC ID = index) and the IOAPIC.
fn madt(cpus: u8) -> Sdt {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"VMLABAPC", OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    for id in 0..cpus {
        entries.extend_from_slice(&[MADT_TYPE_LOCAL_APIC, 8, id, id]);
        entries.extend_from_slice(&MADT_LOCAL_APIC_ENABLED.to_le_bytes());
    }
    // The IOAPIC's ID follows the CPUs' so no two APIC IDs collide.
    entries.extend_from_slice(&[MADT_TYPE_IO_APIC, 12, cpus, 0]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&entries);
    madt
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"VMLABFAC", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::Headless)
        .dsdt_64(dsdt_addr);
    fadt.reset_reg = io_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = HYPERVISOR_ID.into();
    // No VGA and no legacy CMOS RTC to probe: Linux then skips both. The
    // RTC is declared in the DSDT instead (PNP0B00), where rtc_cmos finds
    // it through PNP; kernels without that driver (the lean one) see no
    // RTC at all, as before it existed.
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    fadt.century = CMOS_CENTURY;
    aml_bytes(&fadt.finalize())
}

fn align16(addr: u64) -> u64 {
    (addr + 15) & !15
}

/// Lays out RSDP, XSDT, FADT, DSDT and MADT from `ACPI_START` on.
pub fn build_tables(cpus: u8, virtio: &[VirtioMmioSlot]) -> Result<AcpiTables, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // The XSDT's size is known up front: header plus one entry per table.
    let fadt_addr = align16(xsdt_addr + 36 + XSDT_ENTRIES * 8);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let dsdt_addr = align16(fadt_addr + fadt_len);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VMLABDSD", OEM_REVISION);
    dsdt.append_slice(&dsdt_aml(virtio));
    let madt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let madt = madt(cpus);
    let end = madt_addr + madt.len() as u64;
    // The generation ID's page ends the area.
    if end > VMGENID_ADDR {
        return Err(AcpiError::TooLarge(
            end - ACPI_START,
            VMGENID_ADDR - ACPI_START,
        ));
    }

    let mut xsdt = XSDT::new(OEM_ID, *b"VMLABXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_bytes = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt_bytes.len() as u64, 36 + XSDT_ENTRIES * 8);

    Ok(AcpiTables {
        rsdp_addr,
        tables: vec![
            (rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
            (xsdt_addr, xsdt_bytes),
            (fadt_addr, fadt(dsdt_addr)),
            (dsdt_addr, dsdt.as_slice().to_vec()),
            (madt_addr, madt.as_slice().to_vec()),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    /// An Extended Interrupt descriptor: consumer, edge, active high, one GSI.
    fn extended_irq(gsi: u32) -> [u8; 9] {
        let g = gsi.to_le_bytes();
        [0x89, 0x06, 0x00, 0x03, 0x01, g[0], g[1], g[2], g[3]]
    }
    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    fn table<'a>(t: &'a AcpiTables, sig: &[u8]) -> (u64, &'a [u8]) {
        let (addr, bytes) = t
            .tables
            .iter()
            .find(|(_, b)| &b[..sig.len()] == sig)
            .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(sig)));
        (*addr, bytes)
    }

    #[test]
    fn rsdp_points_to_xsdt_which_lists_fadt_and_madt() {
        let t = build_tables(2, &[]).unwrap();
        let (rsdp_addr, rsdp) = table(&t, b"RSD PTR ");
        assert_eq!(rsdp_addr, ACPI_START);
        assert_eq!(rsdp.len(), 36);
        assert!(sums_to_zero(&rsdp[..20]), "ACPI 1.0 checksum");
        assert!(sums_to_zero(rsdp), "extended checksum");
        assert_eq!(rsdp[15], 2, "revision 2 (ACPI 2.0+)");
        assert_eq!(u32_at(rsdp, 20), 36, "length");
        let (xsdt_addr, xsdt) = table(&t, b"XSDT");
        assert_eq!(u64_at(rsdp, 24), xsdt_addr);
        assert!(sums_to_zero(xsdt));
        assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
        let (fadt_addr, _) = table(&t, b"FACP");
        let (madt_addr, _) = table(&t, b"APIC");
        assert_eq!(u64_at(xsdt, 36), fadt_addr);
        assert_eq!(u64_at(xsdt, 44), madt_addr);
        for (addr, bytes) in &t.tables {
            assert!(addr + bytes.len() as u64 <= crate::arch::x86_64::layout::ACPI_END);
            assert_eq!(addr % 16, 0);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = build_tables(1, &[]).unwrap();
        let (_, fadt) = table(&t, b"FACP");
        let (dsdt_addr, _) = table(&t, b"DSDT");
        assert_eq!(fadt.len(), 276, "ACPI 6.x FADT length");
        assert_eq!(u32_at(fadt, 4), 276);
        assert!(sums_to_zero(fadt));
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(
            u16_at(fadt, 109),
            (1 << 2) | (1 << 5),
            "IAPC_BOOT_ARCH: no VGA, no legacy RTC (the DSDT declares it)"
        );
        assert_eq!(fadt[108], 0x32, "CENTURY");
        // RESET_REG: GAS at 116 (space, width, offset, access, address).
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 120), u64::from(ACPI_RESET_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(&fadt[244..248], &[1, 8, 0, 1]);
        assert_eq!(u64_at(fadt, 248), u64::from(ACPI_SLEEP_CONTROL_PORT));
        assert_eq!(u64_at(fadt, 260), u64::from(ACPI_SLEEP_STATUS_PORT));
        assert_eq!(&fadt[268..276], b"VMLAB\0\0\0");
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = build_tables(3, &[]).unwrap();
        let (_, madt) = table(&t, b"APIC");
        assert!(sums_to_zero(madt));
        assert_eq!(u32_at(madt, 4) as usize, madt.len());
        assert_eq!(u32_at(madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        let mut offset = 44;
        for cpu in 0..3u8 {
            assert_eq!(&madt[offset..offset + 4], &[0, 8, cpu, cpu]);
            assert_eq!(u32_at(madt, offset + 4), 1, "enabled");
            offset += 8;
        }
        assert_eq!(&madt[offset..offset + 4], &[1, 12, 3, 0]);
        assert_eq!(u32_at(madt, offset + 4), 0xfec0_0000);
        assert_eq!(u32_at(madt, offset + 8), 0, "GSI base");
        assert_eq!(madt.len(), offset + 12);
        assert_eq!(u16_at(madt, 8) & 0xff, 5, "revision");
    }

    #[test]
    fn dsdt_declares_the_generation_id_and_the_ged_notifies_it() {
        let t = build_tables(1, &[]).unwrap();
        let (_, dsdt) = table(&t, b"DSDT");
        let aml = &dsdt[36..];
        let contains = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"VGEN"));
        assert!(contains(b"VMGENCTR\0"), "_HID Linux's vmgenid binds");
        assert!(contains(b"VM_Gen_Counter\0"), "_CID of the spec");
        // Method ADDR, no arguments: Return (Package (2) { DWord 0xff000, Zero }).
        assert!(contains(b"ADDR\x00\xa4\x12"), "ADDR returns a package");
        let addr = VMGENID_ADDR as u32;
        let mut package = vec![0x02, 0x0c];
        package.extend_from_slice(&addr.to_le_bytes());
        assert!(contains(&package), "the GUID's address, low half");
        // The GED takes the generation ID's GSI and notifies VGEN with 0x80.
        assert!(contains(&extended_irq(VMGENID_GSI)));
        assert!(
            contains(b"\x86\\\x2e_SB_VGEN\x0a\x80"),
            "Notify (\\_SB.VGEN, 0x80)"
        );
        // Tables and the page never overlap.
        for (addr, bytes) in &t.tables {
            assert!(addr + bytes.len() as u64 <= VMGENID_ADDR);
        }
    }

    #[test]
    fn dsdt_declares_s5_com1_power_button_ged_and_pvpanic() {
        let t = build_tables(1, &[]).unwrap();
        let (_, dsdt) = table(&t, b"DSDT");
        assert!(sums_to_zero(dsdt));
        assert_eq!(u32_at(dsdt, 4) as usize, dsdt.len());
        let aml = &dsdt[36..];
        let contains = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        // NameOp "_S5_" PackageOp PkgLength(4) NumElements(1) BytePrefix 5
        assert!(contains(&[
            0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x01, 0x0a, 0x05
        ]));
        assert!(contains(b"ACPI0013\0"), "GED _HID");
        assert!(contains(b"QEMU0001\0"), "pvpanic _HID");
        assert!(contains(b"PWRB"));
        // COM1: EISA ID PNP0501 (DWordPrefix 0x0105D041), IO 0x3f8 len 8, IRQ 4.
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        assert!(contains(&[0x89, 0x06, 0x00, 0x03, 0x01, 4, 0, 0, 0]));
        // Extended IRQ descriptor for the GED: consumer, edge, active high.
        assert!(contains(&extended_irq(GED_GSI)));
        // The RTC: EISA ID PNP0B00 (0x000BD041), IO 0x70 len 2.
        assert!(contains(&[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
        assert!(contains(&[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]));
        // IO descriptor for pvpanic: decode16, min = max = 0x505, len 1.
        assert!(contains(&[0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]));
    }

    #[test]
    fn fits_the_most_vcpus_and_devices_vmlab_allows() {
        let slots: Vec<_> = (0..18)
            .map(|i| VirtioMmioSlot {
                base: 0xd000_0000 + i * 0x1000,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        build_tables(u8::MAX, &slots).unwrap();
    }

    #[test]
    fn dsdt_declares_each_virtio_mmio_device() {
        let slots = [
            VirtioMmioSlot {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            },
            VirtioMmioSlot {
                base: 0xd000_1000,
                len: 0x1000,
                gsi: 6,
            },
        ];
        let t = build_tables(1, &slots).unwrap();
        let (_, dsdt) = table(&t, b"DSDT");
        let aml = &dsdt[36..];
        let contains = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert_eq!(aml.windows(9).filter(|w| w == b"LNRO0005\0").count(), 2);
        // Memory32Fixed: read-write, base, length.
        assert!(contains(&[
            0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00
        ]));
        assert!(contains(&[0x89, 0x06, 0x00, 0x03, 0x01, 6, 0, 0, 0]));
        assert!(contains(b"V001"));
    }
}
