#!/usr/bin/env bash
# Runs Weir's whole test suite on a fresh machine: installs the system packages it needs
# (scripts/setup.sh), then every unit and end-to-end test in the workspace. The Java client
# test fetches kafka-clients from PyPI itself (scripts/java-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The end-to-end tests start the real broker binary; build it first so they find it.
cargo build --bin broker
cargo test --workspace -- --test-threads=2
