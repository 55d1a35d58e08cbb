#!/bin/sh
# Guest script for live migration (migrate.sh; image FIO=1): the guest's
# disk stays busy while the host migrates it back and forth between two
# QEMUs, each with its own vrio-client in front of the same I/O server.
#
# Before the first migration:
#  - ext4 on the first fsmb MiB (96): mkfs, fscount (6) random files of
#    64 KiB to 2 MiB in /pre, their md5s;
#  - fio's region, fiomb MiB (64) at fiooff MiB (128), filled sequentially
#    with crc32c blocks and verified (every 4 KiB block then carries a
#    header, so the last read-back pass can check the whole region);
#  - in the background, fio randwrite 4 KiB, libaio, O_DIRECT, iodepth 16,
#    --verify=crc32c --verify_backlog=256 --verify_fatal=1, time based,
#    runtime fiort s (3600): it re-reads and checks what it wrote all the
#    time, so also across each migration.
# Then "MIGRATE GUEST READY io=1" (the host starts migrating), and until the
# host writes "VRIO HOST DONE" in the disk's last 4 KiB (read here with
# O_DIRECT every iteration), at most migmax s (300): a loop that writes a
# file of 64 to 256 KiB into /during, records its md5, syncs, drops the page
# cache and checks every file written so far ("MIGRATE LOOP it=N ...", one
# line per iteration, so the host sees the guest run on each side). With
# noio=1 the guest only prepares ext4 and then idles ("MIGRATE GUEST READY
# io=0", a 4 KiB read of the host's line every 2 s), for figures without
# I/O.
# At the end: fio stopped with SIGINT (fio exits 128 then; its job must
# report err=0 and no verify error), a read-back pass of the whole fio
# region with crc32c verify (fio --rw=read --verify=crc32c: the header and
# checksum of every 4 KiB block), every file's md5 after a remount, e2fsck
# -fn, and a kernel log without I/O errors; "MIGRATE GUEST OK".
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "VRIO[$(up)] $*"; }
FPID=; RPID=
fail() {
  log "FAIL $*"
  [ -n "$FPID" ] && kill -INT "$FPID" 2>/dev/null
  [ -n "$RPID" ] && touch /tmp/rd.stop
  dmesg | tail -30
  exit 1
}
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", a-b}'; }
FS=$(arg fsmb); FS=${FS:-96}
FIOOFF=$(arg fiooff); FIOOFF=${FIOOFF:-128}
FIOMB=$(arg fiomb); FIOMB=${FIOMB:-64}
FIORT=$(arg fiort); FIORT=${FIORT:-3600}
MAXS=$(arg migmax); MAXS=${MAXS:-300}
NOIO=$(arg noio); NOIO=${NOIO:-0}
NPRE=$(arg fscount); NPRE=${NPRE:-6}
MAXFILES=$(arg maxfiles); MAXFILES=${MAXFILES:-200}
RDOFF=$(arg rdoff); RDOFF=${RDOFF:-200}
RDMB=$(arg rdmb); RDMB=${RDMB:-32}

