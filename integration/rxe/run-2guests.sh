#!/bin/bash
# Like run-in-guest.sh, but boots TWO guests whose virtio-net NICs are joined
# by QEMU's `-netdev dgram` over 127.0.0.1 (adapted from
# shared/lab/boot-rxe-2guests.sh). Both run the same GUEST-SCRIPT with
#   guest A: IP=10.0.4.1 ROLE=target
#   guest B: IP=10.0.4.2 ROLE=initiator PEER=10.0.4.1
#
# Usage: run-2guests.sh GUEST-SCRIPT [BINARY...]
# Env:   VRIO_RXE_DIR (/tmp/vrio-rxe), TMO (600), SMP (1), MEM (1024),
#        PORT (first of two UDP ports on 127.0.0.1; default from the pid)
# Exit:  0 if both scripts exit 0; else the initiator's status, or the
#        target's, 124 on timeout, 3 if a guest never reported.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
SCRIPT=${1:?usage: run-2guests.sh GUEST-SCRIPT [BINARY...]}
shift
DIR=${VRIO_RXE_DIR:-/tmp/vrio-rxe}
TMO=${TMO:-600}; SMP=${SMP:-1}; MEM=${MEM:-1024}
PORT=${PORT:-$((20000 + ($$ % 20000) * 2))}
rxe_prepare run-2guests run2 "$SCRIPT" "$@"

guest() {  # guest NAME LOCAL-PORT REMOTE-PORT MAC APPEND
  rxe_qemu "$RUN/$1.serial.log" "$5" \
    -netdev "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port=$2,remote.type=inet,remote.host=127.0.0.1,remote.port=$3" \
    -device virtio-net-pci,netdev=n0,mac="$4"
}
T0=$(date +%s.%N)
guest target "$PORT" $((PORT + 1)) 52:54:00:00:04:01 "vrioip=10.0.4.1 vriorole=target" & GA=$!
guest initiator $((PORT + 1)) "$PORT" 52:54:00:00:04:02 "vrioip=10.0.4.2 vriorole=initiator vriopeer=10.0.4.1" & GB=$!
wait $GB; RB=$?
wait $GA; RA=$?
SECS=$(rxe_seconds_since "$T0")
rm -f "$IMG"
for n in target initiator; do
  echo "==== guest $n"
  tr -d '\r' < "$RUN/$n.serial.log"
done
echo "run-2guests: qemu rc target=$RA initiator=$RB after ${SECS}s; logs in $RUN"
[ $RA -eq 124 ] || [ $RB -eq 124 ] && { echo "run-2guests: TIMEOUT after ${TMO}s"; exit 124; }
CA=$(rxe_guest_rc "$RUN/target.serial.log"); CB=$(rxe_guest_rc "$RUN/initiator.serial.log")
{ [ -n "$CA" ] && [ -n "$CB" ]; } || { echo "run-2guests: a guest never reported"; exit 3; }
[ "$CB" -ne 0 ] && exit "$CB"
exit "$CA"
