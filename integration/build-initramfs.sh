#!/bin/bash
# Builds a guest image for the QEMU suites (adapted from
# shared/lab/build-initramfs.sh): busybox, the closure of the kernel
# modules asked for (from the host's Debian kernel), the extras asked for,
# the given binaries, the script the guest runs and its /init.
# integration/rxe and integration/vhost call it through their own
# build-initramfs.sh, which only choose modules, extras and /init.
#
# Usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT [BINARY...]
#   GUEST-SCRIPT becomes /vrio/run.sh; each BINARY goes to /usr/bin
#   (debug info stripped).
# Env:   MODULES  the top kernel modules (their dependencies come along)
#        INIT     the script that becomes /init
#        WITH     extras, space separated:
#                 rdma  rdma-core tools, the rxe provider and the libraries
#                       sideway dlopen()s (which `ldd` does not list)
#                 e2fs  mke2fs, e2fsck, mkfs.ext4
#                 fio   fio and its libraries
#        KVER     kernel version (default: newest /boot/vmlinuz-*-amd64)
set -euo pipefail
OUT=${1:?usage: build-initramfs.sh OUT.cpio.gz GUEST-SCRIPT [BINARY...]}
SCRIPT=${2:?guest script missing}
shift 2
: "${MODULES:?MODULES (the kernel modules the guest loads) not set}"
: "${INIT:?INIT (the /init script of the guest) not set}"
WITH=" ${WITH:-} "
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
MODDIR=/lib/modules/$KVER
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/vrio-initramfs.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT

mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,tmp,run,root,mnt,vrio}
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
for m in $MODULES; do
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
host_tool() {   # host_tool NAME DEST-DIR PACKAGE: a host binary, over busybox
  local p
  p=$(command -v "$1" || true)
  [ -n "$p" ] || p=/usr/sbin/$1
  [ -x "$p" ] || { echo "missing host tool $1 ($3; run scripts/setup.sh)" >&2; exit 1; }
  rm -f "$ROOT/usr/bin/$1" "$ROOT/usr/sbin/$1"
  copy_with_libs "$p" "$2/$1"
}
LIBDIR=/usr/lib/x86_64-linux-gnu
if [[ $WITH == *" rdma "* ]]; then
  for b in ibv_devices ibv_devinfo rdma; do host_tool "$b" /usr/bin rdma-core; done
  # dlopen()ed by sideway (rdma-mummy-sys): the sonames must resolve in the guest.
  for l in libibverbs.so.1 librdmacm.so.1; do
    [ -e "$LIBDIR/$l" ] || { echo "missing $LIBDIR/$l (rdma-core; run scripts/setup.sh)" >&2; exit 1; }
    real=$(readlink -f "$LIBDIR/$l")
    copy_with_libs "$real" "$LIBDIR/$(basename "$real")"
    rm -f "$ROOT$LIBDIR/$l"
    ln -s "$(basename "$real")" "$ROOT$LIBDIR/$l"
  done
  copy_with_libs "$(ls $LIBDIR/libibverbs/librxe-rdmav*.so | head -n1)"
  mkdir -p "$ROOT/etc/libibverbs.d"
  cp /etc/libibverbs.d/rxe.driver "$ROOT/etc/libibverbs.d/"
fi
if [[ $WITH == *" e2fs "* ]]; then
  for b in mke2fs e2fsck; do host_tool "$b" /usr/sbin e2fsprogs; done
  ln -sf mke2fs "$ROOT/usr/sbin/mkfs.ext4"
  [ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$ROOT/etc/"
fi
if [[ $WITH == *" fio "* ]]; then
  host_tool fio /usr/bin fio
  # fio links ceph, gluster and friends: keep the image small.
  find "$ROOT/usr/lib" "$ROOT/usr/lib64" -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null || true
fi
# dlopen()ed by glibc for thread cancellation and Rust unwinding.
[ -e $LIBDIR/libgcc_s.so.1 ] && copy_with_libs $LIBDIR/libgcc_s.so.1

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
install -m 0755 "$INIT" "$ROOT/init"

mkdir -p "$(dirname "$OUT")"
( cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet ) | gzip -1 > "$OUT"
echo "initramfs: $OUT ($(du -h "$OUT" | cut -f1))"
