#!/bin/bash
# The Soft-RoCE guest image: the kernel modules rdma_rxe needs, rdma-core
# userspace with the rxe provider, our binaries and the script the guest
# runs (see ../build-initramfs.sh).
# Usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT [BINARY...]
# Env:   KVER (default: newest /boot/vmlinuz-*-amd64)
HERE=$(cd "$(dirname "$0")" && pwd)
MODULES="virtio_pci virtio_net crc32_generic rdma_rxe ib_uverbs rdma_ucm" \
  WITH=rdma INIT="$HERE/init.sh" exec "$HERE/../build-initramfs.sh" "$@"
