# Helpers for rig scenarios that boot vmlab's Debian guest (guest/debian),
# sourced after lib.sh:  . "$RIG_REPO/tests/rig/debian.sh"
# Needs VMLAB_DEBIAN_BASE: the cached base.qcow2 (`vmlab image build`), seen
# read-only through L1's share of the host.
#
#   debian_key                       the user's key pair, $RIG_TMP/id_ed25519
#   debian_disk NAME [FROM]          a linked clone of FROM (default: the base)
#                                    at $RIG_TMP/NAME.qcow2
#   debian_cmdline NAME INSTANCE     the guest's command line parameters (as
#                                    vmlab::image::boot_params makes them)
#   debian_qemu_start NAME PORT INSTANCE
#                                    boot NAME's disk in QEMU microvm (KVM),
#                                    ssh forwarded from 127.0.0.1:PORT; its
#                                    serial console is rig console NAME
#   debian_wait_ssh PORT SECS        until `ssh true` succeeds
#   debian_ssh PORT CMD              run CMD in the guest as root
#   debian_qemu_powerdown NAME       press QEMU's ACPI power button
#   vmlab_wait_ssh NAME SECS         until `vmlab ssh NAME -- true` succeeds
#                                    (a named VM with a forward to port 22)

debian_key() {
    [ -f "$RIG_TMP/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C rig -f "$RIG_TMP/id_ed25519"
}

debian_disk() {
    local name=$1 from=${2:-$VMLAB_DEBIAN_BASE}
    "$VMLAB" clone "$from" "$RIG_TMP/$name.qcow2"
}

debian_cmdline() {
    local name=$1 instance=$2
    echo "root=/dev/vda rootfstype=ext4 rw init=/sbin/vmlab-init vmlab.hostname=$name" \
        "vmlab.ssh_key=$(base64 -w0 "$RIG_TMP/id_ed25519.pub") vmlab.instance=$instance"
}

debian_qemu_start() {
    local name=$1 port=$2 instance=$3
    ip link set lo up 2>/dev/null || true
    rig_console_start "$name" qemu-system-x86_64 -M microvm -enable-kvm -cpu host \
        -smp 1 -m 512M -nodefaults -no-user-config -display none -no-reboot \
        -serial stdio -kernel "$VMLAB_BZIMAGE" \
        -append "console=ttyS0 $(debian_cmdline "$name" "$instance")" \
        -drive "file=$RIG_TMP/$name.qcow2,if=none,id=d0,format=qcow2" \
        -device virtio-blk-device,drive=d0 \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" \
        -device virtio-net-device,netdev=n0 \
        -device virtio-rng-device \
        -qmp "unix:$RIG_TMP/$name.qmp,server=on,wait=off"
}

debian_ssh() {
    local port=$1
    shift
    ssh -i "$RIG_TMP/id_ed25519" -p "$port" -o BatchMode=yes -o ConnectTimeout=10 \
        -o UserKnownHostsFile="$RIG_TMP/known_hosts.$port" -o StrictHostKeyChecking=accept-new \
        -o LogLevel=ERROR root@127.0.0.1 "$@"
}

debian_wait_ssh() {
    local port=$1 deadline=$((SECONDS + ${2:-120}))
    until debian_ssh "$port" true 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "rig: no ssh on port $port within ${2:-120} s" >&2
            return 1
        fi
        sleep 0.2
    done
}

debian_qemu_powerdown() {
    printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"system_powerdown"}' |
        socat - "UNIX-CONNECT:$RIG_TMP/$1.qmp" >/dev/null
}

vmlab_wait_ssh() {
    local deadline=$((SECONDS + $2))
    # Each try bounded: a guest whose network is not up yet holds the
    # forwarded connection open.
    until timeout 60 "$VMLAB" ssh "$1" -- true 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "rig: no ssh to $1 within $2 s" >&2
            "$VMLAB" ps >&2 || true
            tail -n 30 "$XDG_DATA_HOME/vmlab/vms/$1/serial.log" >&2 || true
            return 1
        fi
        sleep 1
    done
}