# sysrq w (blocked tasks) for the host's diagnosis of a stuck guest.
echo 1 > /proc/sys/kernel/sysrq
for m in virtio_pci virtio_blk crc32c_generic ext4; do modprobe $m || log "modprobe $m failed"; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || fail "no /dev/vda"
SECTORS=$(cat /sys/block/vda/size)
log "vda: $SECTORS sectors, $(ls /sys/block/vda/mq | wc -l) queue(s), migrate guest noio=$NOIO"
# The layout: ext4 | gap | fio region | ... | the host's last 4 KiB.
LAST=$((SECTORS / 8 - 1))
[ $(((FIOOFF + FIOMB) * 256)) -le $LAST ] || fail "fio's region ends past the disk's last 4 KiB"
[ $(((RDOFF + RDMB) * 256)) -le $LAST ] || fail "the reader's region ends past the disk's last 4 KiB"
[ $((FIOOFF + FIOMB)) -le "$RDOFF" ] || fail "the reader's region at $RDOFF MiB overlaps fio's"
[ "$FS" -le "$FIOOFF" ] || fail "ext4 (fsmb=$FS) overlaps fio's region at $FIOOFF MiB"
[ "$NOIO" = 1 ] || command -v fio > /dev/null || fail "fio missing from the initramfs (FIO=1)"
host_done() { dd if=/dev/vda bs=4096 skip=$LAST count=1 iflag=direct 2>/dev/null | grep -q "VRIO HOST DONE"; }
host_done && fail "the host's done line is already on the disk"
# A read from every CPU, so every vring runs.
c=0
while [ $c -lt "$(nproc)" ]; do
  taskset "$(printf %x $((1 << c)))" dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || fail "read on CPU $c"
  c=$((c + 1))
done
dmesg -c > /dev/null

# ext4 and the files written before any migration (absolute paths: busybox
# sh prefers its own mke2fs applet).
/usr/sbin/mke2fs -t ext4 -F -q /dev/vda ${FS}M || fail "mke2fs"
mount -t ext4 /dev/vda /mnt || fail "mount"
mkdir -p /mnt/pre /mnt/during
: > /tmp/sums
i=1
while [ $i -le "$NPRE" ]; do
  dd if=/dev/urandom of=/mnt/pre/f$i bs=64k count=$((i * i)) 2>/dev/null || fail "write /pre/f$i"
  (cd /mnt && md5sum pre/f$i) >> /tmp/sums || fail "md5 /pre/f$i"
  i=$((i + 1))
done
sync
log "PRE FILES $NPRE written, $(du -sk /mnt/pre | cut -f1) KiB"

# fio itself, not a function, runs in the background: $! is fio's pid.
FIOARGS="--filename=/dev/vda --ioengine=libaio --direct=1 --offset=${FIOOFF}M --size=${FIOMB}M --verify=crc32c --verify_fatal=1 --verify_state_save=0"
if [ "$NOIO" != 1 ]; then
  # Every 4 KiB block of the region gets a crc32c header (64 KiB writes,
  # verify_interval 4 KiB), checked at once.
  fio $FIOARGS --name=migfill --rw=write --bs=64k --verify_interval=4k --iodepth=8 > /tmp/fill.out 2>&1 ||
    { cat /tmp/fill.out; fail "fio fill of ${FIOMB} MiB at ${FIOOFF} MiB"; }
  log "FIO FILL OK ${FIOMB} MiB at ${FIOOFF} MiB (crc32c every 4 KiB, verified)"
  fio $FIOARGS --name=migverify --rw=randwrite --bs=4k --iodepth=16 --verify_backlog=256 \
    --time_based --runtime="$FIORT" > /tmp/fio.out 2>&1 &
  FPID=$!
  sleep 1
  kill -0 "$FPID" 2>/dev/null || { cat /tmp/fio.out; FPID=; fail "fio ended at once"; }
  log "FIO RUNNING pid=$FPID randwrite 4k iodepth 16 crc32c verify_backlog=256 on ${FIOMB} MiB at ${FIOOFF} MiB"
  # The reader: crc32c blocks it only reads, into buffers nothing but the
  # device writes (fio allocates them once). A read that completes after
  # QEMU's last copy of its buffer (while the vrings drain) and is not in
  # the dirty log reaches the destination as the buffer's old block: a bad
  # header or crc there.
  RDARGS="--filename=/dev/vda --ioengine=libaio --direct=1 --offset=${RDOFF}M --size=${RDMB}M --verify=crc32c --verify_fatal=1 --verify_state_save=0"
  fio $RDARGS --name=rdfill --rw=write --bs=64k --verify_interval=4k --iodepth=8 > /tmp/rdfill.out 2>&1 ||
    { cat /tmp/rdfill.out; fail "fio fill of the reader's ${RDMB} MiB at ${RDOFF} MiB"; }
  # A verifying read job makes one pass (fio ignores loops and time_based
  # there): passes in a loop, until the host is done.
  : > /tmp/rd.out
  (
    while [ ! -e /tmp/rd.stop ]; do
      fio $RDARGS --name=migreader --rw=randread --bs=4k --iodepth=8 > /tmp/rd.pass 2>&1
      rc=$?
      if [ $rc != 0 ] || ! grep -qE "err= *0:" /tmp/rd.pass ||
        grep -qiE "verify: bad|verify failed|bad magic|bad header|crc32c: verify" /tmp/rd.pass; then
        cat /tmp/rd.pass >> /tmp/rd.out
        exit 1
      fi
      sed -n 's/.*issued rwts: total=\([0-9]*\),.*/\1/p' /tmp/rd.pass | head -n1 >> /tmp/rd.reads
    done
  ) &
  RPID=$!
  sleep 1
  kill -0 "$RPID" 2>/dev/null || { cat /tmp/rd.out; RPID=; fail "the reader ended at once"; }
  log "FIO READER RUNNING pid=$RPID randread 4k iodepth 8 crc32c on ${RDMB} MiB at ${RDOFF} MiB"
