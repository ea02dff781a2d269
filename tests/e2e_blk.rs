//! virtio-blk end to end, in the emulated-SVM rig (tests/rig): one L1 boot
//! runs every scenario. The guest (the project's kernel and default
//! initramfs, driven on its console) writes a pattern to a qcow2 overlay
//! over a raw base, reads a second disk, is refused writes on a read-only
//! one and discards; afterwards L1's qemu-img checks and reads the images.
//! A VM killed with SIGKILL while the guest writes and flushes in a loop
//! must leave a clean qcow2 holding every flushed block. Last, the guest's
//! sequential direct-I/O throughput on vmlab and on QEMU microvm, same
//! image, same run: reported, not asserted.

mod rig;

use std::sync::OnceLock;
use std::time::Duration;

/// Boots the default guest with extra vmlab arguments and waits for its
/// shell; `g CMD ERE [SECS]` types a command and waits for its answer.
const GUEST: &str = r#"
cd "$RIG_TMP"
VM=vm
boot_vm() {
    local name=$1
    shift
    rig_console_start "$name" "$VMLAB" run --kernel "${KERNEL:-$VMLAB_VMLINUX}" \
        --initrd "$VMLAB_INITRAMFS" --mem 256M --cmdline quiet "$@"
    rig_console_wait "$name" 'root@vmlab:.*# ' 600
}
g() { rig_console_send "$VM" "$1"; rig_console_wait "$VM" "$2" "${3:-90}"; }
# A pattern of N bytes, repeated TEXT lines (yes is cut off by head).
pattern() { { yes "$1" || true; } | head -c "$2"; }
md5() { md5sum | cut -c1-32; }
"#;

const DISKS: &str = r#"
truncate -s 16M base.raw
printf 'BASE-BLOCK-0' | dd of=base.raw conv=notrunc status=none
printf 'BASE-AT-8M' | dd of=base.raw bs=1M seek=8 conv=notrunc status=none
base_md5=$(md5 <base.raw)
qemu-img create -q -f qcow2 -b base.raw -F raw overlay.qcow2
truncate -s 8M second.raw
printf 'SECOND-DISK' | dd of=second.raw conv=notrunc status=none
pattern x 1048576 | dd of=second.raw bs=1M seek=1 conv=notrunc status=none
truncate -s 4M ro.raw
printf 'READ-ONLY' | dd of=ro.raw conv=notrunc status=none
ro_md5=$(md5 <ro.raw)

boot_vm vm --disk overlay.qcow2 --disk second.raw --disk ro.raw,ro
g 'echo "disks=$(ls /sys/block | grep vd | tr "\n" " ")"' '^disks='
g 'echo "serials=$(cat /sys/block/vda/serial),$(cat /sys/block/vdb/serial),$(cat /sys/block/vdc/serial)"' '^serials='
g 'echo "heads=$(head -c 12 /dev/vda),$(head -c 11 /dev/vdb),$(head -c 9 /dev/vdc)"' '^heads='
g 'echo "readonly=$(blockdev --getro /dev/vda),$(blockdev --getro /dev/vdc)"' '^readonly='
g 'dd if=/dev/zero of=/dev/vdc bs=4096 count=1 oflag=direct; echo "ro_write_status=$?"' '^ro_write_status='
g 'yes vmlab-pattern-0123456789 | head -c 1048576 >/tmp/pat; dd if=/tmp/pat of=/dev/vda bs=65536 seek=16 oflag=direct; sync; echo "written=$(md5sum </tmp/pat | cut -c1-32)"' '^written=' 180
g 'echo "read_back=$(dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | md5sum | cut -c1-32)"' '^read_back=' 180
g 'blkdiscard -o 1048576 -l 1048576 /dev/vdb; echo "discard=$? nonzero_after=$(dd if=/dev/vdb bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | tr -d "\0" | wc -c)"' '^discard=' 120
rig_console_send vm poweroff
status=0
rig_console_exit vm 120 || status=$?
echo "vmlab_status=$status"
tr -d '\r' <"$RIG_OUT/vm.console" | grep -E '^(disks|serials|heads|readonly|ro_write_status|written|read_back|discard)=' || true
tr -d '\r' <"$RIG_OUT/vm.console" | grep -E '^dd: ' | head -n 3 | sed 's/^/ro_error: /' || true

check=0
qemu-img check overlay.qcow2 >"$RIG_OUT/check.txt" 2>&1 || check=$?
echo "qemu_img_check=$check"
qemu-img convert -O raw overlay.qcow2 flat.raw
echo "host_pattern=$(dd if=flat.raw bs=65536 skip=16 count=16 status=none | md5)"
echo "expected_pattern=$(pattern vmlab-pattern-0123456789 1048576 | md5)"
echo "host_base=$(head -c 12 flat.raw),$(dd if=flat.raw bs=1 skip=$((8 << 20)) count=10 status=none)"
echo "base_unchanged=$([ "$(md5 <base.raw)" = "$base_md5" ] && echo yes || echo no)"
echo "ro_unchanged=$([ "$(md5 <ro.raw)" = "$ro_md5" ] && echo yes || echo no)"
"#;

