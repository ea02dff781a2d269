#!/usr/bin/env bash
# Builds the root filesystem of vmlab's default Debian guest as an ext4
# image, with no loop mount: debootstrap into a scratch directory, vmlab's
# files on top (rootfs/), trimmed, then `mkfs.ext4 -d`.
#
# Usage: guest/debian/build-rootfs.sh OUT.ext4
#   Needs root (debootstrap chroots into the new tree). Prints OUT.ext4 on
#   its last line. `vmlab image build` runs it in a scratch directory and
#   turns the result into the cached qcow2 base, so this script keeps no
#   cache of its own.
#
# Environment: VMLAB_DEBIAN_MIRROR overrides the Debian mirror (default: the
# host's own, from /etc/apt), VMLAB_DEBIAN_SIZE the filesystem size (4G; the
# image is sparse, so unused space costs nothing).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=bookworm
size=${VMLAB_DEBIAN_SIZE:-4G}
# busybox: udhcpc (a DHCP lease in milliseconds, no dhclient-script) and
# `poweroff -f` (there is no init system to ask).
packages=openssh-server,iproute2,busybox,ca-certificates,curl,nano

log() { printf 'vmlab-debian: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ $# = 1 ] || die "usage: $0 OUT.ext4"
out=$1
[ "$(id -u)" = 0 ] || die "building the Debian image needs root (debootstrap): run it as root"
for tool in debootstrap mkfs.ext4 e2fsck; do
    command -v "$tool" >/dev/null || die "'$tool' not found: run .ci/setup (or apt-get install debootstrap e2fsprogs)"
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$keyring" ] || die "$keyring not found: apt-get install debian-archive-keyring"

# The host's Debian mirror: the first http(s) URI of a bookworm source in
# deb822 (.sources) or one-line (.list) form.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$suite" '
            /^[ \t]*$/ { if (uri != "" && ok) { print uri; exit } uri = ""; ok = 0; next }
            tolower($1) == "uris:" { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
            END { if (uri != "" && ok) print uri }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i == suite) { u = ($2 ~ /^\[/) ? $3 : $2; print u; exit } }' "$f"
    done
}
mirror=${VMLAB_DEBIAN_MIRROR:-$(host_mirror | grep -m1 -E '^https?://' || true)}
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d "$(dirname "$out")/.rootfs-XXXXXX")
root=$work/root
cleanup() {
    # A killed debootstrap may leave proc/sys mounted in the tree: unmount
    # before deleting, and never cross into another filesystem.
    { grep -o " $root/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$work" || true
}
trap cleanup EXIT

log "debootstrap $suite (minbase + $packages) from $mirror (step 1/3)"
# debootstrap says ~500 lines: kept in a file, shown only when it fails.
debootstrap --variant=minbase --include="$packages" --keyring="$keyring" \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 25 "$work/debootstrap.log" >&2
    die "debootstrap failed (mirror $mirror; set VMLAB_DEBIAN_MIRROR to use another)"
}

log "installing vmlab's init and configuration, trimming (step 2/3)"
# Files keep their modes, owned by root; directories already in the tree keep
# theirs, new ones are 0755 whatever the umask.
tar -C "$here/rootfs" --owner=0 --group=0 --numeric-owner -cf - . |
    tar -C "$root" --no-overwrite-dir -xpf -
chmod 0755 "$root/etc/vmlab"
# Identity is per VM, made at its first boot (vmlab-init): nothing of it in
# the base, or every clone would share it.
rm -f "$root"/etc/ssh/ssh_host_* "$root/var/lib/dbus/machine-id"
: >"$root/etc/machine-id"
echo vmlab >"$root/etc/hostname"
# root: no password (sshd takes keys only; the console shell needs none),
# but not locked ('!'), which sshd would refuse even for a key.
grep -q '^root:\*:' "$root/etc/shadow" || die "root's password field in the new tree is not '*'"
# Trim what a lab VM never reads; apt fetches lists again on `apt update`.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/usr/share/lintian "$root"/usr/share/linda "$root"/tmp/* "$root"/var/tmp/*
# Keep each package's copyright file, drop the rest of its docs.
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$root/var/log" -type f -delete
# vmlab-init grows the root filesystem to its disk (vmlab run --disk-size)
# when the disk's size differs from the one it last grew to: the base's own
# size, so that a VM whose disk never grew skips resize2fs.
[ -x "$root/usr/sbin/resize2fs" ] || [ -x "$root/sbin/resize2fs" ] || die "resize2fs is missing from the tree (e2fsprogs)"
echo $(($(numfmt --from=iec "$size") / 512)) >"$root/etc/vmlab/disk-sectors"
# No host keys may have slipped in from a package's postinst.
if ls "$root"/etc/ssh/ssh_host_* >/dev/null 2>&1; then die "SSH host keys left in the base image"; fi

log "making the ext4 filesystem ($size, sparse) from the tree (step 3/3)"
rm -f "$out"
truncate -s "$size" "$out"
mkfs.ext4 -q -F -L vmlab-root -b 4096 -E root_owner=0:0 -d "$root" "$out" >&2
e2fsck -f -n "$out" >/dev/null 2>&1 || die "the new filesystem does not pass e2fsck"
log "root filesystem ready: $(du -k "$out" | cut -f1) KiB used of $size"
echo "$out"
