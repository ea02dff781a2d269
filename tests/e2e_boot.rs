//! `vmlab run` boots real Linux: in the emulated-SVM rig (tests/rig), one L1
//! boot runs vmlab on an ordinary hardware-style /dev/kvm and checks, from
//! the guest's console, everything a user sees: the command line, SMP, input
//! typed into the shell, poweroff and reboot both ending vmlab with status 0,
//! both kernel formats, a guest panic and a triple fault ending it with an
//! error, and the boot timer.

mod rig;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// A minimal ELF "kernel" whose only instruction is `ud2`. With no IDT the
/// #UD becomes a double and then a triple fault.
fn triple_fault_elf() -> PathBuf {
    const LOAD: u64 = 0x10_0000;
    let code = [0x0f, 0x0b];
    let mut elf = Vec::new();
    // ELF header: 64-bit, little endian, executable, x86-64.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 1, 0, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&v.to_le_bytes());
    }
    // One PT_LOAD segment right after the headers.
    elf.extend_from_slice(&1u32.to_le_bytes()); // p_type
    elf.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R+X
    elf.extend_from_slice(&120u64.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    assert_eq!(elf.len(), 120);
    elf.extend_from_slice(&code);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("triple-fault.elf");
    std::fs::write(&path, elf).unwrap();
    path
}

/// Boots a kernel with the default initramfs, waits for the shell, runs the
/// checks, and ends with the command given (poweroff or reboot).
const SHELL_SESSION: &str = r#"
session() {
    local kernel=$1 cpus=$2 ending=$3 status=0
    rig_console_start vm "$VMLAB" run --kernel "$kernel" --initrd "$VMLAB_INITRAMFS" \
        --cpus "$cpus" --mem 256M --cmdline "vmlab.e2e=$ending" --boot-timer
    rig_console_wait vm 'root@vmlab:.*# ' 180
    rig_console_send vm 'echo "cmdline=$(cat /proc/cmdline)"'
    rig_console_wait vm '^cmdline=' 30
    rig_console_send vm 'echo "nproc=$(nproc)"'
    rig_console_wait vm '^nproc=[0-9]' 30
    rig_console_send vm 'echo "typed-$((6*7))"'
    rig_console_wait vm '^typed-42' 30
    rig_console_send vm 'echo "rng=$(cat /sys/class/misc/hw_random/rng_current) $(head -c 8 /dev/hwrng | od -An -tx1 | tr -d " ")"'
    rig_console_wait vm '^rng=' 30
    rig_console_send vm "$ending"
    rig_console_exit vm 90 || status=$?
    echo "vmlab_status=$status"
}
"#;

fn l1() -> &'static rig::Run {
    static RUN: OnceLock<rig::Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        let elf = triple_fault_elf();
        rig::Batch::new("e2e_boot")
            .scenario(
                "vmlinux_smp_poweroff",
                minutes(5),
                &format!("{SHELL_SESSION}\nsession \"$VMLAB_VMLINUX\" 2 poweroff"),
            )
            .scenario(
                "bzimage_reboot",
                minutes(5),
                &format!("{SHELL_SESSION}\nsession \"$VMLAB_BZIMAGE\" 1 reboot"),
            )
            .scenario(
                "panic",
                minutes(4),
                r#"
                status=0
                "$VMLAB" run --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" --mem 256M \
                    --cmdline "rdinit=/bin/false" </dev/null >"$RIG_OUT/panic.console" 2>&1 || status=$?
                echo "vmlab_status=$status"
                "#,
            )
            .scenario(
                "triple_fault",
                minutes(2),
                &format!(
                    r#"
                status=0
                "$VMLAB" run --kernel {} </dev/null >"$RIG_OUT/fault.console" 2>&1 || status=$?
                echo "vmlab_status=$status"
                "#,
                    elf.display()
                ),
            )
            .run()
    })
}

fn console(scenario: &rig::Scenario, file: &str) -> String {
    scenario.file(file).replace('\r', "")
}

#[test]
fn l1_runs_the_batch() {
    l1().assert_l1_ok();
}