/// The guest writes block n (4 KiB of "blk-n" lines, one cluster apart),
/// flushes it (O_DIRECT + fsync: a FLUSH request) and prints flushed=n;
/// L1 kills vmlab with SIGKILL in the middle of that loop.
const KILL9: &str = r#"
truncate -s 64M base.raw
qemu-img create -q -f qcow2 -b base.raw -F raw crash.qcow2
boot_vm vm --disk crash.qcow2
rig_console_send vm 'n=0; while :; do yes "blk-$n" | head -c 4096 | dd of=/dev/vda bs=4096 seek=$((n*17)) count=1 iflag=fullblock oflag=direct conv=fsync 2>/dev/null && echo "flushed=$n"; n=$((n+1)); done'
rig_console_wait vm '^flushed=40' 600
kill -KILL "${RIG_CONSOLE_PID[vm]}"
status=0
rig_console_exit vm 30 || status=$?
echo "vmlab_status=$status"
last=$(tr -d '\r' <"$RIG_OUT/vm.console" | grep -E '^flushed=[0-9]+$' | tail -n1 | cut -d= -f2)
echo "flushed_last=$last"
check=0
qemu-img check crash.qcow2 >"$RIG_OUT/check.txt" 2>&1 || check=$?
echo "qemu_img_check=$check"
qemu-img convert -O raw crash.qcow2 crash.raw
missing=
for n in $(seq 0 "$last"); do
    pattern "blk-$n" 4096 >expected
    dd if=crash.raw bs=4096 skip=$((n * 17)) count=1 status=none | cmp -s - expected || missing+=" $n"
done
echo "missing_blocks=${missing:-none}"
"#;

/// Sequential direct I/O in the guest with busybox dd (it has
/// iflag/oflag=direct but prints no rate: busybox `time -f %e` times it in
/// the guest, and L1 times the command on its own clock too, which does not
/// depend on each guest's clocksource), 128 MiB at a time, twice each, on
/// vmlab and then on QEMU microvm with virtio-blk-device on the same raw
/// image, written out beforehand so neither pays for allocating it.
const BENCH: &str = r#"
dd if=/dev/zero of=bench.raw bs=1M count=256 status=none
KERNEL=$VMLAB_BZIMAGE
measure() {
    local round t0
    VM=$1
    for round in 1 2; do
        t0=$(rig_ms)
        g 'time -f "w=%e" dd if=/dev/zero of=/dev/vda bs=1M count=128 oflag=direct 2>&1 | grep "^w="' '^w=' 300
        echo "$1_l1_w=$(( $(rig_ms) - t0 ))"
        t0=$(rig_ms)
        g 'time -f "r=%e" dd if=/dev/vda of=/dev/null bs=1M count=128 iflag=direct 2>&1 | grep "^r="' '^r=' 300
        echo "$1_l1_r=$(( $(rig_ms) - t0 ))"
    done
    rig_console_send "$1" poweroff
    rig_console_exit "$1" 120
    tr -d '\r' <"$RIG_OUT/$1.console" | grep -E '^[wr]=' | sed "s/^/$1_/"
}
boot_vm vmlab --disk bench.raw
measure vmlab
rig_console_start qemu qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 1 -m 256M \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=con,signal=off -serial chardev:con \
    -kernel "$VMLAB_BZIMAGE" -initrd "$VMLAB_INITRAMFS" \
    -append "console=ttyS0 8250.nr_uarts=1 pci=off quiet" \
    -drive file=bench.raw,format=raw,if=none,id=d0 -device virtio-blk-device,drive=d0
rig_console_wait qemu 'root@vmlab:.*# ' 600
measure qemu
"#;

fn l1() -> &'static rig::Run {
    static RUN: OnceLock<rig::Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let minutes = |m: u64| Duration::from_secs(60 * m);
        rig::Batch::new("e2e_blk")
            .scenario("disks", minutes(15), &format!("{GUEST}{DISKS}"))
            .scenario("kill9", minutes(20), &format!("{GUEST}{KILL9}"))
            .scenario("bench", minutes(25), &format!("{GUEST}{BENCH}"))
            .run()
    })
}

fn disks() -> &'static rig::Scenario {
    l1().scenario("disks").assert_success()
}

#[test]
fn l1_runs_the_batch() {
    l1().assert_l1_ok();
}

#[test]
fn disks_appear_as_vda_vdb_vdc_in_order_with_their_serials() {
    let s = disks();
    assert_eq!(s.value("disks"), "vda vdb vdc", "{}", s.diagnostics());
    assert_eq!(
        s.value("serials"),
        "overlay.qcow2,second.raw,ro.raw",
        "{}",
        s.diagnostics()
    );
}

#[test]
fn two_disks_show_their_own_contents() {
    let s = disks();
    assert_eq!(
        s.value("heads"),
        "BASE-BLOCK-0,SECOND-DISK,READ-ONLY",
        "the overlay reads through to its base; each disk is its own image\n{}",
        s.diagnostics()
    );
}

