#!/usr/bin/env bash
# Where a produce request waits, next to what the disk and the scheduler cost:
#   perf/offcpu.sh [SECONDS] [-- BENCH ARGS...]
# Starts a release broker on a free port with a temporary data directory and its metrics
# endpoint, runs the bench workload (default: the canonical `produce --acks all --linger 20ms
# --record-size 1024 --partitions 6`), and during its middle SECONDS (default 2) records
#   - the block layer (block:block_rq_issue / block_rq_complete): how long the device takes for
#     a data write (W), a metadata write (WM) and a cache flush (F), from issue to completion;
#   - the scheduler (perf sched): CPU time and wake-up delay (runnable, not running) per thread
#     group: the broker's shards, io_uring's io-wq workers (they run every fdatasync), kernel
#     workers, the client's threads.
# Then prints those next to the broker's own Produce stage means (weir_produce_stage_seconds,
# weir_fdatasync_duration_seconds, weir_request_duration_seconds) and the client's rate, and
# writes the text to perf/offcpu.txt. Installs linux-perf (Debian) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/args.sh
perf_args 2 "$@"
need_perf

cargo build --release --quiet --bin broker --bin bench
bin=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
data=$(mktemp -d)
work=$(mktemp -d)
"$bin/broker" --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$mport --data-dir "$data" > "$work/broker.log" 2>&1 &
broker=$!
cleanup() { kill $broker 2>/dev/null || true; wait $broker 2>/dev/null || true; rm -rf "$data" "$work"; }
trap cleanup EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

run_secs=$((2 * secs + 8))
"$bin/bench" "${bench_args[@]}" --bootstrap-server 127.0.0.1:$port --duration "${run_secs}s" > "$work/bench.out" 2>&1 &
client=$!
sleep 3
perf record -q -e block:block_rq_issue -e block:block_rq_complete -a -o "$work/block.data" -- sleep "$secs" 2>/dev/null
perf sched record -q -o "$work/sched.data" -- sleep "$secs" >/dev/null 2>&1
# io_uring's view (one second: these events are many): submission to completion per op, and
# which thread ran each fdatasync's bios.
perf record -q -e io_uring:io_uring_submit_req -e io_uring:io_uring_complete -e io_uring:io_uring_queue_async_work -e block:block_bio_queue -a -o "$work/uring.data" -- sleep 1 2>/dev/null
wait $client
curl -s "127.0.0.1:$mport/metrics" > "$work/metrics.txt"
perf script -i "$work/block.data" 2>/dev/null > "$work/block.txt"
perf sched latency -i "$work/sched.data" 2>/dev/null > "$work/sched.txt"
perf script -i "$work/uring.data" -F comm,tid,cpu,time,event,trace 2>/dev/null > "$work/uring.txt"

python3 - "$work" "$secs" "${bench_args[*]}" <<'PY' | tee perf/offcpu.txt
import collections, re, sys
work, secs, args = sys.argv[1], float(sys.argv[2]), sys.argv[3]
print(f"workload: bench {args}")
out = open(f"{work}/bench.out").read().strip().splitlines()
print("client:", out[-1] if out else "(no output)")

# Broker-side stage means.
s, c = {}, {}
for line in open(f"{work}/metrics.txt"):
    m = re.match(r'weir_produce_stage_seconds_(sum|count)\{stage="(\w+)"\} (\S+)', line)
    if m:
        (s if m[1] == "sum" else c)[m[2]] = float(m[3])
    m = re.match(r'weir_request_duration_seconds_(sum|count)\{api="Produce"\} (\S+)', line)
    if m:
        (s if m[1] == "sum" else c)["produce_request"] = float(m[2])
    m = re.match(r'weir_fdatasync_duration_seconds_(sum|count) (\S+)', line)
    if m:
        (s if m[1] == "sum" else c)["fdatasync"] = float(m[2])
print("\nbroker, mean per event (from /metrics, whole run):")
for k in ["produce_request", "frame_read", "append", "stored_wait", "disk_write", "fdatasync", "response_write"]:
    if c.get(k):
        print(f"  {k:16} {s[k] / c[k] * 1e6:8.0f} us   n={int(c[k])}")

# Device service times: issue -> complete per request, by type.
issued, flushes, lat, size = {}, collections.deque(), collections.defaultdict(list), collections.defaultdict(int)
for line in open(f"{work}/block.txt"):
    p = line.split()
    i = next((k for k, x in enumerate(p) if x.startswith("block:block_rq_")), None)
    if i is None:
        continue
    t = float(p[i - 1].rstrip(":"))
    ev, rwbs = p[i], p[i + 2]
    kind = "F" if rwbs.startswith("F") else ("WM" if "W" in rwbs and "M" in rwbs else ("W" if "W" in rwbs else "R"))
    rest = p[i + 3:]
    if "+" not in rest:
        continue
    j = rest.index("+")
    sector, n = rest[j - 1], int(rest[j + 1])
    if kind == "F" or n == 0:
        # Flushes carry no sector: pair them in order.
        if "issue" in ev:
            flushes.append(t)
        elif flushes:
            lat["F"].append(t - flushes.popleft())
        continue
    if "issue" in ev:
        issued[(kind, sector)] = t
        size[kind] += n * 512
    elif (kind, sector) in issued:
        lat[kind].append(t - issued.pop((kind, sector)))
