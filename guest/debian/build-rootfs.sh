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
# shellcheck source=guest/debian/lib.sh
. "$here/lib.sh"
size=${VMLAB_DEBIAN_SIZE:-4G}
# busybox: udhcpc (a DHCP lease in milliseconds, no dhclient-script) and
# `poweroff -f` (there is no init system to ask).
packages=openssh-server,iproute2,busybox,ca-certificates,curl,nano

[ $# = 1 ] || die "usage: $0 OUT.ext4"
out=$1
debian_setup "$out"

log "debootstrap $suite (minbase + $packages) from $mirror (step 1/3)"
debian_bootstrap "$packages"

log "installing vmlab's init and configuration, trimming (step 2/3)"
debian_overlay "$here/rootfs"
chmod 0755 "$root/etc/vmlab"
debian_trim
# vmlab-init grows the root filesystem to its disk (vmlab run --disk-size)
# when the disk's size differs from the one it last grew to: the base's own
# size, so that a VM whose disk never grew skips resize2fs.
[ -x "$root/usr/sbin/resize2fs" ] || [ -x "$root/sbin/resize2fs" ] || die "resize2fs is missing from the tree (e2fsprogs)"
echo $(($(numfmt --from=iec "$size") / 512)) >"$root/etc/vmlab/disk-sectors"

log "making the ext4 filesystem ($size, sparse) from the tree (step 3/3)"
debian_mkfs "$out" "$size"
echo "$out"
