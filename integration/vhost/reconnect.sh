#!/bin/sh
# Guest script for the reconnect test: continuous O_DIRECT I/O while the
# host kills and restarts the vhost-user back-end (run.sh KILLS=...).
# Loop for rcsecs s (default 25): write one of four random patterns (blkmb
# MiB, default 8) at patoff MiB with O_DIRECT + fsync, read it back with
# O_DIRECT and compare md5s. Any failed dd or mismatch fails at once; at the
# end the kernel log must hold no I/O error. Prints per-iteration timings
# ("RC it=..."), the slowest dd (the stall a restart cost), "PATTERN md5=..."
# of the last pattern for the host, and "BLK CHECKS OK".
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "VRIO[$(up)] $*"; }
fail() { log "FAIL $*"; dmesg | tail -30; exit 1; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a-b}'; }
max() { awk -v a="$1" -v b="$2" 'BEGIN{print (a>b)?a:b}'; }
MB=$(arg blkmb); MB=${MB:-8}
OFF=$(arg patoff); OFF=${OFF:-192}
SECS=$(arg rcsecs); SECS=${SECS:-25}

for m in virtio_pci virtio_blk; do modprobe $m || log "modprobe $m failed"; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
log "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s), features $(cat /sys/bus/virtio/devices/*/features 2>/dev/null | head -n1)"

for i in 0 1 2 3; do
  dd if=/dev/urandom of=/tmp/p$i bs=1M count=$MB 2>/dev/null || fail "urandom"
  md5sum < /tmp/p$i | cut -d' ' -f1 > /tmp/p$i.md5
done
dmesg -c > /dev/null
# The host starts its kill timer on this line.
log "RECONNECT IO START (${MB} MiB at ${OFF} MiB, ${SECS} s)"
T0=$(up); it=0; maxw=0; maxr=0; slow=0
while [ "$(awk -v a="$(up)" -v b="$T0" -v s="$SECS" 'BEGIN{print (a-b<s)}')" = 1 ]; do
  i=$((it % 4))
  t0=$(up)
  dd if=/tmp/p$i of=/dev/vda bs=1M seek=$OFF oflag=direct conv=fsync 2>/tmp/err || fail "write it=$it: $(cat /tmp/err)"
  t1=$(up)
  dd if=/dev/vda of=/tmp/r bs=1M skip=$OFF count=$MB iflag=direct 2>/tmp/err || fail "read it=$it: $(cat /tmp/err)"
  t2=$(up)
  P=$(cat /tmp/p$i.md5); D=$(md5sum < /tmp/r | cut -d' ' -f1)
  w=$(sub "$t1" "$t0"); r=$(sub "$t2" "$t1")
  echo "RC it=$it at=$(sub "$t0" "$T0") w=$w r=$r"
  [ "$P" = "$D" ] || fail "it=$it: read back $D, wrote $P"
  maxw=$(max "$maxw" "$w"); maxr=$(max "$maxr" "$r")
  [ "$(awk -v a="$w" -v b="$r" 'BEGIN{print (a+b>1.5)}')" = 1 ] && slow=$((slow + 1))
  it=$((it + 1))
done
rm -f /tmp/r
[ $it -ge 4 ] || fail "only $it iterations"
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