print(f"\ndevice, issue -> complete ({secs:.0f} s of the run):")
names = {"W": "data write", "WM": "metadata write", "F": "cache flush", "R": "read"}
for k in ["W", "WM", "F", "R"]:
    v = sorted(lat.get(k, []))
    if not v:
        continue
    mean = sum(v) / len(v)
    extra = f"  avg {size[k] / len(v) / 1024:.0f} KiB" if size.get(k) else ""
    print(f"  {names[k]:15} {len(v) / secs:7.0f}/s  mean {mean * 1e6:6.0f} us  p50 {v[len(v) // 2] * 1e6:6.0f} us  p90 {v[int(len(v) * 0.9)] * 1e6:6.0f} us{extra}")

# io_uring: submission -> completion per opcode; fdatasyncs split by whether they wrote metadata.
sub, punted, per_op, events, fsyncs = {}, set(), collections.defaultdict(list), collections.defaultdict(list), []
for line in open(f"{work}/uring.txt"):
    m = re.match(r"\s*(\S+)\s+(\d+)\s+\[\d+\]\s+(\d+\.\d+):\s+(\S+?):\s(.*)", line)
    if not m:
        continue
    comm, tid, t, ev, rest = m[1], int(m[2]), float(m[3]), m[4].split(":")[-1], m[5]
    if comm.startswith("iou-wrk"):
        events[tid].append((t, ev, rest))
    req = re.search(r"(?:req|request) (0x[0-9a-f]+)", rest)
    if not req:
        continue
    req = req[1]
    if ev == "io_uring_submit_req":
        op = re.search(r"opcode (\w+)", rest)[1]
        if op in ("WRITE_FIXED", "WRITE", "FSYNC", "FALLOCATE", "READ_FIXED", "READ"):
            sub[req] = (t, op)
    elif ev == "io_uring_queue_async_work":
        punted.add(req)
    elif ev == "io_uring_complete" and req in sub:
        t0, op = sub.pop(req)
        per_op[op + (" (io-wq)" if req in punted else "")].append(t - t0)
        if op == "FSYNC" and comm.startswith("iou-wrk"):
            fsyncs.append((t0, t, tid))
        punted.discard(req)
def stats(v):
    v = sorted(v)
    return f"n {len(v):6}  mean {sum(v) / len(v) * 1e6:6.0f} us  p50 {v[len(v) // 2] * 1e6:6.0f} us  p90 {v[int(len(v) * 0.9)] * 1e6:6.0f} us" if v else "none"
print("\nio_uring, submission -> completion (1 s; WRITE/READ include sockets):")
for op, v in sorted(per_op.items(), key=lambda x: -len(x[1])):
    print(f"  {op:20} {stats(v)}")
wake, meta, plain = [], [], []
for t0, t1, tid in fsyncs:
    evs = [e for e in events[tid] if t0 <= e[0] <= t1]
    first = next((e for e in evs if e[1] == "block_bio_queue"), None)
    if first is None:
        continue
    wake.append(first[0] - t0)
    (meta if any(e[1] == "block_bio_queue" and "WSM" in e[2] for e in evs) else plain).append(t1 - t0)
print("  fdatasync: submission -> its io-wq worker's first bio:", stats(wake))
print("  fdatasync that wrote inode/extent metadata first:  ", stats(meta))
print("  fdatasync that only flushed:                      ", stats(plain))

# Scheduler: CPU time and wake-up delay by thread group.
groups = collections.defaultdict(lambda: [0.0, 0, 0.0, 0.0])
for line in open(f"{work}/sched.txt"):
    m = re.match(r"\s*(\S.*?):?(\d+|\(\d+\))?\s*\|\s*([\d.]+) ms\s*\|\s*(\d+)\s*\|\s*avg:\s*([\d.]+) ms\s*\|\s*max:\s*([\d.]+) ms", line)
    if not m:
        continue
    name = re.sub(r"[-:]?\d+$", "", m[1].split(":")[0])
    name = re.sub(r"^iou-wrk.*", "iou-wrk (io-wq)", name)
    name = re.sub(r"^kworker.*", "kworker", name)
    g = groups[name]
    runtime, switches, avg, mx = float(m[3]), int(m[4]), float(m[5]), float(m[6])
    g[0] += runtime
    g[1] += switches
    g[2] += avg * switches
    g[3] = max(g[3], mx)
print(f"\nscheduler ({secs:.0f} s): CPU and wake-up delay (runnable, waiting for a CPU) per thread group")
for name, (rt, sw, wsum, mx) in sorted(groups.items(), key=lambda x: -x[1][0])[:12]:
    if rt < 1:
        continue
    print(f"  {name:24} cpu {rt / secs / 10:5.1f}%  switches {sw / secs:7.0f}/s  delay avg {wsum / max(sw, 1) * 1000:5.0f} us  max {mx:6.2f} ms")
PY
