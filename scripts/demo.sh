#!/bin/bash
# README command 1: build vrio and run the demo (every I/O model, verified
# synthetic guests, one comparison table). Extra arguments go to vrio-demo
# (see `vrio-demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh build
echo "demo: building (release) ..."
cargo build --release -q -p vrio-examples --bin vrio-demo
exec ./target/release/vrio-demo "$@"
