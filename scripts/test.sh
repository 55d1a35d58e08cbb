#!/bin/bash
# README command 2: the whole test suite, on a fresh Debian 12 machine as root.
# Installs what it needs (system packages, cargo-fuzz), then runs: format and
# lint checks, every unit/property/differential/integration test (QEMU guests
# included), the fuzz targets for a bounded time, and smoke runs of the
# benchmarks. Stops at the first failing step and says which; the summary at
# the end gives every step's wall time and the cargo test totals.
#
# Environment:
#   VRIO_TEST_HOGS=N   run the suite under CPU pressure: N busy loops run for
#                      the whole suite and stop when it ends (however it ends).
#                      This is how the suite is checked on a loaded machine;
#                      on a 2-core machine, 2 hogs double every step's time.
#   FUZZ_SECONDS=N     total time for the fuzz targets (default 60).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
SUMMARY=()
CARGO_TOTALS="cargo tests did not run"
HOGS=${VRIO_TEST_HOGS:-0}

if ! [[ "$HOGS" =~ ^[0-9]+$ ]]; then
  echo "test.sh: VRIO_TEST_HOGS must be a whole number, not '$HOGS'" >&2
  exit 2
fi
if (( HOGS > 0 )); then
  # Each hog spins until this script is gone, so none outlives it even when
  # the script is killed; the trap stops them at once on a normal exit.
  parent=$$
  HOG_PIDS=()
  for _ in $(seq "$HOGS"); do
    ( while kill -0 "$parent" 2>/dev/null; do :; done ) &
    HOG_PIDS+=($!)
  done
  trap 'kill "${HOG_PIDS[@]}" 2>/dev/null' EXIT
  echo "test.sh: $HOGS CPU hog(s) running for the whole suite (pids ${HOG_PIDS[*]})"
fi

summary() {
  echo
  echo "=== summary ($HOGS CPU hogs)"
  for s in "${SUMMARY[@]}"; do echo "  $s"; done
  echo "  $CARGO_TOTALS"
}

# run NAME COMMAND...: one step, timed; the first failure ends the suite.
run() {
  local name=$1; shift
  local t=$(date +%s)
  echo
  echo "=== [$(( t - T0 ))s] $name"
  "$@"
  local rc=$?
  local took=$(( $(date +%s) - t ))
  if (( rc != 0 )); then
    SUMMARY+=("$(printf '%-52s %5ss  FAILED (exit %s)' "$name" "$took" "$rc")")
    summary
    echo "=== [$(( $(date +%s) - T0 ))s] FAILED at step: $name"
    exit 1
  fi
  SUMMARY+=("$(printf '%-52s %5ss  ok' "$name" "$took")")
}

cargo_tests() {
  cargo test --workspace --no-fail-fast 2>&1 | tee target/test-output.txt
  local rc=${PIPESTATUS[0]}
  CARGO_TOTALS=$(grep -E '^test result:' target/test-output.txt |
    awk '{p+=$4; f+=$6} END {printf "cargo-tests: %d passed, %d failed", p, f}')
  echo "$CARGO_TOTALS"
  if (( rc != 0 )); then
    grep -E '^test .* FAILED$|^---- .* stdout ----$' target/test-output.txt | sed 's/^/  /'
  fi
  return "$rc"
}

etcd_tests() {
  cargo test -p vrio-control --features etcd --test etcd 2>&1 | tee target/test-etcd.txt
  local rc=${PIPESTATUS[0]}
  (( rc == 0 )) || return "$rc"
  # The etcd test must really have run against a server.
  grep -qE '^test result: ok\. [1-9]' target/test-etcd.txt
}

bench_smoke() {
  ./target/release/vrio-bench --seconds 0.2 --guests 1,4 --depths 1,32 --json target/bench-smoke.json &&
    ./target/release/vrio-bench net --seconds 0.3 --json target/netbench-smoke.json &&
    ./target/release/vrio-demo --guests 2 --requests 2000 &&
    # Two stock guests through dpdk-testpmd and through vrio, same run.
    NETMB=8 PINGS=3 bash integration/vhost/compare-net.sh ./target/release/vrio-server \
      ./target/release/vrio-client target/net-compare-smoke.json
}

mkdir -p target
run "setup: system packages and tools" bash scripts/setup.sh all
run "cargo fmt --check" cargo fmt --all -- --check
run "cargo clippy --all-targets -- -D warnings" cargo clippy --workspace --all-targets -q -- -D warnings
run "build release binaries" cargo build --workspace --release -q --bins
run "cargo test --workspace" cargo_tests
run "control plane against a real etcd (feature etcd)" etcd_tests
run "fuzz targets (bounded)" bash scripts/fuzz.sh
run "benchmark smoke runs" bench_smoke

summary
echo "=== done in $(( $(date +%s) - T0 ))s: all steps passed"
