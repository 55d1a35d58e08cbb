#!/bin/sh
# /init of the vrio rxe guest. Brings up eth0 with Soft-RoCE (rxe0), then runs
# /vrio/run.sh, which the harness embedded. Kernel parameters:
#   vrioip=A.B.C.D   eth0 address (default 10.0.2.15)
#   vriopeer=A.B.C.D the other guest (two-guest runs), exported as PEER
#   vriorole=NAME    exported as ROLE (two-guest runs)
# The script sees IP, PEER, ROLE; its exit status is printed as
# "VRIO-GUEST-DONE rc=N" before power-off.
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp

up()  { cut -d' ' -f1 /proc/uptime; }
log() { echo "VRIO[$(up)] $*"; }
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
fin() { log "VRIO-GUEST-DONE rc=$1"; sync; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }

IP=$(arg vrioip); IP=${IP:-10.0.2.15}
PEER=$(arg vriopeer); ROLE=$(arg vriorole)
export IP PEER ROLE RUST_BACKTRACE=1
log "init: kernel=$(uname -r) cpus=$(nproc) ip=$IP peer=$PEER role=$ROLE"

# rxe on 6.1 needs the crc32 crypto algorithm, which modules.dep omits.
for m in virtio_pci virtio_net crc32_generic rdma_rxe ib_uverbs rdma_ucm; do
  modprobe "$m" 2>&1 || log "modprobe $m FAILED"
done
ip link set lo up
ip link set eth0 up || { log "no eth0"; fin 1; }
ip addr add "$IP/24" dev eth0
rdma link add rxe0 type rxe netdev eth0 || { log "rdma link add failed"; fin 1; }
ibv_devices
# Show the GID table (index 1 is the RoCE v2 IPv4 entry on rxe).
for i in 0 1 2 3; do
  g=$(cat /sys/class/infiniband/rxe0/ports/1/gids/$i 2>/dev/null)
  t=$(cat /sys/class/infiniband/rxe0/ports/1/gid_attrs/types/$i 2>/dev/null)
  [ -n "$g" ] && [ "$g" != "0000:0000:0000:0000:0000:0000:0000:0000" ] && echo "gid[$i]=$g type=$t"
done
log "rxe0 up; running /vrio/run.sh"
cd /tmp
sh /vrio/run.sh; rc=$?
log "run.sh exit rc=$rc"
for c in completer_retry_err duplicate_request rcvd_rnr_err retry_exceeded_err; do
  f=/sys/class/infiniband/rxe0/ports/1/hw_counters/$c
  [ -f "$f" ] && echo "hw_counter $c=$(cat $f)"
done
fin $rc