#[test]
fn pattern_written_through_the_overlay_reads_back_and_survives() {
    let s = disks();
    let expected = s.value("expected_pattern");
    assert_eq!(s.value("written"), expected, "{}", s.diagnostics());
    assert_eq!(s.value("read_back"), expected, "{}", s.diagnostics());
    assert_eq!(
        s.value("host_pattern"),
        expected,
        "qemu-img convert of the overlay\n{}",
        s.diagnostics()
    );
    assert_eq!(s.value("host_base"), "BASE-BLOCK-0,BASE-AT-8M");
    assert_eq!(s.value("base_unchanged"), "yes", "{}", s.diagnostics());
    assert_eq!(s.value("vmlab_status"), "0", "{}", s.diagnostics());
}

/// `qemu-img check` of the scenario's image found nothing wrong.
fn assert_image_clean(s: &rig::Scenario) {
    assert_eq!(
        s.value("qemu_img_check"),
        "0",
        "{}\n{}",
        s.file("check.txt"),
        s.diagnostics()
    );
}

#[test]
fn overlay_passes_qemu_img_check() {
    assert_image_clean(disks());
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    let s = disks();
    assert_eq!(
        s.value("readonly"),
        "0,1",
        "vdc is read-only to the guest\n{}",
        s.diagnostics()
    );
    assert_ne!(s.value("ro_write_status"), "0", "{}", s.diagnostics());
    let errors: Vec<&str> = s
        .output
        .lines()
        .filter(|l| l.starts_with("ro_error: "))
        .collect();
    // Linux refuses writes to a read-only disk itself (EPERM since 5.x,
    // EROFS before); a write that reached the device would get EIO.
    assert!(
        errors.iter().any(|l| l.contains("Operation not permitted")
            || l.contains("Read-only file system")
            || l.contains("I/O error")),
        "the guest's write fails: {errors:?}\n{}",
        s.diagnostics()
    );
    assert_eq!(s.value("ro_unchanged"), "yes", "{}", s.diagnostics());
}

#[test]
fn discarded_range_reads_as_zeroes() {
    let s = disks();
    assert_eq!(
        s.value("discard"),
        "0 nonzero_after=0",
        "{}",
        s.diagnostics()
    );
}

#[test]
fn kill_9_while_flushing_leaves_a_clean_image_with_every_flushed_block() {
    let s = l1().scenario("kill9").assert_success();
    assert_eq!(
        s.value("vmlab_status"),
        "137",
        "vmlab was killed\n{}",
        s.diagnostics()
    );
    let last: u32 = s
        .value("flushed_last")
        .parse()
        .unwrap_or_else(|_| panic!("no flushed block\n{}", s.diagnostics()));
    assert!(last >= 40, "{}", s.diagnostics());
    assert_image_clean(s);
    assert_eq!(s.value("missing_blocks"), "none", "{}", s.diagnostics());
}

/// Bytes each timed dd moves.
const BENCH_MIB: f64 = 128.0;

/// A transfer of `BENCH_MIB` that took `seconds`, as MiB/s.
fn mib_per_s(seconds: f64) -> Option<f64> {
    (seconds > 0.0).then(|| BENCH_MIB / seconds)
}

/// Best of the rounds of `key` in the scenario's output, as MiB/s: e.g.
/// vmlab_w (seconds, busybox `time -f %e`) or vmlab_l1_w (milliseconds).
fn best(s: &rig::Scenario, key: &str) -> f64 {
    let prefix = format!("{key}=");
    let unit = if key.contains("_l1_") { 1e-3 } else { 1.0 };
    let rates: Vec<f64> = s
        .output
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .filter_map(|v| mib_per_s(v * unit))
        .collect();
    assert!(
        !rates.is_empty(),
        "no {key} measurement\n{}",
        s.diagnostics()
    );
    rates.into_iter().fold(0.0, f64::max)
}

/// Reports the figures (run with --nocapture to see them); asserts only
/// that both VMMs were measured.
#[test]
fn sequential_direct_io_throughput_vs_qemu_microvm() {
    let s = l1().scenario("bench").assert_success();
    let mut table = String::from(
        "virtio-blk sequential direct I/O in the rig (128 MiB, bs=1M, best of 2; MiB/s):\n",
    );
    for (what, op) in [
        ("write, guest clock", "w"),
        ("read, guest clock", "r"),
        ("write, L1 clock", "l1_w"),
        ("read, L1 clock", "l1_r"),
    ] {
        let vmlab = best(s, &format!("vmlab_{op}"));
        let qemu = best(s, &format!("qemu_{op}"));
        table.push_str(&format!(
            "  {what:18}  vmlab {vmlab:8.1}  qemu-microvm {qemu:8.1}  ratio vmlab/qemu {:.2}\n",
            vmlab / qemu
        ));
    }
    eprintln!("{table}");
}

#[test]
fn timings_become_rates() {
    assert_eq!(mib_per_s(0.5), Some(256.0));
    assert_eq!(mib_per_s(0.0), None, "too fast to time");
}
