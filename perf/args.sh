# Sourced by perf/*.sh: their shared arguments ([SECONDS] [-- BENCH ARGS...]) and perf itself.

# perf_args DEFAULT_SECONDS "$@": sets `secs` and `bench_args` (default: the canonical run).
perf_args() {
    local default=$1
    shift
    secs=${1:-$default}
    shift || true
    if [ "${1:-}" = "--" ]; then shift; fi
    if [ $# -gt 0 ]; then
        bench_args=("$@")
    else
        bench_args=(produce --acks all --linger 20ms --record-size 1024 --partitions 6)
    fi
}

# Installs linux-perf (Debian) if missing and lets it read kernel symbols and tracepoints.
need_perf() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    command -v perf >/dev/null 2>&1 || { $sudo apt-get update -qq; DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq linux-perf >/dev/null; }
    if [ -w /proc/sys/kernel/perf_event_paranoid ]; then echo -1 > /proc/sys/kernel/perf_event_paranoid; fi
    if [ -w /proc/sys/kernel/kptr_restrict ]; then echo 0 > /proc/sys/kernel/kptr_restrict; fi
}
