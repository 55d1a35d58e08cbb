#!/bin/bash
# Builds the Soft-RoCE guest image (adapted from shared/lab/build-initramfs.sh):
# busybox, the kernel modules rdma_rxe needs, rdma-core userspace with the rxe
# provider, the libraries sideway dlopen()s at run time (libibverbs.so.1,
# librdmacm.so.1, which `ldd` of a Rust binary does not list), our binaries
# and the script the guest runs.
#
# Usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT [BINARY...]
#   GUEST-SCRIPT becomes /vrio/run.sh; each BINARY goes to /usr/bin.
# Env:   KVER (default: newest /boot/vmlinuz-*-amd64)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT [BINARY...]}
SCRIPT=${2:?guest script missing}
shift 2
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
MODDIR=/lib/modules/$KVER
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/vrio-initramfs.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT

TOP_MODULES="virtio_pci virtio_net crc32_generic rdma_rxe ib_uverbs rdma_ucm"

mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,tmp,run,root,vrio}
# Debian 12 is merged-/usr: mirror that so ldd paths (/lib/..., /lib64/...) work.
ln -s usr/bin "$ROOT/bin"; ln -s usr/sbin "$ROOT/sbin"
ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"

cp /bin/busybox "$ROOT/usr/bin/busybox"
for a in $(/bin/busybox --list-full); do
  [ -e "$ROOT/$a" ] || ln -s /usr/bin/busybox "$ROOT/$a"
done

# ---- modules: closure over modules.dep, in load order
declare -A SEEN=(); ORDER=()
modpath() {
  local n=$1 alt=${1//_/-}
  awk -F: -v a="/$n.ko" -v b="/$alt.ko" \
    '{ p=$1; if (substr(p, length(p)-length(a)+1)==a || substr(p, length(p)-length(b)+1)==b) { print p; exit } }' \
    "$MODDIR/modules.dep"
}
visit() {
  local rel=$1 deps
  [ -n "${SEEN[$rel]:-}" ] && return 0
  SEEN[$rel]=1
  deps=$(awk -F': *' -v m="$rel" '$1==m { print $2; exit }' "$MODDIR/modules.dep")
  for d in $deps; do visit "$d"; done
  ORDER+=("$rel")
}
for m in $TOP_MODULES; do
  rel=$(modpath "$m")
  [ -n "$rel" ] || { echo "module $m not found in $MODDIR/modules.dep" >&2; exit 1; }
  visit "$rel"
done
for rel in "${ORDER[@]}"; do
  mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$rel")"
  cp "$MODDIR/$rel" "$ROOT/lib/modules/$KVER/$rel"
done
cp "$MODDIR"/modules.{order,builtin,builtin.modinfo} "$ROOT/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$ROOT" "$KVER"

# ---- userspace
copy_with_libs() {   # copy_with_libs SRC [DEST]
  local src=$1 dst=${2:-$1} real
  real=$(readlink -f "$src")
  install -D -m 0755 "$real" "$ROOT$dst"
  ldd "$real" 2>/dev/null | awk '/=> \//{print $3} /^\t\//{print $1}' | while read -r lib; do
    [ -e "$ROOT$lib" ] && continue
    install -D -m 0755 "$(readlink -f "$lib")" "$ROOT$lib"
  done
}
for b in ibv_devices ibv_devinfo rdma; do
  p=$(command -v "$b") || { echo "missing host tool $b (run scripts/setup.sh)" >&2; exit 1; }
  rm -f "$ROOT/usr/bin/$b" "$ROOT/usr/sbin/$b"
  copy_with_libs "$p" "/usr/bin/$b"
done
LIBDIR=/usr/lib/x86_64-linux-gnu
# dlopen()ed by sideway (rdma-mummy-sys): the sonames must resolve in the guest.
for l in libibverbs.so.1 librdmacm.so.1; do
  [ -e "$LIBDIR/$l" ] || { echo "missing $LIBDIR/$l (rdma-core; run scripts/setup.sh)" >&2; exit 1; }
  real=$(readlink -f "$LIBDIR/$l")
  copy_with_libs "$real" "$LIBDIR/$(basename "$real")"
  rm -f "$ROOT$LIBDIR/$l"
  ln -s "$(basename "$real")" "$ROOT$LIBDIR/$l"
done
copy_with_libs "$(ls $LIBDIR/libibverbs/librxe-rdmav*.so | head -n1)"
# dlopen()ed by glibc for thread cancellation and Rust unwinding.
copy_with_libs $LIBDIR/libgcc_s.so.1
mkdir -p "$ROOT/etc/libibverbs.d"
cp /etc/libibverbs.d/rxe.driver "$ROOT/etc/libibverbs.d/"

for b in "$@"; do
  [ -x "$b" ] || { echo "binary $b not found" >&2; exit 1; }
  copy_with_libs "$b" "/usr/bin/$(basename "$b")"
  # debug info only slows the image down (Rust debug builds are ~40 MB)
  command -v strip >/dev/null && strip --strip-debug "$ROOT/usr/bin/$(basename "$b")"
done
install -m 0755 "$SCRIPT" "$ROOT/vrio/run.sh"

cp -a /etc/ld.so.conf /etc/ld.so.conf.d "$ROOT/etc/"
ldconfig -r "$ROOT"
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"
printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"
install -m 0755 "$HERE/init.sh" "$ROOT/init"

mkdir -p "$(dirname "$OUT")"
( cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet ) | gzip -1 > "$OUT"
echo "initramfs: $OUT ($(du -h "$OUT" | cut -f1))"
