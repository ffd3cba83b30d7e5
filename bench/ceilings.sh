#!/usr/bin/env bash
# Measures this machine's ceilings, so bench results read as a fraction of the hardware:
#   loopback TCP throughput (iperf3) and O_DIRECT sequential write with fdatasync (fio).
# Writes bench/results/ceilings.json. Installs iperf3 and fio from Debian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=(); command -v iperf3 >/dev/null || need+=(iperf3); command -v fio >/dev/null || need+=(fio)
if [ ${#need[@]} -gt 0 ]; then $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null; fi
mkdir -p bench/results
iperf3 -s -1 -p 5299 >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p 5299 -t 10 -J > /tmp/iperf.json
dir=$(mktemp -d -p "${TMPDIR:-/tmp}")
# Sequential 1 MiB O_DIRECT writes (throughput), then 4 KiB writes each followed by fdatasync
# (the latency an acks=all group commit pays at least once).
fio --name=seq --directory="$dir" --rw=write --bs=1m --size=2g --direct=1 --ioengine=io_uring --iodepth=8 --output-format=json > /tmp/fio-seq.json
fio --name=sync --directory="$dir" --rw=write --bs=4k --size=64m --direct=1 --fdatasync=1 --ioengine=sync --runtime=10 --time_based --output-format=json > /tmp/fio-sync.json
rm -rf "$dir"
python3 - <<'PY'
import json
ip = json.load(open("/tmp/iperf.json"))
seq = json.load(open("/tmp/fio-seq.json"))["jobs"][0]["write"]
sync = json.load(open("/tmp/fio-sync.json"))["jobs"][0]
sync_lat = sync.get("sync", {}).get("lat_ns", {}).get("percentile", {})
out = {
    "loopback_tcp_mb_per_sec": ip["end"]["sum_received"]["bits_per_second"] / 8 / 1e6,
    "odirect_seq_write_mb_per_sec": seq["bw_bytes"] / 1e6,
    "fdatasync_p50_ms": sync_lat.get("50.000000", 0) / 1e6,
    "fdatasync_p99_ms": sync_lat.get("99.000000", 0) / 1e6,
    "fdatasync_per_sec": sync["write"]["iops"],
}
json.dump(out, open("bench/results/ceilings.json", "w"), indent=2)
print(json.dumps(out, indent=2))
PY
