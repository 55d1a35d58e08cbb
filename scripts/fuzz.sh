#!/usr/bin/env bash
# Runs the cargo-fuzz targets for a bounded time and fails on a crash.
#
#   scripts/fuzz.sh [TOTAL_SECONDS]   (default 60, split evenly over the targets,
#                                      at least 5 s each: 8 targets take 40 s or more)
#
# The targets (vrio-core/fuzz; it also links vrio-rdma for the fabric's
# frames) cover every parser of bytes a peer controls:
#   walker, device    the virtqueue chain walker and device queue (guest)
#   remote_wire       remote::wire::Message::decode, with the round trip (agent/server)
#   soft_wire         the soft fabric's frame headers, vrio_rdma::soft::wire (fabric peer)
#   vhost_user_msg    the vhost-user relay's header and body parsing (VMM)
#   inflight          InflightRegion::from_peer over a memfd, and recovery from it (VMM)
#   blk_request       the virtio-blk request parser and the request run (guest)
#   net_tx            the TX virtio_net_hdr, partial checksum and frame checks (guest)
#
# Needs the nightly toolchain and cargo-fuzz (scripts/setup.sh installs both).
# Seeds are checked in under vrio-core/fuzz/seeds/<target>; the working corpus
# grows in vrio-core/fuzz/corpus/<target> (git-ignored). A crash leaves its
# input in vrio-core/fuzz/artifacts/<target>/ and makes this script exit 1.
set -euo pipefail

total=${1:-${FUZZ_SECONDS:-60}}
targets=(walker device remote_wire soft_wire vhost_user_msg inflight blk_request net_tx)
min_per=5
per=$(( total / ${#targets[@]} ))
(( per >= min_per )) || per=$min_per

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz_dir="$root/vrio-core/fuzz"
cd "$fuzz_dir"

# cargo-fuzz needs nightly features: use the nightly toolchain when the
# machine has one, otherwise the stable compiler with RUSTC_BOOTSTRAP=1.
if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
else
    echo "fuzz: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi
if ! "${fuzz[@]}" --version >/dev/null 2>&1; then
    echo "FUZZ FAILED: cargo-fuzz is not available (run scripts/setup.sh)" >&2
    exit 1
fi

target_dir=${CARGO_TARGET_DIR:-$fuzz_dir/target}
# The fuzz build uses sanitizer flags; keep it apart from normal builds.
target_dir="$target_dir/fuzz"

echo "fuzz: building ${targets[*]} (release, sanitizers)"
"${fuzz[@]}" build --target-dir "$target_dir"
mkdir -p "$target_dir"

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="$target_dir/$t.log"
    echo "fuzz: $t for ${per}s"
    if ! "${fuzz[@]}" run --target-dir "$target_dir" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$per" -print_final_stats=1 2>"$log"; then
        tail -n 40 "$log" >&2
        echo "FUZZ FAILED: target $t crashed; input saved under $fuzz_dir/artifacts/$t/" >&2
        status=1
    else
        grep -E "stat::number_of_executed_units|stat::new_units_added" "$log" | sed "s/^/fuzz: $t /"
    fi
done
exit $status
