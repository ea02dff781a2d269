//! Self-test of the emulated-SVM rig (tests/rig): one L1 boot checks that L1
//! offers a hardware-style /dev/kvm and that nested QEMU (microvm, KVM,
//! `-cpu host`) boots vmlab's guest kernel, as vmlinux and as bzImage, with
//! the default initramfs to its boot-timer write and to a working shell.
//! That L1 runs Debian's packaged kernel, its KVM, 9p and virtio-pci loaded
//! as modules from L1's initramfs: what `tests/rig/l1` boots for a new user
//! who has not built vmlab's lean kernel (every other batch's L1 runs the
//! lean one).

mod rig;

use std::sync::OnceLock;
use std::time::Duration;

/// Boots the default guest under nested QEMU microvm with 2 vCPUs, times the
/// boot-timer byte on port 0xe9 (via isa-debugcon into a fifo), asks the
/// shell for nproc, powers it off. Prints KEY=VALUE lines for the test.
const BOOT_GUEST: &str = r#"
boot_guest() {
    local kernel=$1 start byte e9
    mkfifo "$RIG_TMP/e9"
    exec {e9}<>"$RIG_TMP/e9"
    start=$(rig_ms)
    rig_console_start guest qemu-system-x86_64 -M microvm -enable-kvm -cpu host \
        -smp 2 -m 256M -nodefaults -no-user-config -display none -no-reboot \
        -chardev stdio,id=con -serial chardev:con \
        -chardev file,id=e9,path="$RIG_TMP/e9" -device isa-debugcon,iobase=0xe9,chardev=e9 \
        -kernel "$kernel" -initrd "$VMLAB_INITRAMFS" -append "console=ttyS0 quiet"
    if ! read -r -N1 -t 240 -u "$e9" byte; then
        echo "no boot-timer write on port 0xe9 within 240 s"
        rig_console_tail guest
        return 1
    fi
    echo "boot_timer_byte=$byte"
    echo "boot_timer_ms=$(($(rig_ms) - start))"
    rig_console_wait guest 'root@vmlab:.*# ' 120
    echo "prompt_ms=$(($(rig_ms) - start))"
    rig_console_send guest 'echo "nproc=$(nproc)"'
    rig_console_wait guest '^nproc=[0-9]' 30
    rig_console_send guest poweroff
    rig_console_exit guest 60
    echo "exit_ms=$(($(rig_ms) - start))"
}
"#;

fn l1() -> &'static rig::Run {
    static RUN: OnceLock<rig::Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let minutes = Duration::from_secs(60);
        rig::Batch::new("e2e_rig")
            .l1_kernel(rig::L1Kernel::Debian)
            .scenario(
                "kvm",
                minutes,
                r#"
                test -c /dev/kvm
                yes_no() { if "$@"; then echo yes; else echo no; fi; }
                echo "svm=$(yes_no grep -qw svm /proc/cpuinfo)"
                echo "kvm_amd=$(yes_no test -d /sys/module/kvm_amd)"
                echo "kvm_pvm=$(yes_no test -d /sys/module/kvm_pvm)"
                echo "l1_release=$(uname -r)"
                echo "nproc=$(nproc)"
                # Warm L1's 9p page cache, so the boots below time QEMU, not 9p.
                qemu-system-x86_64 --version >/dev/null
                "#,
            )
            .scenario(
                "qemu_vmlinux",
                5 * minutes,
                &format!("{BOOT_GUEST}\nboot_guest \"$VMLAB_VMLINUX\""),
            )
            .scenario(
                "qemu_bzimage",
                5 * minutes,
                &format!("{BOOT_GUEST}\nboot_guest \"$VMLAB_BZIMAGE\""),
            )
            .run()
    })
}

