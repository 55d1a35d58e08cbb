#!/bin/sh
# Guest script for the memory hot-plug test (run.sh HOTPLUG=MiB): boots
# with little RAM, says "HOTPLUG READY", waits until the host's pc-dimm is
# online (memhp_default_state=online, or onlined here through sysfs), then
# moves a random pattern of hpmb MiB (default 288, more than the boot RAM)
# with O_DIRECT in one dd block each way, so the buffers the device reads
# and writes must lie, at least in part, in the new memory. Checks md5s
# and a clean kernel log; prints "PATTERN md5=..." and "BLK CHECKS OK".
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
log() { echo "VRIO[$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() { log "FAIL $*"; dmesg | tail -30; exit 1; }
memtotal() { awk '/^MemTotal:/{print $2}' /proc/meminfo; }
MB=$(arg hpmb); MB=${MB:-288}

for m in virtio_pci virtio_blk; do modprobe $m || log "modprobe $m failed"; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
log "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s)"
# The queue stays at the kernel's depth: a full ring of 31-segment
# requests is more work requests than the I/O server's send queue holds,
# which it must post in parts.
log "nr_requests=$(cat /sys/block/vda/queue/nr_requests)"
# Some I/O on the boot memory first, so the vrings run when the table changes.
dd if=/dev/vda of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null || fail "first read"
dmesg -c > /dev/null
M0=$(memtotal)
# The host plugs the DIMM on this line.
log "HOTPLUG READY memtotal=${M0}kB"
n=0; M=$M0
while [ "$M" -le "$M0" ] && [ $n -lt 1800 ]; do
  for s in /sys/devices/system/memory/memory*/state; do
    grep -q offline "$s" 2>/dev/null && echo online > "$s" 2>/dev/null
  done
  sleep 0.1; n=$((n+1)); M=$(memtotal)
done
[ "$M" -gt "$M0" ] || fail "no memory was plugged"
log "HOTPLUG SEEN memtotal=${M}kB (boot ${M0}kB)"
[ $((MB * 1024)) -gt "$M0" ] || fail "hpmb=$MB MiB fits in the boot memory"

# /tmp (tmpfs) was sized from the boot memory.
mount -o remount,size=$((MB + 32))m /tmp || fail "remount /tmp"
dd if=/dev/urandom of=/tmp/pat bs=1M count=$MB 2>/tmp/err || fail "urandom: $(cat /tmp/err)"
P=$(md5sum /tmp/pat | cut -d' ' -f1)
dd if=/tmp/pat of=/dev/vda bs=${MB}M count=1 oflag=direct conv=fsync 2>/tmp/err || fail "write: $(cat /tmp/err)"
rm -f /tmp/pat
D=$(dd if=/dev/vda bs=${MB}M count=1 iflag=direct 2>/tmp/err | md5sum | cut -d' ' -f1)
grep -q "1+0 records in" /tmp/err || fail "direct read: $(cat /tmp/err)"
echo 3 > /proc/sys/vm/drop_caches
B=$(dd if=/dev/vda bs=1M count=$MB 2>/dev/null | md5sum | cut -d' ' -f1)
log "PATTERN md5=$P direct=$D buffered=$B (${MB} MiB in one ${MB} MiB O_DIRECT block, boot memory ${M0}kB)"
[ "$P" = "$D" ] || fail "O_DIRECT read-back differs"
[ "$P" = "$B" ] || fail "buffered read-back differs"
ERRS=$(dmesg | grep -iE 'I/O error|blk_update_request|print_req_error|critical .*error|timed out|hung_task')
[ -z "$ERRS" ] || fail "kernel log: $ERRS"
log "HOTPLUG DMESG CLEAN"
log "BLK CHECKS OK"
