#!/bin/sh
# Guest script: the stock virtio_blk driver on vhost-user-blk-pci.
#  1. a random pattern (blkmb MiB, default 64) written with O_DIRECT at
#     patoff MiB (default 192), read back with O_DIRECT and buffered;
#  2. ext4 on the first fsmb MiB (default 128; 0 skips it): mkfs, write
#     files, sync, umount, mount, check, e2fsck -n.
# Prints "PATTERN md5=..." and "FILE name md5=..." for the host to check the
# server's backing file, and "BLK CHECKS OK" when everything matched.
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
log() { echo "VRIO[$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() { log "FAIL $*"; dmesg | tail -20; exit 1; }
MB=$(arg blkmb); MB=${MB:-64}
OFF=$(arg patoff); OFF=${OFF:-192}
FS=$(arg fsmb); FS=${FS:-128}

for m in virtio_pci virtio_blk crc32c_generic ext4; do modprobe $m || log "modprobe $m failed"; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
log "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s), features $(cat /sys/bus/virtio/devices/*/features 2>/dev/null | head -n1)"
# A read from every CPU: blk-mq sends each CPU's requests to its own queue,
# so every vring runs in every boot (the tests count each one's attaches).
if command -v taskset > /dev/null; then
  c=0
  while [ $c -lt "$(nproc)" ]; do
    taskset "$(printf %x $((1 << c)))" dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || fail "read on CPU $c"
    c=$((c + 1))
  done
fi

# 1. pattern
dd if=/dev/urandom of=/tmp/pat bs=1M count=$MB 2>/dev/null || fail "urandom"
P=$(md5sum /tmp/pat | cut -d' ' -f1)
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/pat of=/dev/vda bs=1M seek=$OFF oflag=direct conv=fsync 2>/dev/null || fail "pattern write"
t1=$(cut -d' ' -f1 /proc/uptime)
rm -f /tmp/pat
D=$(dd if=/dev/vda bs=1M skip=$OFF count=$MB iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
t2=$(cut -d' ' -f1 /proc/uptime)
echo 3 > /proc/sys/vm/drop_caches
B=$(dd if=/dev/vda bs=1M skip=$OFF count=$MB 2>/dev/null | md5sum | cut -d' ' -f1)
log "PATTERN md5=$P direct=$D buffered=$B (${MB} MiB at ${OFF} MiB; write ${t0}->${t1} s, direct read ->${t2} s)"
[ "$P" = "$D" ] || fail "O_DIRECT read-back differs"
[ "$P" = "$B" ] || fail "buffered read-back differs"

# 2. ext4 (absolute paths: busybox sh prefers its own mke2fs applet)
if [ "$FS" = 0 ]; then log "ext4 skipped (fsmb=0)"; log "BLK CHECKS OK"; exit 0; fi
/usr/sbin/mke2fs -t ext4 -F -q /dev/vda ${FS}M || fail "mke2fs"
mount -t ext4 /dev/vda /mnt || fail "mount"
mkdir -p /mnt/dir/sub
i=1
while [ $i -le 6 ]; do
  dd if=/dev/urandom of=/mnt/dir/f$i bs=4k count=$((i * 300)) 2>/dev/null || fail "write f$i"
  i=$((i + 1))
done
dd if=/dev/urandom of=/mnt/big bs=1M count=24 2>/dev/null || fail "write big"
echo "hello from the guest" > /mnt/dir/sub/hello
(cd /mnt && md5sum big dir/f* dir/sub/hello) > /tmp/sums
sync
umount /mnt || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || fail "remount"
(cd /mnt && md5sum -c /tmp/sums) || fail "files differ after remount"
while read -r s f; do log "FILE /$f md5=$s"; done < /tmp/sums
umount /mnt || fail "second umount"
/usr/sbin/e2fsck -fn /dev/vda || fail "e2fsck found errors"
log "BLK CHECKS OK"