/// A batch whose L1 "freezes" in its second scenario (it stops the
/// timeout(1) that would end the scenario, as a frozen L1 kernel would fail
/// to), to check that the host notices, boots a new L1 and runs only what
/// the first one did not finish. A host directory counts the runs.
fn freezing() -> &'static (rig::Run, tempfile::TempDir) {
    static RUN: OnceLock<(rig::Run, tempfile::TempDir)> = OnceLock::new();
    RUN.get_or_init(|| {
        let marks = tempfile::tempdir().expect("temporary directory");
        let dir = marks.path().display().to_string();
        let run = rig::Batch::new("e2e_rig_freeze")
            .writable(marks.path())
            .env("MARKS", &dir)
            .scenario(
                "before",
                Duration::from_secs(30),
                r#"echo ran >>"$MARKS/before""#,
            )
            .scenario(
                "freeze",
                Duration::from_secs(5),
                r#"
                echo ran >>"$MARKS/freeze"
                if [ "$(wc -l <"$MARKS/freeze")" -eq 1 ]; then
                    kill -STOP "$PPID"   # timeout(1): nobody ends this scenario now
                    sleep 600
                fi
                echo second_l1=yes
                "#,
            )
            .scenario(
                "after",
                Duration::from_secs(30),
                r#"echo ran >>"$MARKS/after""#,
            )
            .run();
        (run, marks)
    })
}

#[test]
fn a_frozen_l1_is_replaced_and_only_unfinished_scenarios_run_again() {
    let (run, marks) = freezing();
    let report = run.assert_l1_ok();
    assert_eq!(report.l1_boots, 2, "{}", report.console);
    let runs = |name: &str| {
        std::fs::read_to_string(marks.path().join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(runs("before"), 1, "a finished scenario ran again");
    assert_eq!(runs("freeze"), 2);
    assert_eq!(runs("after"), 1);
    let s = run.scenario("freeze").assert_success();
    assert_eq!(s.value("second_l1"), "yes", "{}", s.diagnostics());
    run.scenario("before").assert_success();
    run.scenario("after").assert_success();
}

#[test]
fn l1_boots_runs_its_batch_and_powers_off() {
    let report = l1().assert_l1_ok();
    println!(
        "rig: L1 reached init after {:?}; whole L1 run {:?}",
        report.l1_init.expect("L1 init marker seen"),
        report.total
    );
}

#[test]
fn l1_offers_hardware_style_kvm() {
    let s = l1().scenario("kvm").assert_success();
    assert_eq!(
        s.value("svm"),
        "yes",
        "L1's CPU lacks SVM\n{}",
        s.diagnostics()
    );
    assert_eq!(
        s.value("kvm_amd"),
        "yes",
        "L1's KVM is not kvm_amd\n{}",
        s.diagnostics()
    );
    assert_eq!(
        s.value("kvm_pvm"),
        "no",
        "L1's KVM is PVM\n{}",
        s.diagnostics()
    );
    assert!(
        s.value("l1_release").ends_with("-amd64"),
        "L1 runs Debian's packaged kernel\n{}",
        s.diagnostics()
    );
}

fn check_nested_boot(name: &str) {
    let s = l1().scenario(name).assert_success();
    assert_eq!(s.value("boot_timer_byte"), "U", "{}", s.diagnostics());
    let console = s.file("guest.console");
    assert!(
        console.lines().any(|l| l.trim_end() == "nproc=2"),
        "the guest shell did not answer nproc=2\n{}",
        s.diagnostics()
    );
    assert!(
        console.contains("reboot: Power down"),
        "the guest did not power off\n{}",
        s.diagnostics()
    );
    println!(
        "rig: {name}: boot-timer write after {:?}, shell prompt after {:?}, QEMU exit after {:?}",
        s.millis("boot_timer_ms"),
        s.millis("prompt_ms"),
        s.millis("exit_ms")
    );
}

#[test]
fn nested_qemu_boots_the_guest_vmlinux() {
    check_nested_boot("qemu_vmlinux");
}

#[test]
fn nested_qemu_boots_the_guest_bzimage() {
    check_nested_boot("qemu_bzimage");
}
