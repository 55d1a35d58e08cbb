#!/bin/sh
# Guest script for compare.sh: fio on /dev/vda (libaio, O_DIRECT), one
# job per workload, each printed as JSON between "FIO-BEGIN name" and
# "FIO-END name" lines for the host to parse.
# Kernel parameters: fiotime (seconds per workload, default 5), fiomb (MiB
# of the disk the jobs cover, default 128).
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
T=$(arg fiotime); T=${T:-5}
MB=$(arg fiomb); MB=${MB:-128}
for m in virtio_pci virtio_blk; do modprobe $m; done
n=0; while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 1; }
command -v fio > /dev/null || { echo "fio missing from the initramfs"; exit 1; }
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queue(s)"
# Reads of never-written blocks are too cheap on sparse files: fill first.
fio --name=fill --filename=/dev/vda --ioengine=libaio --direct=1 --rw=write --bs=1M \
  --iodepth=4 --size=${MB}M > /dev/null 2>&1 || { echo "fio fill failed"; exit 1; }
rc=0
run() {  # run NAME fio-args...
  name=$1; shift
  echo "FIO-BEGIN $name"
  fio --name="$name" --filename=/dev/vda --ioengine=libaio --direct=1 --size=${MB}M \
    --runtime=$T --time_based --ramp_time=1 --output-format=json "$@" 2>&1 || rc=1
  echo "FIO-END $name"
}
run seq-read-1M --rw=read --bs=1M --iodepth=1
run seq-write-1M --rw=write --bs=1M --iodepth=1
run rand-read-4k-qd1 --rw=randread --bs=4k --iodepth=1
run rand-read-4k-qd32 --rw=randread --bs=4k --iodepth=32
run rand-write-4k-qd1 --rw=randwrite --bs=4k --iodepth=1
run rand-write-4k-qd32 --rw=randwrite --bs=4k --iodepth=32
exit $rc