fi

# The host starts migrating on this line.
log "MIGRATE GUEST READY io=$((1 - NOIO))"
T0=$(up); it=0; nfiles=0; hd=0
while :; do
  el=$(sub "$(up)" "$T0")
  if host_done; then hd=1; break; fi
  [ "$(awk -v e="$el" -v m="$MAXS" 'BEGIN{print (e>=m)}')" = 1 ] && break
  if [ "$NOIO" = 1 ]; then
    it=$((it + 1))
    [ $((it % 5)) = 1 ] && log "MIGRATE IDLE it=$it at=$el"
    sleep 2
    continue
  fi
  # fio stops only on our signal: earlier it found a verify error.
  if ! kill -0 "$FPID" 2>/dev/null; then
    wait "$FPID"; rc=$?; FPID=
    cat /tmp/fio.out
    fail "fio ended during the migrations (rc=$rc): a verify error?"
  fi
  if ! kill -0 "$RPID" 2>/dev/null; then
    wait "$RPID"; rc=$?; RPID=
    cat /tmp/rd.out
    fail "the reader ended during the migrations (rc=$rc): a verify error"
  fi
  t0=$(up)
  if [ $nfiles -lt "$MAXFILES" ]; then
    nfiles=$((nfiles + 1))
    dd if=/dev/urandom of=/mnt/during/f$nfiles bs=64k count=$((1 + nfiles % 4)) 2>/dev/null || fail "write /during/f$nfiles"
    (cd /mnt && md5sum during/f$nfiles) >> /tmp/sums || fail "md5 /during/f$nfiles"
    sync || fail "sync"
  fi
  # Read everything back from the disk, through the page cache.
  echo 3 > /proc/sys/vm/drop_caches
  (cd /mnt && md5sum -c /tmp/sums) > /tmp/check.out 2>&1 || { grep -v ': OK$' /tmp/check.out | head; fail "it=$it: a file differs from its md5"; }
  it=$((it + 1))
  log "MIGRATE LOOP it=$it at=$el files=$((NPRE + nfiles)) check=$(sub "$(up)" "$t0")s"
done
[ $hd = 1 ] || fail "the host did not say its migrations were over within ${MAXS} s ($it iterations)"
log "MIGRATE HOST DONE after $it iterations ($(sub "$(up)" "$T0") s)"

