#!/bin/bash
# Builds the vhost-user-blk guest image: busybox, the stock virtio_blk and
# ext4 modules of the host's Debian kernel, e2fsprogs (mke2fs, e2fsck) with
# their libraries, and the script the guest runs as /vrio/run.sh; with
# FIO=1 also fio, its libraries and the dynamic loader (for compare.sh).
#
# Usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT
# Env:   KVER (default: newest /boot/vmlinuz-*-amd64), FIO (0),
#        EXTRA_MODULES (more kernel modules, e.g. virtio_net)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT}
SCRIPT=${2:?guest script missing}
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
MODDIR=/lib/modules/$KVER
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/vrio-vhost-initramfs.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT

# crc32c_generic: ext4 metadata checksums; modules.dep does not list it.
TOP_MODULES="virtio_pci virtio_blk crc32c_generic ext4 ${EXTRA_MODULES:-}"

mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,tmp,run,root,mnt,vrio}
ln -s usr/bin "$ROOT/bin"; ln -s usr/sbin "$ROOT/sbin"
ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"

cp /bin/busybox "$ROOT/usr/bin/busybox"
for a in $(/bin/busybox --list-full); do
  [ -e "$ROOT/$a" ] || ln -s /usr/bin/busybox "$ROOT/$a"
done

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

copy_with_libs() {   # copy_with_libs SRC [DEST]
  local src=$1 dst=${2:-$1} real
  real=$(readlink -f "$src")
  install -D -m 0755 "$real" "$ROOT$dst"
  ldd "$real" 2>/dev/null | awk '/=> \//{print $3} /^\t\//{print $1}' | while read -r lib; do
    [ -e "$ROOT$lib" ] && continue
    install -D -m 0755 "$(readlink -f "$lib")" "$ROOT$lib"
  done
}
for b in mke2fs e2fsck; do
  p=$(command -v "$b" || true)
  [ -n "$p" ] || p=/usr/sbin/$b
  [ -x "$p" ] || { echo "missing host tool $b (e2fsprogs; run scripts/setup.sh)" >&2; exit 1; }
  rm -f "$ROOT/usr/bin/$b" "$ROOT/usr/sbin/$b"
  copy_with_libs "$p" "/usr/sbin/$b"
done
ln -sf mke2fs "$ROOT/usr/sbin/mkfs.ext4"
if [ "${FIO:-0}" = 1 ]; then
  [ -x /usr/bin/fio ] || { echo "missing host tool fio (run scripts/setup.sh)" >&2; exit 1; }
  rm -f "$ROOT/usr/bin/fio"
  copy_with_libs /usr/bin/fio /usr/bin/fio
  # fio links ceph, gluster and friends: keep the image small.
  find "$ROOT/usr/lib" "$ROOT/usr/lib64" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
fi
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$ROOT/etc/"
install -m 0755 "$SCRIPT" "$ROOT/vrio/run.sh"

cp -a /etc/ld.so.conf /etc/ld.so.conf.d "$ROOT/etc/"
ldconfig -r "$ROOT"
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"
install -m 0755 "$HERE/init.sh" "$ROOT/init"

mkdir -p "$(dirname "$OUT")"
( cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet ) | gzip -1 > "$OUT"
echo "initramfs: $OUT ($(du -h "$OUT" | cut -f1))"
