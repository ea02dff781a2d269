# Helpers for rig scenarios, sourced before each scenario script (see batch.sh).
#
# Console helpers drive a program that talks on stdin/stdout, such as a VMM
# with the guest's serial console on stdio:
#   rig_console_start NAME CMD [ARG...]  start CMD in the background; its output
#                                        goes to $RIG_OUT/NAME.console
#   rig_console_wait NAME ERE [SECS]     wait until the output since the last
#                                        send matches ERE (grep -E, per line)
#   rig_console_send NAME LINE           type LINE and a newline
#   rig_console_exit NAME [SECS]         wait for CMD to end; return its status
# The guest echoes what is typed: match on the output, not the command line
# (e.g. send 'echo "n=$(nproc)"', wait for '^n=[0-9]').

declare -gA RIG_CONSOLE_PID RIG_CONSOLE_FD RIG_CONSOLE_MARK

# Milliseconds since the epoch.
rig_ms() {
    local t=${EPOCHREALTIME/./}
    echo $((t / 1000))
}

# Failures say where, since `set -e` alone does not.
trap 'echo "rig: ${BASH_SOURCE[0]##*/}:$LINENO: \`$BASH_COMMAND\` failed with status $?" >&2' ERR
set -E

# Whatever the scenario started must not outlive it. A scenario (or a helper
# it sources) adds its own clean-up with `rig_at_exit CMD`; such commands run
# on any exit, newest first, before the consoles are killed.
declare -ga RIG_AT_EXIT=()
rig_at_exit() {
    RIG_AT_EXIT+=("$1")
}

rig_cleanup() {
    local name i
    for ((i = ${#RIG_AT_EXIT[@]} - 1; i >= 0; i--)); do
        eval "${RIG_AT_EXIT[$i]}" || true
    done
    for name in "${!RIG_CONSOLE_PID[@]}"; do
        kill -KILL "${RIG_CONSOLE_PID[$name]}" 2>/dev/null || true
    done
}
trap rig_cleanup EXIT

rig_console_start() {
    local name=$1 fd
    shift
    mkfifo "$RIG_TMP/$name.in"
    "$@" <"$RIG_TMP/$name.in" >"$RIG_OUT/$name.console" 2>&1 &
    RIG_CONSOLE_PID[$name]=$!
    exec {fd}>"$RIG_TMP/$name.in"
    RIG_CONSOLE_FD[$name]=$fd
    RIG_CONSOLE_MARK[$name]=0
}

rig_console_tail() {
    echo "--- last lines of $1.console ---" >&2
    tail -n "${2:-20}" "$RIG_OUT/$1.console" | tr -d '\r' >&2
}

# Does the output since the mark match?
rig__console_has() {
    grep -Eq -- "$2" <(tail -c +$((RIG_CONSOLE_MARK[$1] + 1)) "$RIG_OUT/$1.console")
}

rig_console_wait() {
    local name=$1 re=$2 deadline=$((SECONDS + ${3:-60}))
    until rig__console_has "$name" "$re"; do
        if ! kill -0 "${RIG_CONSOLE_PID[$name]}" 2>/dev/null; then
            rig__console_has "$name" "$re" && return 0
            echo "rig: $name ended before its output matched /$re/" >&2
            rig_console_tail "$name"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "rig: $name's output did not match /$re/ within ${3:-60} s" >&2
            rig_console_tail "$name"
            return 1
        fi
        sleep 0.05
    done
}

rig_console_send() {
    RIG_CONSOLE_MARK[$1]=$(stat -c %s "$RIG_OUT/$1.console")
    printf '%s\n' "$2" >&"${RIG_CONSOLE_FD[$1]}"
}

rig_console_exit() {
    local name=$1 deadline=$((SECONDS + ${2:-60})) status=0 fd
    local pid=${RIG_CONSOLE_PID[$name]}
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "rig: $name still running after ${2:-60} s: killing it" >&2
            rig_console_tail "$name"
            kill -KILL "$pid"
            wait "$pid" 2>/dev/null || true
            unset "RIG_CONSOLE_PID[$name]"
            return 124
        fi
        sleep 0.05
    done
    wait "$pid" || status=$?
    fd=${RIG_CONSOLE_FD[$name]}
    exec {fd}>&-
    unset "RIG_CONSOLE_PID[$name]"
    return "$status"
}
