#!/usr/bin/env bash
# Boots two guests at once, ROUNDS times, and counts the boots that reach a
# shell prompt: the check behind the rig's L1 settings (tests/rig/l1). Run it
# in L1, from the repository:
#   bash tests/rig/l1 [--smp N] -- bash tests/rig/stress-pair.sh [ROUNDS] [vmlab|qemu]
# Prints one line per boot and "RESULT ok=N bad=M"; exits 1 when a boot failed.
set -uo pipefail
rounds=${1:-6}
vmm=${2:-vmlab}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kernel=$(bash "$repo/guest/build-kernel.sh" 2>/dev/null | tail -n1)/vmlinux
initrd=$(bash "$repo/guest/build-initramfs.sh" 2>/dev/null | tail -n1)
vmlab=$repo/target/release/vmlab
scratch=$(mktemp -d /tmp/stress-pair.XXXXXX)
export XDG_DATA_HOME=$scratch/data XDG_RUNTIME_DIR=$scratch/run HOME=$scratch/home
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/root/.cache}
mkdir -p "$XDG_RUNTIME_DIR" "$HOME"

pids=()
start() { # start N: boot guest N in the background; its console goes to $scratch/N.log
    if [ "$vmm" = qemu ]; then
        qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 1 -m 256M -nodefaults \
            -no-user-config -display none -no-reboot -serial "file:$scratch/$1.log" \
            -kernel "$kernel" -initrd "$initrd" -append console=ttyS0 </dev/null >/dev/null 2>&1 &
        pids[$1]=$!
    else
        "$vmlab" run --name "vm$1" --detach --kernel "$kernel" --initrd "$initrd" --mem 256M \
            --net none >/dev/null
        pids[$1]=$(cat "$XDG_DATA_HOME/vmlab/vms/vm$1/vmlab.pid")
        ln -sf "$XDG_DATA_HOME/vmlab/vms/vm$1/serial.log" "$scratch/$1.log"
    fi
}
stop() {
    if [ "$vmm" = qemu ]; then
        kill "${pids[1]}" "${pids[2]}" 2>/dev/null
        wait 2>/dev/null
    else
        "$vmlab" stop --timeout 20 vm1 vm2 >/dev/null 2>&1
        "$vmlab" rm vm1 vm2 >/dev/null 2>&1
    fi
    rm -f "$scratch"/*.log
}

ok=0 bad=0
for round in $(seq 1 "$rounds"); do
    start 1
    start 2
    for n in 1 2; do
        t=$SECONDS
        while :; do
            if grep -Eq 'root@[a-z0-9-]+:.*# ' "$scratch/$n.log" 2>/dev/null; then
                ok=$((ok + 1))
                echo "round $round guest $n: prompt after $((SECONDS - t)) s"
                break
            elif ! kill -0 "${pids[$n]}" 2>/dev/null; then
                bad=$((bad + 1))
                echo "round $round guest $n: died before its prompt; console tail:"
                tail -n 3 "$scratch/$n.log" 2>/dev/null
                [ "$vmm" = qemu ] || tail -n 3 "$XDG_DATA_HOME/vmlab/vms/vm$n/vmm.log"
                break
            elif ((SECONDS - t > 200)); then
                bad=$((bad + 1))
                echo "round $round guest $n: no prompt within 200 s"
                break
            fi
            sleep 0.5
        done
    done
    stop
done
rm -rf "$scratch"
echo "RESULT ok=$ok bad=$bad"
[ "$bad" -eq 0 ]
