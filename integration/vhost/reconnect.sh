#!/bin/sh
# Guest script for the reconnect test: continuous O_DIRECT I/O while the
# host kills and restarts the vhost-user back-end (run.sh KILLS=...) or
# moves its vrings (MOVES=...).
# Loop for at least rcsecs s (default 25) and 4 iterations: write one of four
# random patterns (blkmb MiB, default 8) at patoff MiB with O_DIRECT + fsync,
# read it back with O_DIRECT and compare md5s; iterations alternate CPUs, so
# every queue (one per CPU) carries I/O. With hostdone=1 (run.sh sets it with
# KILLS or MOVES) the loop also runs until the host, done with its kills or
# moves, writes "VRIO HOST DONE" in the disk's last 4 KiB (read here with
# O_DIRECT each iteration), at most rcmax s (default 200) in all.
# Any failed dd or mismatch fails at once; at the end the kernel log must
# hold no I/O error. Prints per-iteration timings ("RC it=..."; the line ends
# after the iteration's dds, so the host sees when the guest is inside
# them), the slowest dd (the stall a restart cost), "PATTERN md5=..." of the
# last pattern for the host, and "BLK CHECKS OK".
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "VRIO[$(up)] $*"; }
fail() { log "FAIL $*"; dmesg | tail -30; exit 1; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a-b}'; }
max() { awk -v a="$1" -v b="$2" 'BEGIN{print (a>b)?a:b}'; }
MB=$(arg blkmb); MB=${MB:-8}
OFF=$(arg patoff); OFF=${OFF:-192}
SECS=$(arg rcsecs); SECS=${SECS:-25}
MAXS=$(arg rcmax); MAXS=${MAXS:-200}
HOSTWAIT=$(arg hostdone)
MINIT=4

for m in virtio_pci virtio_blk; do modprobe $m || log "modprobe $m failed"; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
log "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s), features $(cat /sys/bus/virtio/devices/*/features 2>/dev/null | head -n1)"

# The host's "done" line, in the disk's last 4 KiB.
LAST=$(($(cat /sys/block/vda/size) / 8 - 1))
host_done() { dd if=/dev/vda bs=4096 skip=$LAST count=1 iflag=direct 2>/dev/null | grep -q "VRIO HOST DONE"; }
# Runs a command on CPU it % ncpu: blk-mq sends each CPU's requests to its
# own queue, so alternating CPUs puts I/O on every vring (the tests count
# each vring's attach by every client, and moves hand over attached ones).
NCPU=$(nproc)
pin() {
  if command -v taskset > /dev/null; then taskset "$(printf %x $((1 << (it % NCPU))))" "$@"; else "$@"; fi
}

for i in 0 1 2 3; do
  dd if=/dev/urandom of=/tmp/p$i bs=1M count=$MB 2>/dev/null || fail "urandom"
  md5sum < /tmp/p$i | cut -d' ' -f1 > /tmp/p$i.md5
done
dmesg -c > /dev/null
# The host starts its kill timer on this line.
log "RECONNECT IO START (${MB} MiB at ${OFF} MiB, at least ${SECS} s)"
T0=$(up); it=0; maxw=0; maxr=0; slow=0; hd=1
[ "$HOSTWAIT" = 1 ] && hd=0
# Until rcsecs s, MINIT iterations and the host's events are all done: a
# fast guest must not stop before the host's kills or moves, a slow one
# must still make its iterations.
while :; do
  el=$(sub "$(up)" "$T0")
  [ "$(awk -v e="$el" -v s="$SECS" 'BEGIN{print (e>=s)}')" = 1 ] && [ $it -ge $MINIT ] && [ $hd = 1 ] && break
  if [ "$(awk -v e="$el" -v m="$MAXS" 'BEGIN{print (e>=m)}')" = 1 ]; then
    [ $hd = 1 ] || fail "the host did not say its kills or moves were over within ${MAXS} s ($it iterations)"
    fail "only $it iterations in ${el} s (at least $MINIT)"
  fi
  i=$((it % 4))
  at=$el; t0=$(up)
  # The line ends after this iteration's dds (only they run meanwhile).
  printf 'RC it=%s' "$it"
  pin dd if=/tmp/p$i of=/dev/vda bs=1M seek=$OFF oflag=direct conv=fsync 2>/tmp/err || { echo; fail "write it=$it: $(cat /tmp/err)"; }
  t1=$(up)
  pin dd if=/dev/vda of=/tmp/r bs=1M skip=$OFF count=$MB iflag=direct 2>/tmp/err || { echo; fail "read it=$it: $(cat /tmp/err)"; }
  t2=$(up)
  w=$(sub "$t1" "$t0"); r=$(sub "$t2" "$t1")
  now=
  if [ $hd = 0 ] && host_done; then hd=1; now=1; fi
  echo " at=$at w=$w r=$r"
  [ -n "$now" ] && log "RECONNECT HOST DONE after $((it + 1)) iterations"
  P=$(cat /tmp/p$i.md5); D=$(md5sum < /tmp/r | cut -d' ' -f1)
  [ "$P" = "$D" ] || fail "it=$it: read back $D, wrote $P"
  maxw=$(max "$maxw" "$w"); maxr=$(max "$maxr" "$r")
  [ "$(awk -v a="$w" -v b="$r" 'BEGIN{print (a+b>1.5)}')" = 1 ] && slow=$((slow + 1))
  it=$((it + 1))
done
rm -f /tmp/r
[ $it -ge $MINIT ] || fail "only $it iterations"
ERRS=$(dmesg | grep -iE 'I/O error|blk_update_request|print_req_error|critical .*error|timed out|hung_task')
[ -z "$ERRS" ] || fail "kernel log: $ERRS"
log "RECONNECT DMESG CLEAN"
log "RECONNECT STATS iterations=$it max_write=${maxw}s max_read=${maxr}s slow_iterations=$slow"
# The last pattern, O_DIRECT and buffered, for the host's backing-file check.
last=$(((it - 1) % 4))
P=$(cat /tmp/p$last.md5)
D=$(dd if=/dev/vda bs=1M skip=$OFF count=$MB iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo 3 > /proc/sys/vm/drop_caches
B=$(dd if=/dev/vda bs=1M skip=$OFF count=$MB 2>/dev/null | md5sum | cut -d' ' -f1)
log "PATTERN md5=$P direct=$D buffered=$B (${MB} MiB at ${OFF} MiB, pattern $last after $it iterations)"
[ "$P" = "$D" ] || fail "final O_DIRECT read-back differs"
[ "$P" = "$B" ] || fail "final buffered read-back differs"
log "BLK CHECKS OK"
