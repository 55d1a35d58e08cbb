#!/bin/bash
# vrio (vrio-client vhost-user-blk -> soft fabric -> vrio-server) against
# qemu-storage-daemon's vhost-user-blk export, same guest, same dd runs
# (bench.sh), measured in the same invocation. Prints a table of MiB/s and
# the vrio/qsd ratio, and writes JSON. Under TCG both sides are dominated by
# emulation: read the ratios, not the absolute numbers.
#
# Usage: compare.sh VRIO-SERVER VRIO-CLIENT [OUT.json]
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:?usage: compare.sh VRIO-SERVER VRIO-CLIENT [OUT.json]}
CLIENT=${2:?vrio-client missing}
OUT=${3:-vhost-compare.json}
command -v qemu-storage-daemon > /dev/null || { echo "qemu-storage-daemon missing (qemu-utils; run scripts/setup.sh)"; exit 1; }
declare -A R
for b in qsd vrio; do
  log=$(BACKEND=$b CHECKS=0 NQ=${NQ:-1} "$HERE/run.sh" "$SERVER" "$CLIENT" "$HERE/bench.sh" 2>&1)
  grep -q "RESULT: PASS" <<< "$log" || { echo "$log" | tail -40; echo "compare: the $b run failed"; exit 1; }
  while read -r _ name mib secs; do R[$b.$name]="$mib $secs"; done < <(grep -a "^BENCH " <<< "$log" | tr -d '\r')
done
printf "%-22s %12s %12s %12s\n" workload "qsd MiB/s" "vrio MiB/s" "vrio/qsd"
json="["
sep=
for name in seq-write-1M-direct seq-read-1M-direct write-4k-direct-qd1 read-4k-direct-qd1 seq-read-buffered; do
  read -r mib qs <<< "${R[qsd.$name]:-0 0}"
  read -r _ vs <<< "${R[vrio.$name]:-0 0}"
  line=$(awk -v m="$mib" -v q="$qs" -v v="$vs" 'BEGIN{ qr = q > 0 ? m/q : 0; vr = v > 0 ? m/v : 0; printf "%.1f %.1f %.3f", qr, vr, (qr > 0 ? vr/qr : 0) }')
  read -r qr vr ratio <<< "$line"
  printf "%-22s %12s %12s %12s\n" "$name" "$qr" "$vr" "$ratio"
  json+="$sep{\"workload\":\"$name\",\"mib\":$mib,\"qsd_s\":$qs,\"vrio_s\":$vs,\"qsd_mib_s\":$qr,\"vrio_mib_s\":$vr,\"ratio\":$ratio}"
  sep=,
done
json+="]"
echo "$json" > "$OUT"
echo "compare: wrote $OUT"
