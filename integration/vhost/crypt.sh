#!/bin/sh
# Guest script for an encrypted remote disk (run.sh with CRYPT_KEY, image
# FIO=1): the guest is unmodified and sees plaintext; only the I/O server's
# backing file holds ciphertext. Two phases, one per boot, on the same disk:
#  cryptphase=1 (a fresh disk):
#    1. fio randwrite 4 KiB with --verify=crc32c on fiomb MiB (16) at
#       fiooff MiB (160), O_DIRECT;
#    2. the marker (kernel parameter marker, default VRIO-PLAINTEXT-MARKER)
#       as lines, rawmb MiB (4) written with O_DIRECT at rawoff MiB (192)
#       and read back with O_DIRECT;
#    3. ext4 on the first fsmb MiB (128): mkfs, files (random ones and one
#       of marker lines), their md5s in /SUMS, sync, umount, mount, md5
#       check, e2fsck -fn;
#  cryptphase=2 (the disk of phase 1, a new attach): mount, md5 check of
#    every file against /SUMS, the marker file and the raw marker region
#    (O_DIRECT) as written, fio --verify_only of phase 1's job, e2fsck -fn.
# Both phases fail on an I/O error in the kernel log ("CRYPT DMESG CLEAN"),
# print "FILE /name md5=..." for every file and end with "CRYPT PHASE N OK"
# and "BLK CHECKS OK".
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
log() { echo "VRIO[$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() { log "FAIL $*"; dmesg | tail -20; exit 1; }
PHASE=$(arg cryptphase); PHASE=${PHASE:-1}
FS=$(arg fsmb); FS=${FS:-128}
FIOOFF=$(arg fiooff); FIOOFF=${FIOOFF:-160}
FIOMB=$(arg fiomb); FIOMB=${FIOMB:-16}
RAWOFF=$(arg rawoff); RAWOFF=${RAWOFF:-192}
RAWMB=$(arg rawmb); RAWMB=${RAWMB:-4}
MARKER=$(arg marker); MARKER=${MARKER:-VRIO-PLAINTEXT-MARKER}
[ "$FS" -gt 0 ] || fail "crypt.sh needs the ext4 part (fsmb > 0)"

for m in virtio_pci virtio_blk crc32c_generic ext4; do modprobe $m || log "modprobe $m failed"; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
command -v fio > /dev/null || fail "fio missing from the initramfs (FIO=1)"
log "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s), crypt phase $PHASE"
# A read from every CPU, so every vring runs (as blk.sh).
c=0
while [ $c -lt "$(nproc)" ]; do
  taskset "$(printf %x $((1 << c)))" dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || fail "read on CPU $c"
  c=$((c + 1))
done

# The same job in both phases: phase 2 re-reads what phase 1 wrote.
fio_job() {
  fio --name=cryptverify --filename=/dev/vda --ioengine=libaio --direct=1 \
    --rw=randwrite --bs=4k --iodepth=16 --offset=${FIOOFF}M --size=${FIOMB}M \
    --verify=crc32c --verify_fatal=1 --output-format=terse --terse-version=3 "$@" > /tmp/fio.out 2>&1
}
# The raw marker region as the guest wrote it.
yes "$MARKER" | head -c $((RAWMB * 1048576)) > /tmp/raw
RAWSUM=$(md5sum < /tmp/raw | cut -d' ' -f1)
# Ext4's marker file: 1 MiB of marker lines.
marker_file() { yes "$MARKER" | head -c 1048576; }
MARKSUM=$(marker_file | md5sum | cut -d' ' -f1)

dmesg_clean() {
  if dmesg | grep -iE "I/O error|blk_update_request|Buffer I/O|EXT4-fs error|EXT4-fs warning|journal.*abort|critical medium"; then
    fail "I/O errors in the kernel log"
  fi
  log "CRYPT DMESG CLEAN"
}

if [ "$PHASE" = 1 ]; then
  # 1. fio, writes then verifies every block (crc32c).
  fio_job || { cat /tmp/fio.out; fail "fio crc32c verify"; }
  log "FIO VERIFY OK ${FIOMB} MiB at ${FIOOFF} MiB (randwrite 4k, crc32c)"

  # 2. the raw marker, O_DIRECT
  dd if=/tmp/raw of=/dev/vda bs=1M seek=$RAWOFF oflag=direct conv=fsync 2>/dev/null || fail "raw marker write"
  D=$(dd if=/dev/vda bs=1M skip=$RAWOFF count=$RAWMB iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  log "RAW MARKER md5=$RAWSUM direct=$D (${RAWMB} MiB at ${RAWOFF} MiB)"
  [ "$RAWSUM" = "$D" ] || fail "raw marker read-back differs"

  # 3. ext4 (absolute paths: busybox sh prefers its own mke2fs applet)
  /usr/sbin/mke2fs -t ext4 -F -q /dev/vda ${FS}M || fail "mke2fs"
  mount -t ext4 /dev/vda /mnt || fail "mount"
  mkdir -p /mnt/dir/sub
  i=1
  while [ $i -le 4 ]; do
    dd if=/dev/urandom of=/mnt/dir/f$i bs=4k count=$((i * 300)) 2>/dev/null || fail "write f$i"
    i=$((i + 1))
  done
  dd if=/dev/urandom of=/mnt/big bs=1M count=16 2>/dev/null || fail "write big"
  marker_file > /mnt/marker.txt || fail "write marker.txt"
  echo "hello from the guest" > /mnt/dir/sub/hello
  (cd /mnt && md5sum big marker.txt dir/f* dir/sub/hello) > /tmp/sums
  cp /tmp/sums /mnt/SUMS || fail "write SUMS"
  sync
  umount /mnt || fail "umount"
  echo 3 > /proc/sys/vm/drop_caches
  mount -t ext4 /dev/vda /mnt || fail "remount"
  (cd /mnt && md5sum -c /tmp/sums) > /dev/null || fail "files differ after remount"
  grep -q " marker.txt$" /tmp/sums && [ "$(md5sum < /mnt/marker.txt | cut -d' ' -f1)" = "$MARKSUM" ] || fail "marker.txt"
  while read -r s f; do log "FILE /$f md5=$s"; done < /tmp/sums
  umount /mnt || fail "second umount"
  /usr/sbin/e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck found errors"; }
  log "GUEST E2FSCK OK"
  dmesg_clean
  log "CRYPT PHASE 1 OK"
  log "BLK CHECKS OK"
  exit 0
fi

[ "$PHASE" = 2 ] || fail "cryptphase=$PHASE: want 1 or 2"
# The disk of phase 1, read back through a new attach.
echo 3 > /proc/sys/vm/drop_caches
/usr/sbin/e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck found errors before mounting"; }
log "GUEST E2FSCK OK (before mounting)"
mount -t ext4 /dev/vda /mnt || fail "mount"
[ -s /mnt/SUMS ] || fail "no /SUMS in the file system"
(cd /mnt && md5sum -c SUMS) > /tmp/check.out 2>&1 || { cat /tmp/check.out; fail "files differ from phase 1's SUMS"; }
log "SUMS OK $(wc -l < /mnt/SUMS) file(s) match phase 1's md5s"
while read -r s f; do log "FILE /$f md5=$(md5sum < "/mnt/$f" | cut -d' ' -f1)"; done < /mnt/SUMS
[ "$(md5sum < /mnt/marker.txt | cut -d' ' -f1)" = "$MARKSUM" ] || fail "marker.txt is not the marker"
log "MARKER FILE OK $(grep -c "^$MARKER\$" /mnt/marker.txt) line(s)"
umount /mnt || fail "umount"
D=$(dd if=/dev/vda bs=1M skip=$RAWOFF count=$RAWMB iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
log "RAW MARKER md5=$RAWSUM direct=$D (${RAWMB} MiB at ${RAWOFF} MiB)"
[ "$RAWSUM" = "$D" ] || fail "the raw marker region differs from phase 1's"
fio_job --verify_only=1 || { cat /tmp/fio.out; fail "fio --verify_only of phase 1's blocks"; }
log "FIO VERIFY-ONLY OK ${FIOMB} MiB at ${FIOOFF} MiB (phase 1's blocks, crc32c)"
/usr/sbin/e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck found errors"; }
log "GUEST E2FSCK OK"
dmesg_clean
log "CRYPT PHASE 2 OK"
log "BLK CHECKS OK"
