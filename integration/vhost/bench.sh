#!/bin/sh
# Guest script for compare.sh: dd throughput on /dev/vda (busybox dd prints
# no rate, so each run is timed with /proc/uptime, 10 ms resolution).
# Prints "BENCH name MiB seconds" lines.
for m in virtio_pci virtio_blk; do modprobe $m; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 1; }
up() { cut -d' ' -f1 /proc/uptime; }
run() {  # run NAME MIB dd-args...
  name=$1; mib=$2; shift 2
  sync; echo 3 > /proc/sys/vm/drop_caches
  a=$(up); dd "$@" 2>/dev/null || { echo "BENCH-FAIL $name"; return 1; }; b=$(up)
  echo "BENCH $name $mib $(awk -v a=$a -v b=$b 'BEGIN{printf "%.2f", b-a}')"
}
rc=0
run seq-write-1M-direct 128 if=/dev/zero of=/dev/vda bs=1M count=128 oflag=direct conv=fsync || rc=1
run seq-read-1M-direct 128 if=/dev/vda of=/dev/null bs=1M count=128 iflag=direct || rc=1
run write-4k-direct-qd1 16 if=/dev/zero of=/dev/vda bs=4k count=4096 oflag=direct || rc=1
run read-4k-direct-qd1 16 if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct || rc=1
run seq-read-buffered 128 if=/dev/vda of=/dev/null bs=1M count=128 || rc=1
exit $rc
