#!/usr/bin/env bash
# One command from "this is slow" to a flame graph:
#   perf/flamegraph.sh [SECONDS] [-- BENCH ARGS...]
# Builds the broker and bench in release mode with frame pointers (target/perf), starts the
# broker on a free port with a temporary data directory, records it with `perf record`
# (cpu-clock: the only event on these virtual machines; call graphs from frame pointers) while
# the bench workload runs (default: `bench produce --acks all --linger 20ms`), and renders
# perf/flamegraph.svg with inferno. Installs linux-perf (Debian) and inferno (crates.io) if
# missing. Prints the functions with the most samples.
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/args.sh
perf_args 20 "$@"
need_perf
command -v inferno-flamegraph >/dev/null 2>&1 || cargo install --quiet inferno

export CARGO_TARGET_DIR=target/perf
RUSTFLAGS="-C force-frame-pointers=yes" cargo build --release --quiet --bin broker --bin bench
bin=$CARGO_TARGET_DIR/release

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
data=$(mktemp -d)
"$bin/broker" --listen 127.0.0.1:$port --data-dir "$data" > perf/broker.log 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

perf record -F 999 -e cpu-clock -g -p $broker -o perf/perf.data -- sleep "$secs" 2> perf/perf-record.log &
recorder=$!
"$bin/bench" "${bench_args[@]}" --bootstrap-server 127.0.0.1:$port --duration "${secs}s" | tee perf/bench.txt
wait $recorder || true
kill $broker; wait $broker 2>/dev/null || true

perf script -i perf/perf.data 2>/dev/null | inferno-collapse-perf > perf/stacks.folded
inferno-flamegraph --title "Weir broker: ${bench_args[*]}" < perf/stacks.folded > perf/flamegraph.svg
echo "wrote perf/flamegraph.svg ($(wc -l < perf/stacks.folded) distinct stacks)"
echo "top functions by self samples:"
# (head closes the pipe early: that SIGPIPE is not a failure.)
awk '{n=$NF; $NF=""; k=split($0, f, ";"); leaf=f[k]; gsub(/ +$/, "", leaf); s[leaf]+=n; t+=n} END {for (x in s) printf "%6.2f%%  %s\n", 100*s[x]/t, x}' perf/stacks.folded | sort -rn | head -15 || true
