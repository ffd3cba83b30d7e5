#!/usr/bin/env bash
# The half-load target of issue #10, in one command: the canonical
# `bench produce --acks all --linger 20ms` run (1 KiB records, 6 partitions) finds the maximum,
# then a fresh broker takes an open-loop run at half of it, and the client's p99 is compared
# with 2 x the broker's durable-write p99 + 1 ms, both from the same half-load run (the
# durable write is an O_DSYNC write, or a write and its fdatasync: its histogram is
# `weir_durable_write_duration_seconds`, or `weir_fdatasync_duration_seconds` when the broker
# synced in rounds; quantiles interpolated inside the histogram's buckets).
#
#   bench/half-load.sh                     # measure the maximum, then half of it, REPS=3
#   RATE=150000 REPS=5 bench/half-load.sh  # half-load runs at a given rate
#   PIN=1 bench/half-load.sh               # broker on CPU 1 with --shards 1, client on CPU 0
#
# Prints one line per run and a summary; keeps the JSON in $OUT (default
# bench/results/half-load-target.json). The machine should be otherwise idle.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
OUT=${OUT:-bench/results/half-load-target.json}
cargo build --release --quiet --bin broker --bin bench
bin=target/release

btask=(); ctask=(); bargs=()
if [ "${PIN:-0}" = 1 ]; then
  command -v taskset >/dev/null || { echo "taskset (util-linux) is needed for PIN=1" >&2; exit 1; }
  btask=(taskset -c 1); ctask=(taskset -c 0); bargs=(--shards 1)
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker=""; data=""
start_broker() {
  port=$(free_port); mport=$(free_port); data=$(mktemp -d)
  "${btask[@]}" "$bin/broker" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$mport \
    --data-dir "$data" --cache-bytes $((256 << 20)) "${bargs[@]}" > /tmp/weir-half-load-broker.log 2>&1 &
  broker=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && return; sleep 0.1; done
  echo "the broker did not start: /tmp/weir-half-load-broker.log" >&2; exit 1
}
stop_broker() { kill $broker; wait $broker 2>/dev/null || true; rm -rf "$data"; broker=""; }
trap '[ -n "$broker" ] && kill $broker 2>/dev/null; true' EXIT
produce() { # json, extra args...
  local json=$1; shift
  "${ctask[@]}" "$bin/bench" produce --bootstrap-server 127.0.0.1:$port --partitions 6 \
    --record-size 1024 --acks all --linger 20ms --duration ${SECONDS_PER_RUN}s --json "$json" "$@" > /dev/null 2>&1
}

work=$(mktemp -d)
if [ -z "${RATE:-}" ]; then
  start_broker
  produce "$work/max.json" --topic canonical
  stop_broker
  max=$(python3 -c "import json; print(int(json.load(open('$work/max.json'))['results'][0]['records_per_sec']))")
  RATE=$((max / 2))
  echo "maximum (canonical, ${SECONDS_PER_RUN} s): $max records/s; half: $RATE"
fi
for rep in $(seq "$REPS"); do
  start_broker
  produce "$work/half-$rep.json" --topic half --rate "$RATE"
  curl -s "127.0.0.1:$mport/metrics" > "$work/metrics-$rep.txt"
  stop_broker
done

python3 - "$work" "$REPS" "$RATE" "$OUT" "${PIN:-0}" <<'PY'
import json, re, sys
work, reps, rate, out, pin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"

def histogram(path, name, having=""):
    """Cumulative buckets {upper bound s: count} of `name`, summed over its label sets (those
    that contain `having`)."""
    b = {}
    for line in open(path):
        m = re.match(name + r'_bucket\{(.*)\} (\S+)', line)
        if m and having in m[1]:
            le = re.search(r'le="([^"]+)"', m[1])[1]
            k = float("inf") if le == "+Inf" else float(le)
            b[k] = b.get(k, 0.0) + float(m[2])
    return b

def quantile(b, q):
    """Linear interpolation inside the bucket that holds quantile q (as Prometheus does)."""
    bounds = sorted(b)
    total = b[bounds[-1]] if bounds else 0
    if total == 0:
        return None
    prev_le, prev_c = 0.0, 0.0
    for le in bounds:
        if b[le] >= q * total:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (q * total - prev_c) / max(b[le] - prev_c, 1e-12)
        prev_le, prev_c = le, b[le]
    return prev_le

runs = []
for rep in range(1, reps + 1):
    r = json.load(open(f"{work}/half-{rep}.json"))["results"][0]
    metrics = f"{work}/metrics-{rep}.txt"
    sync_name = "weir_durable_write_duration_seconds"
    sync = quantile(histogram(metrics, sync_name), 0.99)
    if sync is None:
        sync_name = "weir_fdatasync_duration_seconds"
        sync = quantile(histogram(metrics, sync_name), 0.99)
    produce_p99 = quantile(histogram(metrics, "weir_request_duration_seconds", 'api="Produce"'), 0.99)
    sync_ms = (sync or 0.0) * 1e3
    target_ms = 2 * sync_ms + 1
    run = {
        "rate": rate,
        "records_per_sec": r["records_per_sec"],
        "client_p50_ms": r["latency_ms"]["p50"],
        "client_p99_ms": r["latency_ms"]["p99"],
        "client_max_ms": r["latency_ms"]["max"],
        "sync_histogram": sync_name,
        "broker_produce_p99_ms": round((produce_p99 or 0.0) * 1e3, 3),
        "sync_p99_ms": round(sync_ms, 3),
        "target_ms": round(target_ms, 3),
        "met": r["latency_ms"]["p99"] <= target_ms,
    }
    runs.append(run)
    print(f"run {rep}: {run['records_per_sec']:.0f} records/s, client p50 {run['client_p50_ms']:.2f} ms, "
          f"p99 {run['client_p99_ms']:.2f} ms (max {run['client_max_ms']:.2f}); broker Produce p99 "
          f"{run['broker_produce_p99_ms']:.2f} ms; durable write p99 "
          f"{sync_ms:.2f} ms -> target {target_ms:.2f} ms: {'met' if run['met'] else 'missed'}")
met = sum(r["met"] for r in runs)
print(f"{met} of {len(runs)} runs within 2 x the durable-write p99 + 1 ms"
      f" ({'broker on CPU 1 --shards 1, client on CPU 0' if pin else 'nothing pinned'})")
json.dump({"pinned": pin, "runs": runs}, open(out, "w"), indent=2)
PY
rm -rf "$work"
