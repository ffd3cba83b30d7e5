#!/usr/bin/env bash
# Replication cost (issue #12): the canonical `bench produce --acks all --linger 20ms` (1 KiB
# records, 6 partitions) against a 3-broker cluster on this machine (`weir cluster start`, one
# shard per broker), once with an RF 3 topic and once with an RF 1
# topic on the same cluster. Writes bench/results/replication-rf{1,3}.{json,txt}.
# DURATION (seconds, default 30) sets each run's length.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
cargo build --release --quiet --bin broker --bin bench --bin weir
bin=target/release
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
trap '"$bin/weir" cluster stop --dir "$dir" > /dev/null 2>&1 || true; rm -rf "$dir"' EXIT
"$bin/weir" cluster start --nodes 3 --dir "$dir" --port $port --controller-port $((port + 10)) --shards 1 > /dev/null
b=127.0.0.1:$port,127.0.0.1:$((port + 1)),127.0.0.1:$((port + 2))
for rf in 3 1; do
  "$bin/bench" produce --bootstrap-server $b --topic rf$rf --partitions 6 --replication-factor $rf \
    --record-size 1024 --acks all --linger 20ms --duration "${DURATION:-30}s" \
    --json "$out/replication-rf$rf.json" > "$out/replication-rf$rf.txt" 2> /dev/null
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
r = {rf: json.load(open(f"{out}/replication-rf{rf}.json"))["results"][0] for rf in (1, 3)}
for rf in (1, 3):
    print(f"RF {rf}: {r[rf]['records_per_sec']:.0f} records/s, {r[rf]['mb_per_sec']:.1f} MB/s")
print(f"RF 3 / RF 1 = {r[3]['records_per_sec'] / r[1]['records_per_sec']:.2f}")
PY
