#!/bin/bash
# Installs everything vrio's demo and test suite need on a fresh Debian 12
# machine (root). Idempotent: a second run only checks.
#   - build tools for sideway (cmake, clang/libclang)
#   - QEMU 10 from bookworm-backports (matching the image's qemu-utils),
#     the guest kernel, busybox and rdma-core for the Soft-RoCE guest
#   - Prometheus, which the metrics test starts to scrape the binaries
#   - the nightly toolchain's cargo-fuzz for the fuzz target
#
# Usage: scripts/setup.sh [build|all]   (default all)
#   build: only what compiling vrio needs (the demo)
#   all:   also QEMU, the guest kernel, rdma-core and cargo-fuzz (the tests)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
MODE=${1:-all}
if [ "$(id -u)" != 0 ]; then
  echo "setup: must run as root (apt-get installs system packages)" >&2; exit 1
fi
BUILD_PKGS="build-essential pkg-config cmake clang libclang-dev"
need_apt=0
for p in $BUILD_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || need_apt=1; done
if [ "$need_apt" = 1 ]; then
  echo "setup: installing build packages: $BUILD_PKGS"
  apt-get update -q
  apt-get install -y -q --no-install-recommends $BUILD_PKGS
fi
if [ "$MODE" = build ]; then
  echo "setup: build dependencies ok ($(cmake --version | head -1))"; exit 0
fi
STAMP=/var/lib/vrio-setup.v1
for p in qemu-system-x86 linux-image-amd64 busybox-static cpio \
         rdma-core ibverbs-providers ibverbs-utils perftest rdmacm-utils iproute2 iputils-ping e2fsprogs fio \
         etcd-server protobuf-compiler libprotobuf-dev dpdk-dev librte-net-vhost23 prometheus; do
  dpkg -s "$p" >/dev/null 2>&1 || { need_apt=1; break; }
done
if [ ! -f "$STAMP" ] || [ "$need_apt" = 1 ]; then
  echo "setup: installing system packages (apt)"
  MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$MIRROR" ] || { echo "setup: cannot find the Debian mirror in /etc/apt" >&2; exit 1; }
  echo "deb $MIRROR bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
  apt-get update -q
  apt-get install -y -q --no-install-recommends build-essential pkg-config cmake clang libclang-dev \
    busybox-static cpio iproute2 iputils-ping e2fsprogs kmod fio \
    rdma-core ibverbs-providers ibverbs-utils perftest rdmacm-utils libibverbs-dev librdmacm-dev
  # vrio-control's etcd store (feature etcd): the test runs etcd, and etcd-client's
  # build script needs protoc with the well-known types.
  apt-get install -y -q --no-install-recommends etcd-server protobuf-compiler libprotobuf-dev
  # The net benchmark's reference back-end: dpdk-testpmd's vhost-user ports.
  apt-get install -y -q --no-install-recommends dpdk-dev librte-net-vhost23
  # integration/tests/prometheus.rs scrapes vrio-server and vrio-client with a
  # real Prometheus, which it starts itself: the packaged service, started on
  # install where systemd runs, would only take a core and port 9090.
  if ! dpkg -s prometheus >/dev/null 2>&1; then
    apt-get install -y -q --no-install-recommends prometheus
    if [ -d /run/systemd/system ]; then systemctl disable --now prometheus >/dev/null 2>&1 || true; fi
  fi
  apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
  ls /boot/vmlinuz-*-amd64 >/dev/null 2>&1 || apt-get install -y -q --no-install-recommends linux-image-amd64
  dpkg -s linux-image-amd64 >/dev/null 2>&1 || apt-get install -y -q --no-install-recommends linux-image-amd64
  touch "$STAMP"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
echo "setup: ok ($(qemu-system-x86_64 --version | head -1); $(cmake --version | head -1))"
