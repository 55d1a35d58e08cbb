#!/bin/bash
# README command 2: the whole test suite, on a fresh Debian 12 machine as root.
# Installs what it needs (system packages, cargo-fuzz), then runs: format and
# lint checks, every unit/property/differential/integration test (QEMU guests
# included), the fuzz targets for a bounded time, and smoke runs of the
# benchmarks. Stops at the first failing step and says which.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

step "setup: system packages and tools"
bash scripts/setup.sh all

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -q -- -D warnings

step "build release binaries (used by integration tests and QEMU guests)"
cargo build --workspace --release -q --bins

step "cargo test --workspace"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
grep -E '^test result:' target/test-output.txt | awk '{p+=$4; f+=$6} END {print "all cargo tests:", p, "passed,", f, "failed"}'

step "control plane against a real etcd (feature etcd)"
cargo test -p vrio-control --features etcd --test etcd 2>&1 | tee target/test-etcd.txt
grep -qE '^test result: ok\. [1-9]' target/test-etcd.txt

step "fuzz targets (bounded)"
bash scripts/fuzz.sh

step "benchmark smoke runs"
./target/release/vrio-bench --seconds 0.2 --guests 1,4 --depths 1,32 --json target/bench-smoke.json
./target/release/vrio-netbench --seconds 0.3 --json target/netbench-smoke.json
./target/release/vrio-demo --guests 2 --requests 2000
# Two stock guests through dpdk-testpmd and through vrio, same run.
NETMB=8 PINGS=3 bash integration/vhost/compare-net.sh ./target/release/vrio-server \
  ./target/release/vrio-client target/net-compare-smoke.json

step "done in $(( $(date +%s) - T0 ))s: all steps passed"
