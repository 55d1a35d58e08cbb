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
SCRIPT=${1:?usage: run-in-guest.sh GUEST-SCRIPT [BINARY...]}
shift
DIR=${VRIO_RXE_DIR:-/tmp/vrio-rxe}
TMO=${TMO:-600}; SMP=${SMP:-2}; MEM=${MEM:-1024}
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
[ -n "$KVER" ] || { echo "run-in-guest: no /boot/vmlinuz-*-amd64 (run scripts/setup.sh)" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "run-in-guest: qemu-system-x86_64 missing (run scripts/setup.sh)" >&2; exit 2; }
mkdir -p "$DIR"
RUN=$(mktemp -d "$DIR/run.XXXXXX")
IMG=$RUN/initramfs.cpio.gz
LOG=$RUN/serial.log
KVER=$KVER "$HERE/build-initramfs.sh" "$IMG" "$SCRIPT" "$@" || exit 2

T0=$(date +%s.%N)
timeout "$TMO" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM" \
  -kernel "/boot/vmlinuz-$KVER" -initrd "$IMG" \
  -append "console=ttyS0 loglevel=4 panic=-1 vrioip=10.0.2.15 ${EXTRA_APPEND:-}" \
  -netdev user,id=n0,restrict=on -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 \
  -display none -monitor none -serial "file:$LOG" -no-reboot
QRC=$?
T1=$(date +%s.%N)
tr -d '\r' < "$LOG"
echo "run-in-guest: qemu rc=$QRC after $(awk -v a="$T1" -v b="$T0" 'BEGIN{printf "%.1f", a-b}')s; log $LOG"
rm -f "$IMG"   # keep the log, not the 10+ MB image
[ $QRC -eq 124 ] && { echo "run-in-guest: TIMEOUT after ${TMO}s"; exit 124; }
RC=$(tr -d '\r' < "$LOG" | sed -n 's/.*VRIO-GUEST-DONE rc=\([0-9]*\).*/\1/p' | tail -n1)
[ -n "$RC" ] || { echo "run-in-guest: guest never reported (boot failure?)"; exit 3; }
exit "$RC"
