# Shared steps of vmlab's Debian image recipes (debian/build-rootfs.sh, the
# lean flavor, and debian-full/build-rootfs.sh), sourced by both:
#
#   debian_setup OUT              checks root and tools, picks the mirror
#                                 ($mirror), makes the scratch tree ($work,
#                                 $root) and its clean-up on exit
#   debian_bootstrap [PACKAGES]   debootstrap minbase (+ PACKAGES) into $root
#   debian_overlay DIR            DIR's files on top of $root, owned by root
#   debian_trim                   identity and what a lab VM never reads out
#   debian_mkfs OUT SIZE          the ext4 image of $root, checked
#
# Environment: VMLAB_DEBIAN_MIRROR overrides the Debian mirror (default: the
# host's own, from /etc/apt).

suite=bookworm

log() { printf 'vmlab-debian: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

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

debian_setup() {
    local out=$1
    [ "$(id -u)" = 0 ] || die "building the Debian image needs root (debootstrap): run it as root"
    for tool in debootstrap mkfs.ext4 e2fsck; do
        command -v "$tool" >/dev/null || die "'$tool' not found: run .ci/setup (or apt-get install debootstrap e2fsprogs)"
    done
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || die "$keyring not found: apt-get install debian-archive-keyring"
    mirror=${VMLAB_DEBIAN_MIRROR:-$(host_mirror | grep -m1 -E '^https?://' || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    work=$(mktemp -d "$(dirname "$out")/.rootfs-XXXXXX")
    root=$work/root
    trap debian_cleanup EXIT
}

debian_cleanup() {
    # A killed debootstrap (or chroot step) may leave proc/sys mounted in the
    # tree: unmount before deleting, and never cross into another filesystem.
    { grep -o " $root/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf --one-file-system "$work" || true
}

debian_bootstrap() {
    local packages=${1:-}
    # debootstrap says ~500 lines: kept in a file, shown only when it fails.
    debootstrap --variant=minbase ${packages:+--include="$packages"} --keyring="$keyring" \
        "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
        tail -n 25 "$work/debootstrap.log" >&2
        die "debootstrap failed (mirror $mirror; set VMLAB_DEBIAN_MIRROR to use another)"
    }
}

debian_overlay() {
    # Files keep their modes, owned by root; directories already in the tree
    # keep theirs, new ones are 0755 whatever the umask.
    tar -C "$1" --owner=0 --group=0 --numeric-owner -cf - . |
        tar -C "$root" --no-overwrite-dir -xpf -
}

debian_trim() {
    # Identity is per VM, made at its first boot: nothing of it in the base,
    # or every clone would share it.
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
    # No host keys may have slipped in from a package's postinst.
    if ls "$root"/etc/ssh/ssh_host_* >/dev/null 2>&1; then die "SSH host keys left in the base image"; fi
}

debian_mkfs() {
    local out=$1 size=$2
    rm -f "$out"
    truncate -s "$size" "$out"
    mkfs.ext4 -q -F -L vmlab-root -b 4096 -E root_owner=0:0 -d "$root" "$out" >&2
    e2fsck -f -n "$out" >/dev/null 2>&1 || die "the new filesystem does not pass e2fsck"
    log "root filesystem ready: $(du -k "$out" | cut -f1) KiB used of $size"
}