if [ "$NOIO" != 1 ]; then
  kill -0 "$FPID" 2>/dev/null || { wait "$FPID"; cat /tmp/fio.out; FPID=; fail "fio ended before the host was done"; }
  kill -0 "$RPID" 2>/dev/null || { wait "$RPID"; cat /tmp/rd.out; RPID=; fail "the reader ended before the host was done"; }
  # The pass under way ends, then the loop (a pass of 32 MiB takes up to
  # ~30 s with the host's read delay).
  touch /tmp/rd.stop
  n=0; while kill -0 "$RPID" 2>/dev/null && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
  kill -0 "$RPID" 2>/dev/null && { kill -KILL "$RPID"; RPID=; fail "the reader's pass did not end within 120 s"; }
  wait "$RPID"; rc=$?; RPID=
  [ $rc = 0 ] || { cat /tmp/rd.out; fail "the reader's verify failed (rc=$rc)"; }
  log "FIO READER OK passes=$(wc -l < /tmp/rd.reads) reads=$(awk '{n += $1} END {print n + 0}' /tmp/rd.reads) (every block's crc32c header as read)"
  kill -INT "$FPID"
  # fio finishes its requests in flight and ends within seconds.
  n=0; while kill -0 "$FPID" 2>/dev/null && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
  if kill -0 "$FPID" 2>/dev/null; then
    log "fio still runs 60 s after SIGINT: $(grep -E '^(State|SigIgn|SigCgt)' /proc/$FPID/status | tr '\n' ' ')"
    ps | grep -v grep | grep fio
    kill -TERM "$FPID"; sleep 10; kill -KILL "$FPID" 2>/dev/null
    FPID=; cat /tmp/fio.out; fail "fio did not stop on SIGINT"
  fi
  wait "$FPID"; rc=$?; FPID=
  # fio exits 128 when a signal ended it; its job must have no error.
  grep -E "err=|issued rwts|verify|READ:|WRITE:" /tmp/fio.out | sed 's/^/  fio: /'
  grep -qE "err= *0:" /tmp/fio.out || { cat /tmp/fio.out; fail "fio's job reported an error (rc=$rc)"; }
  if grep -qiE "verify failed|bad magic|bad header|crc32c: verify" /tmp/fio.out; then cat /tmp/fio.out; fail "fio verify error"; fi
  [ "$rc" = 0 ] || [ "$rc" = 128 ] || { cat /tmp/fio.out; fail "fio exit status $rc"; }
  IOS=$(sed -n 's/.*issued rwts: total=\([0-9]*\),\([0-9]*\).*/reads=\1 writes=\2/p' /tmp/fio.out | head -n1)
  log "FIO RUN OK rc=$rc ${IOS:-} (stopped by SIGINT; randwrite with verify_backlog, no verify error)"
  # Every block's header and crc32c, as the disk now holds them.
  fio $FIOARGS --name=migreadback --rw=read --bs=4k --iodepth=16 > /tmp/rb.out 2>&1 ||
    { cat /tmp/rb.out; fail "fio read-back verify of ${FIOMB} MiB at ${FIOOFF} MiB"; }
  log "FIO VERIFY-ONLY OK ${FIOMB} MiB at ${FIOOFF} MiB (read back, crc32c of every 4 KiB block)"
fi

# Every file, from the disk after a remount.
umount /mnt || fail "umount"
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt || fail "remount"
(cd /mnt && md5sum -c /tmp/sums) > /tmp/check.out 2>&1 || { grep -v ': OK$' /tmp/check.out | head; fail "files differ from their md5s after the remount"; }
log "FILES OK $(wc -l < /tmp/sums) file(s) match their md5s ($NPRE before, $nfiles during the migrations)"
umount /mnt || fail "second umount"
/usr/sbin/e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck found errors"; }
log "GUEST E2FSCK OK"
ERRS=$(dmesg | grep -iE "I/O error|blk_update_request|print_req_error|Buffer I/O|EXT4-fs error|EXT4-fs warning|journal.*abort|critical medium|timed out|hung_task")
[ -z "$ERRS" ] || fail "kernel log: $ERRS"
log "MIGRATE DMESG CLEAN"
log "MIGRATE GUEST OK"
