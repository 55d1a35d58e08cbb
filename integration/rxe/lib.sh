# Helpers of the host-side runners run-in-guest.sh and run-2guests.sh
# (sourced, not run). They use the runner's HERE, DIR, TMO, SMP, MEM and KVER.

# rxe_prepare NAME RUN-PREFIX GUEST-SCRIPT [BINARY...]
#   Picks the newest /boot kernel unless KVER is set, checks for QEMU, makes
#   a run directory RUN (DIR/RUN-PREFIX.XXXXXX) and builds the initramfs IMG
#   in it with GUEST-SCRIPT and the binaries. Exits 2 (as NAME) on failure.
rxe_prepare() {
  local name=$1 prefix=$2
  shift 2
  KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
  [ -n "$KVER" ] || { echo "$name: no /boot/vmlinuz-*-amd64 (run scripts/setup.sh)" >&2; exit 2; }
  command -v qemu-system-x86_64 >/dev/null || { echo "$name: qemu-system-x86_64 missing (run scripts/setup.sh)" >&2; exit 2; }
  mkdir -p "$DIR"
  RUN=$(mktemp -d "$DIR/$prefix.XXXXXX")
  IMG=$RUN/initramfs.cpio.gz
  KVER=$KVER "$HERE/build-initramfs.sh" "$IMG" "$@" || exit 2
}

# rxe_qemu SERIAL-LOG APPEND QEMU-ARG...
#   Boots KVER's kernel with IMG under TCG (TMO s at most, SMP vCPUs, MEM
#   MiB), kernel parameters APPEND, the network QEMU-ARGs, and the serial
#   console into SERIAL-LOG. Returns QEMU's status (124 on timeout).
rxe_qemu() {
  local log=$1 append=$2
  shift 2
  timeout "$TMO" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEM" \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$IMG" \
    -append "console=ttyS0 loglevel=4 panic=-1 $append" \
    "$@" \
    -display none -monitor none -serial "file:$log" -no-reboot
}

# rxe_seconds_since T0: seconds since T0 (from `date +%s.%N`), one decimal.
rxe_seconds_since() {
  awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN{printf "%.1f", a-b}'
}

# rxe_guest_rc SERIAL-LOG: the status the guest script reported
# (VRIO-GUEST-DONE rc=N), or nothing if it never did.
rxe_guest_rc() {
  tr -d '\r' < "$1" | sed -n 's/.*VRIO-GUEST-DONE rc=\([0-9]*\).*/\1/p' | tail -n1
}
