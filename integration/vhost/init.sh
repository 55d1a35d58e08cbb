#!/bin/sh
# /init of the vhost-user-blk guest: mounts the basics, runs /vrio/run.sh and
# prints "VRIO-GUEST-DONE rc=N" before power-off. Kernel parameters are
# exported to the script as-is through /proc/cmdline (see its arg()).
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

up()  { cut -d' ' -f1 /proc/uptime; }
log() { echo "VRIO[$(up)] $*"; }
fin() { log "VRIO-GUEST-DONE rc=$1"; sync; poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }

log "init: kernel=$(uname -r) cpus=$(nproc)"
cd /tmp
sh /vrio/run.sh; rc=$?
log "run.sh exit rc=$rc"
fin $rc
