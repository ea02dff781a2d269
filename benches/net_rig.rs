//! TCP throughput through the guest's NAT, vmlab against QEMU's `-netdev
//! user` (libslirp), in the emulated-SVM rig: `cargo bench --bench net_rig`.
//!
//! One L1 boot runs both VMMs one after the other with the same kernel and
//! initramfs (QEMU: `-M microvm`, `virtio-net-device`). In each guest busybox
//! `nc` sends a 16 MiB random file to a sink on L1's loopback through
//! 10.0.2.2 (guest → L1), then reads 16 MiB from a source there (L1 →
//! guest); both ends checksum the stream. The L1 side (python3) times each
//! transfer from its first byte to the end. L1 runs under TCG, so only the
//! ratio vmlab/QEMU means anything; figures are reported, never asserted.

#[path = "../tests/rig/mod.rs"]
mod rig;

use std::time::Duration;

/// python3 on L1: `sink PORT` reads one connection to EOF, `source PORT N`
/// writes N random bytes and waits for the peer to close; both print
/// `MODE bytes=N sha=HEX secs=S mbps=M`.
const ENDPOINT: &str = r#"
import hashlib, os, socket, sys, time
mode, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(1)
open(sys.argv[4], "w").close()
c, _ = s.accept()
h = hashlib.sha256()
n = 0
if mode == "sink":
    b = c.recv(1 << 20)
    t0 = time.monotonic()
    while b:
        h.update(b)
        n += len(b)
        b = c.recv(1 << 20)
else:
    block = os.urandom(1 << 20)
    t0 = time.monotonic()
    while n < size:
        chunk = block[: min(len(block), size - n)]
        c.sendall(chunk)
        h.update(chunk)
        n += len(chunk)
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
dt = time.monotonic() - t0
print(f"{mode} bytes={n} sha={h.hexdigest()} secs={dt:.3f} mbps={n / dt / 1e6:.2f}", flush=True)
"#;

const SCENARIO: &str = r#"
size=$((16 * 1024 * 1024))
printf '%s\n' "$ENDPOINT" >"$RIG_TMP/endpoint.py"

# measure NAME CMD...: boots CMD's guest, runs both transfers, prints
# NAME_{up,down}_{mbps,ok}=...
measure() {
    local name=$1 up down
    shift
    rm -f "$RIG_TMP"/*.ready
    python3 "$RIG_TMP/endpoint.py" sink 9001 0 "$RIG_TMP/up.ready" >"$RIG_OUT/$name.up" &
    up=$!
    python3 "$RIG_TMP/endpoint.py" source 9002 "$size" "$RIG_TMP/down.ready" >"$RIG_OUT/$name.down" &
    down=$!
    for _ in $(seq 100); do
        [ -e "$RIG_TMP/up.ready" ] && [ -e "$RIG_TMP/down.ready" ] && break
        sleep 0.1
    done
    rig_console_start "$name" "$@"
    rig_console_wait "$name" 'root@.*# ' 300
    # The lease may land just after the prompt (udhcpc backgrounds itself).
    rig_console_send "$name" 'for i in 1 2 3 4 5 6 7 8 9 10; do ip route | grep -q default && break; sleep 1; done; echo "net_ready=$i"'
    rig_console_wait "$name" '^net_ready=' 60
    rig_console_send "$name" "head -c $size /dev/urandom >/tmp/up && echo \"up_sha=\$(sha256sum /tmp/up | cut -d' ' -f1)\""
    rig_console_wait "$name" '^up_sha=[0-9a-f]{64}' 300
    rig_console_send "$name" 'nc 10.0.2.2 9001 </tmp/up; echo "up_done=$?"'
    rig_console_wait "$name" '^up_done=' 900
    rig_console_send "$name" 'echo "down_sha=$(nc 10.0.2.2 9002 | sha256sum | cut -d" " -f1)"'
    rig_console_wait "$name" '^down_sha=' 900
    rig_console_send "$name" poweroff
    rig_console_exit "$name" 120 || true
    wait "$up" "$down" || true
    local guest_up guest_down
    guest_up=$(grep -a '^up_sha=' "$RIG_OUT/$name.console" | tail -n 1 | tr -d '\r')
    guest_down=$(grep -a '^down_sha=' "$RIG_OUT/$name.console" | tail -n 1 | tr -d '\r')
    report "$name" up "${guest_up#up_sha=}"
    report "$name" down "${guest_down#down_sha=}"
}

# report NAME DIR GUEST_SHA: the L1 endpoint's figures, checked against the guest.
report() {
    local line sha mbps
    line=$(cat "$RIG_OUT/$1.$2")
    echo "$1 $2: $line"
    sha=$(grep -o 'sha=[0-9a-f]*' <<<"$line")
    mbps=$(grep -o 'mbps=[0-9.]*' <<<"$line")
    echo "$1_$2_mbps=${mbps#mbps=}"
    if [ "${sha#sha=}" = "$3" ] && [ "$(grep -o 'bytes=[0-9]*' <<<"$line")" = "bytes=$size" ]; then
        echo "$1_$2_ok=1"
    else
        echo "$1_$2_ok=0"
    fi
}

measure vmlab "$VMLAB" run --kernel "$VMLAB_VMLINUX" --initrd "$VMLAB_INITRAMFS" --mem 256M
measure qemu qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 1 -m 256M \
    -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=con,signal=off -serial chardev:con \
    -netdev user,id=n0 -device virtio-net-device,netdev=n0 \
    -kernel "$VMLAB_VMLINUX" -initrd "$VMLAB_INITRAMFS" \
    -append "console=ttyS0 8250.nr_uarts=1 pci=off"
"#;

fn main() {
    let run = rig::Batch::new("bench_net")
        .env("ENDPOINT", ENDPOINT)
        .scenario("throughput", Duration::from_secs(40 * 60), SCENARIO)
        .run();
    let s = run.scenario("throughput").assert_success();
    for line in s
        .output
        .lines()
        .filter(|l| l.contains(": sink") || l.contains(": source"))
    {
        println!("bench: {line}");
    }
    let mbps = |key: &str| s.value(key).parse::<f64>().unwrap_or(f64::NAN);
    println!("bench: TCP throughput through the NAT (MB/s, L1 under TCG: compare ratios only)");
    println!(
        "bench: {:<14} {:>10} {:>10} {:>8}",
        "direction", "vmlab", "QEMU", "ratio"
    );
    for (dir, label) in [("up", "guest → L1"), ("down", "L1 → guest")] {
        let (v, q) = (
            mbps(&format!("vmlab_{dir}_mbps")),
            mbps(&format!("qemu_{dir}_mbps")),
        );
        let ok = |who: &str| {
            if s.value(&format!("{who}_{dir}_ok")) == "1" {
                ""
            } else {
                " (CHECKSUM MISMATCH)"
            }
        };
        println!(
            "bench: {label:<14} {v:>10.2} {q:>10.2} {:>7.2}×{}{}",
            v / q,
            ok("vmlab"),
            ok("qemu")
        );
    }
    println!("bench: target (reported, not asserted): vmlab ≥ 2 × QEMU's slirp");
}
