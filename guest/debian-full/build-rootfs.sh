#!/usr/bin/env bash
# Builds the root filesystem of vmlab's full Debian guest as an ext4 image:
# bookworm with systemd as PID 1, Debian's cloud kernel with its modules and
# an initrd made inside the image by initramfs-tools, systemd-networkd for
# eth0, a root shell on the serial console, and vmlab's identity unit (the
# same contract as the lean flavor, guest/debian). No loop mount: the tree
# is made with debootstrap and apt in a chroot, then `mkfs.ext4 -d`.
#
# Usage: guest/debian-full/build-rootfs.sh OUT.ext4 [PACKAGES]
#   PACKAGES: extra Debian packages, comma-separated (docker.io,...), baked
#   into the image. Needs root (debootstrap and apt chroot into the new
#   tree). Prints OUT.ext4 on its last line.
#
# Environment: VMLAB_DEBIAN_MIRROR (see ../debian/lib.sh), VMLAB_DEBIAN_SIZE
# the filesystem size (8G; the image is sparse).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=guest/debian/lib.sh
. "$here/../debian/lib.sh"
size=${VMLAB_DEBIAN_SIZE:-8G}
# The kernel the image boots; PACKAGES may add others (linux-image-amd64)
# to switch to from inside the guest.
kernel=linux-image-cloud-amd64
# Installed by apt in the minbase tree (one transaction, downloads in
# parallel: quicker than debootstrap's own second stage). dbus: logind acts
# on the ACPI power button (vmlab stop); ioport: `outb` writes the
# boot-timer bytes (Debian's kernels have no /dev/port); systemd-resolved:
# resolv.conf from networkd's DHCP lease.
packages="systemd systemd-sysv systemd-resolved dbus udev kmod initramfs-tools zstd procps
    openssh-server iproute2 ca-certificates curl nano ioport $kernel"

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 OUT.ext4 [PACKAGES]"
out=$1
extra=${2:-}
case "$extra" in *[!a-z0-9+.,-]*) die "packages '$extra': Debian package names, comma-separated" ;; esac
debian_setup "$out"

log "debootstrap $suite (minbase) from $mirror (step 1/4)"
debian_bootstrap

log "installing vmlab's units and configuration (step 2/4)"
# The lean flavor's sshd and dpkg settings, then this flavor's own files.
for f in etc/ssh/sshd_config.d/vmlab.conf etc/dpkg/dpkg.cfg.d/vmlab-nodoc; do
    install -D -m 0644 "$here/../debian/rootfs/$f" "$root/$f"
done
# The lean flavor's resume hook too (vmlab-resume.service runs it).
install -D -m 0755 "$here/../debian/rootfs/sbin/vmlab-identity" "$root/usr/sbin/vmlab-identity"
debian_overlay "$here/rootfs"
# Classic interface names (eth0), as the lean flavor has: masking the
# default link policy is how systemd documents it.
ln -sfn /dev/null "$root/etc/systemd/network/99-default.link"

log "installing systemd, ssh, $kernel${extra:+ and $extra} with apt in the new tree (step 3/4)"
# No daemon starts inside the build's chroot. After the install: no timers
# that reach for a network a lab may not have, and no boot-time work a VM
# never needs (pstore and EFI, DRM, device mapper; each a process at boot,
# seconds under emulation; fuse, loop and configfs load on first use
# anyway): they stay installed, `systemctl unmask` or `enable` brings one
# back.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 0755 "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }
{
    in_root apt-get update &&
        in_root apt-get install -y --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $packages ${extra//,/ } &&
        in_root systemctl enable systemd-networkd.service systemd-resolved.service \
            vmlab-identity.service vmlab-ssh-ready.service vmlab-resume.service &&
        in_root systemctl disable apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
            e2scrub_reap.service systemd-pstore.service &&
        in_root systemctl mask modprobe@drm.service modprobe@efi_pstore.service modprobe@dm_mod.service \
            modprobe@fuse.service modprobe@loop.service modprobe@configfs.service
} >"$work/apt.log" 2>&1 || {
    tail -n 25 "$work/apt.log" >&2
    die "installing $kernel${extra:+,$extra} failed (is every package name right? mirror $mirror)"
}
umount "$root/sys" "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"

# /boot/vmlinuz and /boot/initrd.img (kernel-img.conf: link_in_boot) name
# the cloud kernel, whichever kernel apt installed last.
cloud=$(cd "$root/boot" && ls vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -n1)
[ -n "$cloud" ] || die "no cloud kernel in /boot after installing $kernel"
version=${cloud#vmlinuz-}
[ -s "$root/boot/initrd.img-$version" ] || die "initramfs-tools made no initrd for $version"
ln -sfn "vmlinuz-$version" "$root/boot/vmlinuz"
ln -sfn "initrd.img-$version" "$root/boot/initrd.img"
rm -f "$root/boot/vmlinuz.old" "$root/boot/initrd.img.old"
debian_trim

log "making the ext4 filesystem ($size, sparse) from the tree (step 4/4)"
debian_mkfs "$out" "$size"
echo "$out"
