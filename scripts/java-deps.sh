#!/usr/bin/env bash
# Fetches the Java reference client (kafka-clients 3.9.1 and its compression and slf4j jars)
# from the PyPI wheel that ships them, into target/java-deps/. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/java-deps
if [ -f "$dest/kafka-clients.jar" ]; then exit 0; fi
mkdir -p "$dest"
tmp=$(mktemp -d)
python3 -m pip download --quiet --no-deps -d "$tmp" shigawire-apache-flink-libraries
python3 - "$tmp" "$dest" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
z = zipfile.ZipFile(whl)
for name in ["kafka-clients.jar", "lz4-java.jar", "snappy-java.jar", "zstd-jni.jar", "slf4j-api.jar"]:
    with open(f"{sys.argv[2]}/{name}", "wb") as out:
        out.write(z.read(f"pyflink/lib/{name}"))
PY
rm -rf "$tmp"
