#!/usr/bin/env bash
# Produces bench/results/: this machine's ceilings, the canonical
# `bench produce --acks all --linger 20ms` run (1 KiB records, 6 partitions), the same at half
# its throughput (open loop), a linger x batch-size x compression sweep with its plot, and the
# broker's memory under a sustained overload. Notes the commit measured.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
cargo build --release --quiet --bin broker --bin bench
bin=target/release
git rev-parse HEAD > "$out/commit.txt"
bash bench/ceilings.sh > /dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start_broker() { # cache bytes
  port=$(free_port); data=$(mktemp -d)
  "$bin/broker" --listen 127.0.0.1:$port --data-dir "$data" --cache-bytes "$1" > "$out/broker.log" 2>&1 &
  broker=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
}
stop_broker() { kill $broker; wait $broker 2>/dev/null || true; rm -rf "$data"; }
trap 'kill $broker 2>/dev/null || true' EXIT

start_broker $((256 << 20))
b=127.0.0.1:$port
"$bin/bench" produce --bootstrap-server $b --topic canonical --partitions 6 --record-size 1024 --acks all --linger 20ms \
  --duration 30s --json "$out/canonical.json" > "$out/canonical.txt" 2> "$out/canonical.progress"
rps=$(python3 -c "import json; print(int(json.load(open('$out/canonical.json'))['results'][0]['records_per_sec']))")
"$bin/bench" produce --bootstrap-server $b --topic half --partitions 6 --record-size 1024 --acks all --linger 20ms \
  --rate $((rps / 2)) --duration 30s --json "$out/half-load.json" > "$out/half-load.txt" 2> "$out/half-load.progress"
"$bin/bench" produce --bootstrap-server $b --topic sweep --partitions 6 --record-size 1024 --acks all --duration 4s \
  --sweep linger=0,5,20,100 --sweep batch-size=16k,128k,1m --sweep compression=none,lz4,zstd \
  --json "$out/sweep.json" --plot "$out/sweep.svg" > "$out/sweep.txt" 2> "$out/sweep.progress"
"$bin/bench" produce --bootstrap-server $b --topic canonical-rdkafka --partitions 6 --record-size 1024 --acks all --linger 20ms \
  --client librdkafka --duration 30s --json "$out/canonical-librdkafka.json" > "$out/canonical-librdkafka.txt" 2> /dev/null
stop_broker

# Overload: 4 producers as fast as possible against a 64 MiB cache; sample the broker's RSS.
start_broker $((64 << 20))
b=127.0.0.1:$port
( peak=0; while kill -0 $broker 2>/dev/null; do
    r=$(awk '/VmRSS/ {print $2}' /proc/$broker/status 2>/dev/null || echo 0); [ "${r:-0}" -gt "$peak" ] && peak=$r
    echo $peak > "$out/.peak_rss_kb"; sleep 0.2; done ) &
sampler=$!
"$bin/bench" produce --bootstrap-server $b --topic overload --partitions 6 --record-size 1024 --acks 1 --linger 5ms \
  --producers 4 --duration 30s --json "$out/overload.json" > "$out/overload.txt" 2> /dev/null
sleep 0.5
peak=$(cat "$out/.peak_rss_kb"); rm -f "$out/.peak_rss_kb"
kill $sampler 2>/dev/null || true
python3 - "$out" "$peak" <<'PY'
import json, sys
out, peak = sys.argv[1], int(sys.argv[2])
o = json.load(open(f"{out}/overload.json"))["results"][0]
json.dump({"cache_bytes": 64 << 20, "peak_rss_bytes": peak * 1024, "records": o["records"], "mb_per_sec": o["mb_per_sec"]}, open(f"{out}/overload-memory.json", "w"), indent=2)
PY
stop_broker
echo "results in $out (commit $(cat $out/commit.txt))"
