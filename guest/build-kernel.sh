#!/usr/bin/env bash
# Builds vmlab's guest kernel (vmlinux + bzImage) from Debian's linux-source
# package with guest/kernel/vmlab.config applied on top of tinyconfig.
#
# Usage: guest/build-kernel.sh [OUTDIR]
#   Prints the directory holding vmlinux, bzImage and .config on its last line.
#
# The result is cached under ${XDG_CACHE_HOME:-~/.cache}/vmlab/kernel/<key>,
# where <key> hashes this script, the config fragment and the source version,
# so a machine builds each recipe once. A build happens in a scratch directory
# and is renamed into place only when complete: a killed build leaves nothing
# a later run would pick up.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/kernel/vmlab.config"
series=${VMLAB_LINUX_SERIES:-6.1}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vmlab
jobs=${VMLAB_BUILD_JOBS:-$(nproc)}

log() { printf 'vmlab-guest: %s\n' "$*" >&2; }

# Locate the source tarball: the installed package, else download it.
tarball=/usr/src/linux-source-$series.tar.xz
if [ ! -f "$tarball" ]; then
    dl="$cache/src"
    mkdir -p "$dl"
    tarball=$(ls "$dl"/linux-source-"$series"*/usr/src/linux-source-"$series".tar.xz 2>/dev/null | head -n1 || true)
    if [ -z "$tarball" ]; then
        log "downloading linux-source-$series with apt-get download"
        (cd "$dl" && apt-get download "linux-source-$series" >&2)
        deb=$(ls "$dl"/linux-source-"$series"_*.deb | head -n1)
        dpkg-deb -x "$deb" "$dl/linux-source-$series"
        tarball="$dl/linux-source-$series/usr/src/linux-source-$series.tar.xz"
    fi
fi
srcver=$(stat -c '%s-%Y' "$tarball")
key=$(cat "$0" "$fragment" <(echo "$series $srcver") | sha256sum | cut -c1-16)
out=${1:-$cache/kernel/$key}

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    echo "$out"
    exit 0
fi

for tool in make gcc flex bison bc lz4; do
    command -v "$tool" >/dev/null || { log "missing build tool '$tool': run .ci/setup (or apt-get install flex bison bc libelf-dev libssl-dev lz4)"; exit 1; }
done

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT

log "unpacking $(basename "$tarball") (step 1/3)"
tar -C "$work" -xf "$tarball"
src=$(echo "$work"/linux-source-*)

log "configuring: tinyconfig + $(basename "$fragment") (step 2/3)"
make -C "$src" -s tinyconfig >&2
"$src"/scripts/kconfig/merge_config.sh -m -O "$src" "$src/.config" "$fragment" >/dev/null
make -C "$src" -s olddefconfig >&2
# Every option the fragment asks for must have survived olddefconfig; a
# dependency silently dropping one would give a kernel that boots wrongly.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qx "$line" "$src/.config" || { log "config option not applied: $line"; missing=1; } ;;
    esac
done < "$fragment"
[ "$missing" = 0 ] || exit 1

log "compiling with $jobs jobs, a few minutes on 2 cores (step 3/3)"
make -C "$src" -s -j"$jobs" vmlinux bzImage >&2

stage="$work/out"
mkdir -p "$stage"
cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/.config" "$stage/"
rm -rf "$out"
mv "$stage" "$out"
log "kernel ready in $out"
echo "$out"
