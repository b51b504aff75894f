# shellcheck shell=bash
# Shared by the bench scripts (sourced, not run): installing the tools a bench needs, and a
# work directory whose processes and files go when the script ends.

# need_tools CMD:PACKAGE ...: installs (apt) the packages whose command is not on PATH.
need_tools() {
    local spec missing=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    if ((${#missing[@]})); then
        echo "installing ${missing[*]}" >&2
        apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# bench_workdir PREFIX: makes $work (a new directory under /tmp) and an EXIT trap that kills the
# processes whose ids the script appended to $pids and removes $work.
bench_workdir() {
    work=$(mktemp -d "/tmp/$1.XXXXXX")
    pids=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
