//! vmlab's ACPI tables, disassembled by the ACPI reference toolchain (iasl
//! from acpica-tools): every table must decode without errors or checksum
//! warnings, and the DSDT's AML must declare what the guest relies on.

use std::process::Command;

#[test]
fn iasl_decodes_every_table_cleanly() {
    use vmlab::arch::x86_64::acpi::{build_tables, VirtioMmioSlot};
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
    let tables = build_tables(4, &slots).expect("tables build");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("acpi-iasl");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut dsdt = String::new();
    // The RSDP is not a table iasl can decode on its own (it has no table
    // header); its layout and checksums are unit-tested in acpi.rs.
    for (_, bytes) in tables
        .tables
        .iter()
        .filter(|(_, b)| !b.starts_with(b"RSD PTR "))
    {
        let name = String::from_utf8_lossy(&bytes[..4]).replace(' ', "_");
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, bytes).unwrap();
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(&dir)
            .output()
            .expect("iasl runs (package acpica-tools, installed by .ci/setup)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl failed on {name}:\n{text}");
        for bad in ["Error", "Warning", "Invalid", "Incorrect checksum"] {
            assert!(
                !text.contains(bad),
                "iasl reports '{bad}' for {name}:\n{text}"
            );
        }
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
        assert!(!dsl.contains("Incorrect checksum"), "{name}:\n{dsl}");
        if name == "DSDT" {
            dsdt = dsl;
        }
    }
    for needle in [
        "Name (_S5, Package",
        "EisaId (\"PNP0501\")",
        "EisaId (\"PNP0C0C\")",
        "\"ACPI0013\"",
        "\"QEMU0001\"",
        "Notify (\\_SB.PWRB, 0x80)",
        "\"LNRO0005\"",
        "Memory32Fixed (ReadWrite,",
    ] {
        assert!(dsdt.contains(needle), "DSDT lacks {needle}:\n{dsdt}");
    }
}
