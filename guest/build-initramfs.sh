#!/usr/bin/env bash
# Builds a small initramfs (a newc cpio, lz4- or gzip-compressed) from Debian's
# busybox-static plus an overlay tree of files.
#
# Usage: guest/build-initramfs.sh [-c lz4|gzip|none] [-k KERNELDIR -m LIST] [TREE]
#   TREE defaults to guest/initramfs: vmlab's default guest. The test rig
#   passes its own tree (tests/rig/initramfs) to build its L1 initramfs.
#   -k KERNELDIR -m LIST: for a kernel whose drivers are modules (a
#   directory made by guest/debian-kernel.sh), the modules named in the file
#   LIST (one a line, `#` comments) and those they depend on are added under
#   /lib/modules/RELEASE, with /lib/modules/load, a script that insmods them
#   in dependency order (TREE's /init runs it). Modules the kernel has built
#   in are skipped.
#   Prints the path of the archive on its last line.
#
# The archive holds busybox at /bin/busybox with a symlink for every applet,
# the directories the kernel and init need, and TREE copied on top (TREE's
# files win over applet links of the same name). TREE must provide /init.
#
# The result is cached under ${XDG_CACHE_HOME:-~/.cache}/vmlab/initramfs,
# keyed by this script, TREE's contents and modes, the busybox binary and the
# compression; it is written under a temporary name and renamed into place, so
# a killed build leaves nothing a later run would pick up.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vmlab
compress=lz4
log() { printf 'vmlab-initramfs: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

kernel=
modules=
while getopts c:k:m: opt; do
    case "$opt" in
        c) compress=$OPTARG ;;
        k) kernel=$OPTARG ;;
        m) modules=$OPTARG ;;
        *) die "usage: $0 [-c lz4|gzip|none] [-k KERNELDIR -m LIST] [TREE]" ;;
    esac
done
shift $((OPTIND - 1))
if [ -n "$kernel$modules" ]; then
    [ -n "$kernel" ] && [ -n "$modules" ] || die "-k KERNELDIR and -m LIST go together"
    [ -f "$kernel/release" ] || die "$kernel is not a kernel directory made by guest/debian-kernel.sh (no release file)"
    [ -f "$modules" ] || die "module list '$modules' not found"
    release=$(cat "$kernel/release")
fi
tree=$(cd "${1:-$here/initramfs}" && pwd) || die "overlay tree '${1:-}' not found"
[ -x "$tree/init" ] || die "$tree/init is missing or not executable: an initramfs needs one"
case "$compress" in
    lz4) ext=.lz4; command -v lz4 >/dev/null || die "lz4 not found: run .ci/setup (or apt-get install lz4)" ;;
    gzip) ext=.gz ;;
    none) ext= ;;
    *) die "unknown compression '$compress': use lz4, gzip or none" ;;
esac
command -v cpio >/dev/null || die "cpio not found: run .ci/setup (or apt-get install cpio)"

# busybox-static: the installed package, else its .deb unpacked into the cache.
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ]; then
    busybox=/bin/busybox
else
    busybox=$cache/busybox-static/bin/busybox
    if [ ! -x "$busybox" ]; then
        log "busybox-static is not installed: fetching it with apt-get download"
        mkdir -p "$cache"
        dl=$(mktemp -d "$cache/.busybox-XXXXXX")
        trap 'rm -rf "$dl"' EXIT
        (cd "$dl" && apt-get download busybox-static >&2)
        dpkg-deb -x "$dl"/busybox-static_*.deb "$dl/root"
        rm -rf "$cache/busybox-static"
        mv "$dl/root" "$cache/busybox-static"
    fi
fi

# Copies LIST's modules and their dependencies (the `depends=` field of
# each module's .modinfo section) into ROOT, and writes ROOT/lib/modules/load
# loading them dependencies first.
add_modules() {
    local root=$1 dir=$kernel/lib/modules/$release f n
    local -A file_of=() builtin=() seen=()
    local order=()
    # Module names use '_' where file names may use '-' (virtio-rng.ko).
    # Expansions, not basename: thousands of modules, a fork each took 30 s.
    while IFS= read -r f; do
        n=${f##*/}
        n=${n%.ko}
        file_of[${n//-/_}]=$f
    done < <(find "$dir" -name '*.ko')
    while IFS= read -r f; do
        n=${f##*/}
        n=${n%.ko}
        builtin[${n//-/_}]=1
    done <"$dir/modules.builtin"
    visit() {
        local name=${1//-/_} file dep
        [ -z "${seen[$name]:-}" ] || return 0
        seen[$name]=1
        file=${file_of[$name]:-}
        if [ -z "$file" ]; then
            [ -n "${builtin[$name]:-}" ] || die "module $name is neither a module nor built into kernel $release"
            return 0
        fi
        for dep in $(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' '); do
            visit "$dep"
        done
        order+=("${file#"$dir"/}")
    }
    while read -r n _; do
        case "$n" in '' | '#'*) continue ;; esac
        visit "$n"
    done <"$modules"
    mkdir -p "$root/lib/modules/$release"
    {
        echo '#!/bin/sh'
        echo "# Loads the modules vmlab's guest needs from kernel $release, dependencies first."
        for f in "${order[@]}"; do
            install -D -m 0644 "$dir/$f" "$root/lib/modules/$release/$f"
            echo "insmod /lib/modules/$release/$f"
        done
    } >"$root/lib/modules/load"
    chmod 0755 "$root/lib/modules/load"
    log "added ${#order[@]} modules of kernel $release"
}

key=$({
    cat "$0"
    echo "$compress"
    sha256sum <"$busybox"
    tar -C "$tree" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - .
    if [ -n "$kernel" ]; then
        cat "$kernel/package" "$kernel/release"
        grep -v '^[[:space:]]*#' "$modules"
    fi
} | sha256sum | cut -c1-16)
name=$(basename "$(dirname "$tree")")-$(basename "$tree")
[ -z "$kernel" ] || name+=-$release
out=$cache/initramfs/$name-$key.cpio$ext
if [ -f "$out" ]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache/initramfs"
work=$(mktemp -d "$cache/initramfs/.build-XXXXXX")
trap 'rm -rf "$work" ${dl:+"$dl"}' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,etc,proc,root,run,sys,tmp}
chmod 1777 "$root/tmp"
cp -a "$tree/." "$root/"
install -m 0755 "$busybox" "$root/bin/busybox"
"$busybox" --list-full | while IFS= read -r applet; do
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
done
[ -z "$kernel" ] || add_modules "$root"
# /dev/console comes from the kernel's built-in initramfs, which is unpacked
# before this one, so no device node (and no root) is needed here.

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) >"$work/initramfs.cpio"
case "$compress" in
    # The kernel only unpacks lz4's legacy frame format (-l).
    lz4) lz4 -q -l -9 "$work/initramfs.cpio" "$work/out" ;;
    gzip) gzip -9 -n -c "$work/initramfs.cpio" >"$work/out" ;;
    none) mv "$work/initramfs.cpio" "$work/out" ;;
esac
mv "$work/out" "$out"
log "initramfs ready: $out ($(du -k "$out" | cut -f1) KiB)"
echo "$out"
