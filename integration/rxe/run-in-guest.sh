#!/bin/bash
# Runs a script inside a QEMU (TCG) guest with Soft-RoCE and returns its exit
# status. The guest's serial output goes to a log and is echoed at the end.
#
# Usage: run-in-guest.sh GUEST-SCRIPT [BINARY...]
#   GUEST-SCRIPT runs as /vrio/run.sh with IP set (rxe0 over eth0 = $IP);
#   BINARY files are copied to /usr/bin in the guest.
# Env:   VRIO_RXE_DIR (work dir, default /tmp/vrio-rxe), TMO (guest time limit,
#        s, default 600), SMP (2), MEM (1024), KVER
# Exit:  the guest script's status; 124 on timeout; 3 if the guest never
#        reported (boot failure).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$HERE/lib.sh"
SCRIPT=${1:?usage: run-in-guest.sh GUEST-SCRIPT [BINARY...]}
shift
DIR=${VRIO_RXE_DIR:-/tmp/vrio-rxe}
TMO=${TMO:-600}; SMP=${SMP:-2}; MEM=${MEM:-1024}
rxe_prepare run-in-guest run "$SCRIPT" "$@"
LOG=$RUN/serial.log

T0=$(date +%s.%N)
rxe_qemu "$LOG" "vrioip=10.0.2.15 ${EXTRA_APPEND:-}" \
  -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
QRC=$?
SECS=$(rxe_seconds_since "$T0")
tr -d '\r' < "$LOG"
echo "run-in-guest: qemu rc=$QRC after ${SECS}s; log $LOG"
rm -f "$IMG"   # keep the log, not the 10+ MB image
[ $QRC -eq 124 ] && { echo "run-in-guest: TIMEOUT after ${TMO}s"; exit 124; }
RC=$(rxe_guest_rc "$LOG")
[ -n "$RC" ] || { echo "run-in-guest: guest never reported (boot failure?)"; exit 3; }
exit "$RC"
