#!/usr/bin/env bash
# Fetches one of Debian's packaged kernels (no compile): the current
# linux-image-*-cloud-amd64 or linux-image-*-amd64 of the host's apt sources,
# with `apt-get download` and `dpkg-deb -x`, and extracts the ELF vmlinux
# from its bzImage.
#
# Usage: guest/debian-kernel.sh [generic|cloud]
#   generic (default): linux-image-amd64, Debian's kernel for PCs: virtio,
#     9p and KVM drivers as modules, /dev/port. vmlab's default guests and
#     the test rig's L1 boot it when vmlab's lean kernel is not built.
#   cloud: linux-image-cloud-amd64 (smaller; no 9p, no /dev/port).
#   Prints the directory on its last line: vmlinuz (the bzImage), vmlinux
#   (the ELF inside it), config, release (the kernel's `uname -r`), package
#   (name=version) and lib/modules/RELEASE/ (every module of the package).
#
# The result is cached under ${XDG_CACHE_HOME:-~/.cache}/vmlab/debian-kernel/
# PACKAGE_VERSION-KEY (KEY hashes this script), so a machine fetches each
# version once; a new version in the archive is a new entry. It is unpacked
# in a scratch directory and renamed into place only when complete.
# VMLAB_DEBIAN_KERNEL=PACKAGE[=VERSION] names another package (and version).
set -euo pipefail

flavor=${1:-generic}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vmlab
log() { printf 'vmlab-kernel: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
# What this host cannot do, in one line (status 69, sysexits' EX_UNAVAILABLE):
# vmlab shows it as the whole error.
refuse() { log "$*"; exit 69; }

case "$flavor" in
    cloud) meta=linux-image-cloud-amd64 ;;
    generic) meta=linux-image-amd64 ;;
    *) die "unknown kernel flavor '$flavor': use cloud or generic" ;;
esac
for tool in apt-cache apt-get dpkg-deb; do
    command -v "$tool" >/dev/null ||
        refuse "'$tool' not found: Debian's packaged kernel is fetched with apt from Debian's archive; on a host without apt, build vmlab's lean kernel: vmlab image kernel lean"
done

# The package and version apt would install now: the meta package depends on
# the current ABI's image (linux-image-6.1.0-NN-cloud-amd64).
if [ -n "${VMLAB_DEBIAN_KERNEL:-}" ]; then
    package=${VMLAB_DEBIAN_KERNEL%%=*}
    version=${VMLAB_DEBIAN_KERNEL#"$package"}
    version=${version#=}
else
    package=$(apt-cache depends "$meta" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
    version=
fi
[ -n "$version" ] || version=$(apt-cache show --no-all-versions "$package" 2>/dev/null | awk '$1 == "Version:" { print $2; exit }')
[ -n "$package" ] && [ -n "$version" ] ||
    refuse "Debian's ${package:-$meta} is not in the apt sources: run 'apt-get update' (it needs Debian's archive, e.g. deb.debian.org), or build vmlab's lean kernel: vmlab image kernel lean"

key=$(cat "$0" | sha256sum | cut -c1-8)
out=$cache/debian-kernel/${package}_${version}-$key
if [ -f "$out/vmlinux" ] && [ -f "$out/release" ]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache/debian-kernel"
work=$(mktemp -d "$cache/debian-kernel/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
log "downloading $package $version with apt-get download (step 1/3)"
# apt's sandbox user cannot write a root-owned scratch directory; as root,
# let it download as root instead of warning.
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root "$package=$version" >&2) ||
    refuse "cannot download $package $version from Debian's archive: check the network and 'apt-get update', or build vmlab's lean kernel: vmlab image kernel lean"
log "unpacking (step 2/3)"
dpkg-deb -x "$work"/*.deb "$work/deb"

stage=$work/out
release=$(basename "$(ls -d "$work"/deb/lib/modules/*/)")
mkdir -p "$stage/lib/modules"
mv "$work/deb/boot/vmlinuz-$release" "$stage/vmlinuz"
mv "$work/deb/boot/config-$release" "$stage/config"
mv "$work/deb/lib/modules/$release" "$stage/lib/modules/"
echo "$release" >"$stage/release"
echo "$package=$version" >"$stage/package"

# The ELF vmlinux is the bzImage's payload, decompressed: the boot
# protocol's setup header says where it is (payload_offset at 0x248 and
# payload_length at 0x24c, counted from the protected-mode code, which
# starts after the setup sectors). Its last 4 bytes are the uncompressed
# size, not compressed data.
log "extracting the ELF vmlinux from the bzImage (step 3/3)"
u8() { od -An -tu1 -j "$1" -N1 "$stage/vmlinuz" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N4 "$stage/vmlinuz" | tr -d ' '; }
setup_sects=$(u8 $((0x1f1)))
[ "$setup_sects" != 0 ] || setup_sects=4
offset=$(((setup_sects + 1) * 512 + $(u32 $((0x248)))))
length=$(($(u32 $((0x24c))) - 4))
magic=$(od -An -tx1 -j "$offset" -N4 "$stage/vmlinuz" | tr -d ' ')
case "$magic" in
    02214c18) decompress=(lz4 -dc) ;;
    fd377a58) decompress=(xz -dc --single-stream) ;;
    1f8b*) decompress=(gzip -dc) ;;
    28b52ffd) decompress=(zstd -dc) ;;
    *) die "the bzImage's payload starts with $magic: not a compression this script knows (lz4, xz, gzip, zstd)" ;;
esac
command -v "${decompress[0]}" >/dev/null || die "'${decompress[0]}' not found: apt-get install ${decompress[0]}"
dd if="$stage/vmlinuz" iflag=skip_bytes,count_bytes skip="$offset" count="$length" status=none |
    "${decompress[@]}" >"$stage/vmlinux"
[ "$(head -c 4 "$stage/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] ||
    die "the payload of $package's bzImage did not decompress to an ELF file"

# Another fetch of the same version may have won the race: its entry is as
# good as this one.
mv -T "$stage" "$out" 2>/dev/null || [ -f "$out/vmlinux" ] || die "cannot install $out"
log "kernel $release ready in $out"
echo "$out"