#[test]
fn command_line_is_vmlabs_own_plus_the_users() {
    let s = l1().scenario("vmlinux_smp_poweroff").assert_success();
    let out = console(s, "vm.console");
    let line = out
        .lines()
        .find(|l| l.starts_with("cmdline="))
        .unwrap_or_else(|| panic!("no cmdline line\n{}", s.diagnostics()));
    assert!(line.contains("console=ttyS0"), "{line}");
    assert!(
        line.ends_with("vmlab.e2e=poweroff"),
        "user part last: {line}"
    );
}

#[test]
fn two_vcpus_give_nproc_two() {
    let s = l1().scenario("vmlinux_smp_poweroff").assert_success();
    assert!(
        console(s, "vm.console").contains("\nnproc=2"),
        "{}",
        s.diagnostics()
    );
}

#[test]
fn typed_input_reaches_the_guest_shell() {
    let s = l1().scenario("vmlinux_smp_poweroff").assert_success();
    assert!(
        console(s, "vm.console").contains("\ntyped-42"),
        "{}",
        s.diagnostics()
    );
}

#[test]
fn virtio_rng_feeds_the_guest() {
    let s = l1().scenario("vmlinux_smp_poweroff").assert_success();
    let out = console(s, "vm.console");
    let line = out
        .lines()
        .find(|l| l.starts_with("rng="))
        .unwrap_or_else(|| panic!("no rng line\n{}", s.diagnostics()));
    let mut fields = line.trim_start_matches("rng=").split_whitespace();
    assert!(
        fields.next().unwrap_or("").starts_with("virtio_rng"),
        "{line}"
    );
    let bytes = fields.next().unwrap_or("");
    assert_eq!(bytes.len(), 16, "8 bytes read from /dev/hwrng: {line}");
}

#[test]
fn poweroff_ends_vmlab_with_status_zero() {
    let s = l1().scenario("vmlinux_smp_poweroff").assert_success();
    assert_eq!(s.value("vmlab_status"), "0", "{}", s.diagnostics());
    assert!(
        console(s, "vm.console").contains("vmlab: guest powered off"),
        "{}",
        s.diagnostics()
    );
}

#[test]
fn boot_timer_reports_entry_and_userspace() {
    let s = l1().scenario("vmlinux_smp_poweroff").assert_success();
    let out = console(s, "vm.console");
    let line = out
        .lines()
        .find(|l| l.starts_with("vmlab: boot timer:"))
        .unwrap_or_else(|| panic!("no boot timer line\n{}", s.diagnostics()));
    assert!(line.contains("first vCPU entry"), "{line}");
    assert!(line.contains("userspace started"), "{line}");
    assert!(
        out.contains("vmlab: memory: peak RSS"),
        "{}",
        s.diagnostics()
    );
}

#[test]
fn bzimage_boots_and_reboot_ends_vmlab_with_status_zero() {
    let s = l1().scenario("bzimage_reboot").assert_success();
    let out = console(s, "vm.console");
    assert!(out.contains("\nnproc=1"), "{}", s.diagnostics());
    assert!(out.contains("\ntyped-42"), "{}", s.diagnostics());
    assert_eq!(s.value("vmlab_status"), "0", "{}", s.diagnostics());
    assert!(out.contains("vmlab: guest rebooted"), "{}", s.diagnostics());
}

#[test]
fn guest_panic_ends_vmlab_with_an_error() {
    let s = l1().scenario("panic").assert_success();
    assert_eq!(s.value("vmlab_status"), "2", "{}", s.diagnostics());
    let out = console(s, "panic.console");
    assert!(out.contains("Kernel panic"), "{out}");
    assert!(out.contains("vmlab: guest kernel panicked"), "{out}");
}

#[test]
fn triple_fault_ends_vmlab_with_an_error_and_registers() {
    let s = l1().scenario("triple_fault").assert_success();
    assert_eq!(s.value("vmlab_status"), "2", "{}", s.diagnostics());
    let out = console(s, "fault.console");
    assert!(out.contains("vCPU 0 triple-faulted"), "{out}");
    // AMD's KVM resets the vCPU before userspace sees the exit, so the
    // dump may show the reset vector instead of the faulting ud2.
    assert!(
        out.contains("registers: rip=0x100000") || out.contains("faulting state is lost"),
        "{out}"
    );
}
