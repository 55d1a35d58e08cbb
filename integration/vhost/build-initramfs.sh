#!/bin/bash
# The vhost-user guest image: the stock virtio_blk and ext4 modules of the
# host's Debian kernel, e2fsprogs, and the script the guest runs as
# /vrio/run.sh; with FIO=1 also fio (for compare.sh). See
# ../build-initramfs.sh.
# Usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT
# Env:   KVER (default: newest /boot/vmlinuz-*-amd64), FIO (0),
#        EXTRA_MODULES (more kernel modules, e.g. virtio_net)
HERE=$(cd "$(dirname "$0")" && pwd)
WITH=e2fs
[ "${FIO:-0}" = 1 ] && WITH="e2fs fio"
# crc32c_generic: ext4 metadata checksums; modules.dep does not list it.
MODULES="virtio_pci virtio_blk crc32c_generic ext4 ${EXTRA_MODULES:-}" \
  WITH=$WITH INIT="$HERE/init.sh" exec "$HERE/../build-initramfs.sh" "$@"
