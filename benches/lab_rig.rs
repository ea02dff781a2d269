//! VM to VM TCP through a lab network's switch, in the emulated-SVM rig:
//! `cargo bench --bench lab_rig`.
//!
//! One L1 boot, four pairs of busybox guests on the same kernel and
//! initramfs, one after the other:
//!
//! - two vmlab VMs on a lab network (virtio-net header carried across the
//!   switch: TSO segments cross it whole);
//! - a vmlab VM and a QEMU microvm guest joined by `-netdev stream` (the
//!   switch cuts the vmlab side's TSO segments for QEMU);
//! - two QEMU guests joined to the same lab network by `-netdev stream`;
//! - two QEMU guests on QEMU's own `-netdev socket` pair (listen/connect),
//!   no switch at all: the peer people know.
//!
//! In each pair the first guest sends 8 MiB of random data with busybox
//! `nc` to a listener on the second, which checksums it; L1 times the
//! transfer from the command to its completion line on the console (console
//! names are unique in a scenario, hence a, b, c, qb, ...). L1
//! runs under TCG, so only ratios within one run mean anything; figures
//! are reported, never asserted.

#[path = "../tests/rig/mod.rs"]
mod rig;

use std::time::Duration;

const SCENARIO: &str = r#"
rig_at_exit '"$VMLAB" stop --timeout 5 a b c >/dev/null 2>&1'
"$VMLAB" network create lab --subnet 192.168.100.0/24 >/dev/null
qsock=$("$VMLAB" network show lab | sed -n 's/^qemu socket: //p')
echo "qsock=$qsock"

qemu_guest() { # NAME MAC NETDEV...
    local name=$1 mac=$2
    shift 2
    rig_console_start "$name" qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 1 -m 256M \
        -nodefaults -no-user-config -display none -no-reboot \
        -chardev stdio,id=con,signal=off -serial chardev:con \
        -netdev "$@" -device "virtio-net-device,netdev=n0,mac=$mac" \
        -kernel "$VMLAB_VMLINUX" -initrd "$VMLAB_INITRAMFS" \
        -append "console=ttyS0 8250.nr_uarts=1 pci=off"
}
vmlab_guest() { # NAME MAC
    rig_console_start "$1" "$VMLAB" run --name "$1" --kernel "$VMLAB_VMLINUX" \
        --initrd "$VMLAB_INITRAMFS" --mem 256M --net lab --mac "$2"
}
# ready NAME [ADDR]: waits for the shell, then for a lease (or sets ADDR).
ready() {
    rig_console_wait "$1" 'root@.*# ' 300 || return 1
    if [ -n "${2:-}" ]; then
        rig_console_send "$1" "killall udhcpc 2>/dev/null; ip addr flush dev eth0; ip addr add $2/24 dev eth0 && ip link set eth0 up && echo \"$1_addr=$2\""
    else
        rig_console_send "$1" 'for i in $(seq 30); do ip route | grep -q default && break; sleep 1; done; echo "'"$1"'_addr=$(ip -4 -o addr show eth0 | awk "{print \$4}" | cut -d/ -f1)"'
    fi
    rig_console_wait "$1" "^$1_addr=[0-9]" 60
}
addr_of() { grep -a -o "^$1_addr=[0-9.]*" "$RIG_OUT/$1.console" | tail -n 1 | cut -d= -f2; }
# transfer PAIR SENDER RECEIVER: 8 MiB SENDER -> RECEIVER, timed on L1.
transfer() {
    local pair=$1 tx=$2 rx=$3 dst t0 t1
    dst=$(addr_of "$rx")
    rig_console_send "$rx" "echo \"${pair}_rx_sha=\$(nc -l -p 9000 | sha256sum | cut -d' ' -f1)\""
    rig_console_send "$tx" "head -c $SIZE /dev/urandom >/tmp/blob && echo \"${pair}_tx_sha=\$(sha256sum /tmp/blob | cut -d' ' -f1)\""
    rig_console_wait "$tx" "^${pair}_tx_sha=[0-9a-f]{64}" 300 || return 1
    sleep 1
    t0=$(rig_ms)
    rig_console_send "$tx" "nc $dst 9000 </tmp/blob; echo ${pair}_sent=\$?"
    rig_console_wait "$rx" "^${pair}_rx_sha=" 900 || return 1
    t1=$(rig_ms)
    rig_console_wait "$tx" "^${pair}_sent=" 60 || true
    echo "${pair}_ms=$((t1 - t0))"
    grep -a -h -o -E "^${pair}_(tx|rx)_sha=[0-9a-f]{64}" "$RIG_OUT/$tx.console" "$RIG_OUT/$rx.console" | tail -n 2
}
finish() { # NAME...
    for n in "$@"; do rig_console_send "$n" poweroff; done
    for n in "$@"; do rig_console_exit "$n" 120 || true; done
}

