#!/usr/bin/env bash
# Runs a rig batch inside L1 (written by tests/rig/mod.rs, run by L1's init):
#   bash batch.sh DIR
# DIR/env.sh is sourced first; then each DIR/scenarios/NNN-NAME/script runs,
# in order, as `bash -euo pipefail` with lib.sh sourced before it, its own
# time limit (DIR/scenarios/NNN-NAME/timeout, seconds) and these variables:
#   RIG_OUT  DIR/scenarios/NNN-NAME/out: files left here reach the host test
#   RIG_TMP  an empty directory on L1's tmpfs (fifos, scratch)
# and vmlab's state (XDG_DATA_HOME, XDG_RUNTIME_DIR) in RIG_TMP, while its
# cache (XDG_CACHE_HOME: the built guests) stays the host's, read-only.
# Each scenario gets `output` (stdout+stderr), `status` and `elapsed_ms`;
# one that already has a `status` is skipped.
# Progress goes to stdout, which is L1's console.
set -u
dir=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
. "$dir/env.sh"

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

shopt -s nullglob
scenarios=("$dir"/scenarios/*/)
i=0
for s in "${scenarios[@]}"; do
    s=${s%/}
    name=${s##*/}
    i=$((i + 1))
    # A scenario with a status finished in an earlier L1 boot of this batch
    # (the host boots a new L1 when one freezes; see tests/rig/mod.rs).
    if [ -f "$s/status" ]; then
        echo "rig: [$i/${#scenarios[@]}] $name: finished in an earlier L1"
        continue
    fi
    rm -rf "$s/out"
    mkdir -p "$s/out"
    tmp=$(mktemp -d "/tmp/rig-$name.XXXXXX")
    echo "rig: [$i/${#scenarios[@]}] $name: running"
    start=$(now_ms)
    # timeout(1) signals its whole process group: background children of the
    # scenario (VMMs it started) die with it.
    mkdir -p "$tmp/xdg-data" "$tmp/xdg-run"
    # shellcheck disable=SC2016 # expanded by the inner bash
    XDG_CACHE_HOME=${XDG_CACHE_HOME:-$HOME/.cache} \
        XDG_DATA_HOME=$tmp/xdg-data XDG_RUNTIME_DIR=$tmp/xdg-run \
        RIG_OUT=$s/out RIG_TMP=$tmp RIG_LIB=$here/lib.sh \
        timeout -k 5 "$(cat "$s/timeout")" \
        bash -euo pipefail -c '. "$RIG_LIB"; . "$1"' "$name" "$s/script" \
        </dev/null >"$s/output" 2>&1
    status=$?
    elapsed=$(($(now_ms) - start))
    echo "$elapsed" >"$s/elapsed_ms"
    echo "$status" >"$s/status"
    rm -rf "$tmp"
    echo "rig: [$i/${#scenarios[@]}] $name: exit status $status after $elapsed ms"
done