vmlab_guest a 52:54:00:0b:00:01; vmlab_guest b 52:54:00:0b:00:02
ready a && ready b && transfer vmlab_vmlab a b
finish a b

vmlab_guest c 52:54:00:0b:00:03; qemu_guest qb 52:54:00:0b:00:12 "stream,id=n0,server=off,addr.type=unix,addr.path=$qsock"
ready c && ready qb && transfer vmlab_qemu c qb
finish qb

# c stays, idle: the network's process (and its QEMU socket) lives as long
# as a vmlab member does.
qemu_guest qc 52:54:00:0b:00:21 "stream,id=n0,server=off,addr.type=unix,addr.path=$qsock"
qemu_guest qd 52:54:00:0b:00:22 "stream,id=n0,server=off,addr.type=unix,addr.path=$qsock"
ready qc && ready qd && transfer qemu_stream qc qd
finish qc qd c

qemu_guest qe 52:54:00:0b:00:31 "socket,id=n0,listen=127.0.0.1:5555"
sleep 1
qemu_guest qf 52:54:00:0b:00:32 "socket,id=n0,connect=127.0.0.1:5555"
ready qe 10.9.0.1 && ready qf 10.9.0.2 && transfer qemu_socket qe qf
finish qe qf
"#;

/// Bytes each pair moves (the scenario's `$SIZE`).
const SIZE: usize = 8 << 20;

/// The pairs, in the order the scenario runs them, with their labels.
const PAIRS: [(&str, &str); 4] = [
    ("vmlab_vmlab", "vmlab ↔ vmlab, lab network"),
    ("vmlab_qemu", "vmlab → QEMU (stream), lab network"),
    ("qemu_stream", "QEMU ↔ QEMU (stream), lab network"),
    ("qemu_socket", "QEMU ↔ QEMU, -netdev socket pair"),
];

fn main() {
    let run = rig::Batch::new("bench_lab")
        .env("SIZE", &SIZE.to_string())
        .scenario("pairs", Duration::from_secs(40 * 60), SCENARIO)
        .run();
    let s = run.scenario("pairs").assert_success();
    // A pair that failed leaves no line: it is reported, not a panic.
    let value = |key: &str| s.get(key).unwrap_or("");
    let size_mb = SIZE as f64 / 1e6;
    let mbps = |pair: &str| -> Option<f64> {
        let ms: f64 = value(&format!("{pair}_ms")).parse().ok()?;
        Some(size_mb / (ms / 1e3))
    };
    let base = mbps("vmlab_vmlab");
    println!("bench: VM to VM TCP, 8 MiB by busybox nc (MB/s; L1 under TCG: compare ratios only)");
    println!(
        "bench: {:<38} {:>8} {:>16}  checksum",
        "pair", "MB/s", "vmlab↔vmlab over"
    );
    for (pair, label) in PAIRS {
        let (tx, rx) = (
            value(&format!("{pair}_tx_sha")),
            value(&format!("{pair}_rx_sha")),
        );
        let check = if !tx.is_empty() && tx == rx {
            "match"
        } else {
            "MISMATCH OR MISSING"
        };
        match mbps(pair) {
            Some(v) => println!(
                "bench: {label:<38} {v:>8.2} {:>15.2}×  {check}",
                base.map_or(f64::NAN, |b| b / v)
            ),
            None => println!("bench: {label:<38} {:>8} {:>16}  {check}", "failed", "-"),
        }
    }
    println!("bench: reported, not asserted");
}
