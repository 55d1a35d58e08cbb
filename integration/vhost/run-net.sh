#!/bin/bash
# Host side of the vhost-user-net end-to-end run: two VM hosts, one I/O
# server.
#   guest 1 (10.0.0.1) -> QEMU -netdev vhost-user -> vrio-client vhost-user-net --device-id 1
#   guest 2 (10.0.0.2) -> QEMU -netdev vhost-user -> vrio-client vhost-user-net --device-id 2
#   both clients -> soft fabric -> one vrio-server, whose switch joins the two ports.
# The guests (GUEST-SCRIPT, default net.sh) ping each other, then guest 1
# sends NETMB MiB of random data over TCP (busybox nc) to guest 2; both
# print the md5, the host compares them.
#
# UPLINK=1: two I/O servers instead, guest i on server i, each server's
# switch with a TAP uplink (--uplink-tap); a network namespace this script
# makes bridges the two TAPs (br0, 10.0.0.254/24). The guests then reach
# each other only through the uplinks, and the namespace (the host's side
# of the gateway) pings both guests and sends HOSTMB MiB over TCP to
# guest 2 (port 5001), compared by md5. Needs root.
#
# FRONT=testpmd: the same two guests on DPDK testpmd's vhost-user ports
# (io forwarding, port 0 <-> port 1) instead of vrio: the reference the
# benchmark (compare-net.sh) measures vrio against.
#
# Usage: run-net.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]
# Env:   MEM (MiB per guest, 512), TMO (guest timeout s, 300), NETMB (64),
#        UPLINK (0), HOSTMB (8, with UPLINK), FRONT (vrio), PINGS (3),
#        WORK (temp dir), KEEP (keep WORK), SERIAL_TAIL (lines shown, 60)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:?usage: run-net.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]}
CLIENT=${2:?vrio-client missing}
SCRIPT=${3:-$HERE/net.sh}
MEM=${MEM:-512}; TMO=${TMO:-300}; NETMB=${NETMB:-64}
UPLINK=${UPLINK:-0}; HOSTMB=${HOSTMB:-8}; FRONT=${FRONT:-vrio}; PINGS=${PINGS:-3}
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/vrio-vhost-net.XXXXXX")}
mkdir -p "$WORK"
PIDS=(); SPIDS=(); NS=
cleanup() {
  for p in "${PIDS[@]}" "${SPIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  [ -n "$NS" ] && ip netns del "$NS" 2>/dev/null
  [ -z "${KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
T0=$(date +%s.%N)
el() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}'; }

EXTRA_MODULES=virtio_net "$HERE/build-initramfs.sh" "$WORK/initramfs.cpio.gz" "$SCRIPT" \
  || { echo "RESULT: FAIL (initramfs)"; exit 1; }

# Credentials on: a data-plane key for the servers, one credential per
# device (net devices name no volume; the credential binds the device).
BIN=$(dirname "$SERVER")
if [ -x "$BIN/vrio-ctl" ]; then
  "$BIN/vrio-ctl" key generate --out "$WORK/data.key" > /dev/null || { echo "RESULT: FAIL (key)"; exit 1; }
  KEYARGS=(--key-file "$WORK/data.key")
else
  echo "host: no vrio-ctl beside vrio-server; the data plane runs without credentials"
  KEYARGS=()
fi
cred_args() {
  [ ${#KEYARGS[@]} -gt 0 ] || return 0
  echo --credential "$("$BIN/vrio-ctl" credential mint --key-file "$WORK/data.key" --device-id "$1" --volume net --mode ro)"
}
NSERVERS=1; [ "$UPLINK" = 1 ] && NSERVERS=2
[ "$FRONT" = testpmd ] && NSERVERS=0
ADDRS=(); TAPS=()
for j in $(seq 0 $((NSERVERS - 1))); do
  UP=()
  if [ "$UPLINK" = 1 ]; then TAPS+=("vrup$$$j"); UP=(--uplink-tap "vrup$$$j"); fi
  "$SERVER" --fabric soft --listen 127.0.0.1:0 --disk memory --size-mib 16 "${KEYARGS[@]}" \
    --sidecores 1 --stats-every 0 "${UP[@]}" > "$WORK/server$j.log" 2>&1 &
  SPIDS+=($!)
  for _ in $(seq 100); do grep -q "listening on" "$WORK/server$j.log" && break; sleep 0.1; done
  ADDR=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$WORK/server$j.log" | head -n1)
  [ -n "$ADDR" ] || { echo "vrio-server $j did not start:"; cat "$WORK/server$j.log"; echo "RESULT: FAIL"; exit 1; }
  if [ "$UPLINK" = 1 ]; then
    for _ in $(seq 50); do grep -q "uplink TAP" "$WORK/server$j.log" && break; sleep 0.1; done
    grep -q "uplink TAP" "$WORK/server$j.log" || { echo "vrio-server $j has no uplink:"; cat "$WORK/server$j.log"; echo "RESULT: FAIL"; exit 1; }
  fi
  ADDRS+=("$ADDR")
  echo "host: vrio-server $j on $ADDR"
done
if [ "$UPLINK" = 1 ]; then
  # The gateway side: a namespace with a bridge over both servers' TAPs.
  NS=vrio-net-$$
  ip netns add "$NS" || { echo "cannot make a network namespace (root?)"; echo "RESULT: FAIL"; exit 1; }
  ip -n "$NS" link add br0 type bridge
  for t in "${TAPS[@]}"; do
    ip link set "$t" netns "$NS" && ip -n "$NS" link set "$t" master br0 && ip -n "$NS" link set "$t" up \
      || { echo "cannot bridge $t"; echo "RESULT: FAIL"; exit 1; }
  done
  ip -n "$NS" addr add 10.0.0.254/24 dev br0 && ip -n "$NS" link set br0 up && ip -n "$NS" link set lo up
  echo "host: namespace $NS bridges ${TAPS[*]} (br0 10.0.0.254/24)"
  head -c $((HOSTMB * 1024 * 1024)) /dev/urandom > "$WORK/hostdata"
fi

MACS=(52:54:00:00:00:01 52:54:00:00:00:02)
IPS=(10.0.0.1 10.0.0.2)
ROLES=(send recv)
CPIDS=()
if [ "$FRONT" = testpmd ]; then
  command -v dpdk-testpmd > /dev/null || { echo "dpdk-testpmd missing (scripts/setup.sh installs dpdk-dev)"; echo "RESULT: FAIL"; exit 1; }
  # EAL (as root) writes /run/dpdk/<prefix>: give it a private /run. With
  # --stats-period testpmd runs until SIGINT instead of reading stdin.
  mkdir -p "$WORK/run"
  unshare --mount --propagation private sh -c "mount --bind '$WORK/run' /run && exec \"\$0\" \"\$@\"" \
    dpdk-testpmd -l 0,1 -n 1 --no-huge -m 256 --no-pci --file-prefix="vrionet$$" \
    --vdev "net_vhost0,iface=$WORK/vun0.sock,queues=1" --vdev "net_vhost1,iface=$WORK/vun1.sock,queues=1" \
    -- --forward-mode=io --port-topology=paired --nb-cores=1 --rxq=1 --txq=1 \
    --total-num-mbufs=8192 --auto-start --stats-period 3600 > "$WORK/testpmd.log" 2>&1 &
  SPIDS+=($!)
  for _ in $(seq 100); do [ -S "$WORK/vun0.sock" ] && [ -S "$WORK/vun1.sock" ] && break; sleep 0.2; done
  [ -S "$WORK/vun1.sock" ] || { echo "testpmd did not make its sockets:"; cat "$WORK/testpmd.log"; echo "RESULT: FAIL"; exit 1; }
  echo "host: dpdk-testpmd serves $WORK/vun0.sock and vun1.sock"
fi
for i in $(seq 0 $((NSERVERS > 0 ? 1 : -1))); do
  RUST_LOG=${RUST_LOG:-info} "$CLIENT" vhost-user-net --fabric soft --socket "$WORK/vun$i.sock" \
    --server "${ADDRS[$((i % NSERVERS))]}" --mac "${MACS[$i]}" --device-id $((i + 1)) $(cred_args $((i + 1))) \
    --once > "$WORK/client$i.log" 2>&1 &
  CPIDS+=($!); PIDS+=($!)
done
for i in "${!CPIDS[@]}"; do
  for _ in $(seq 200); do [ -S "$WORK/vun$i.sock" ] && grep -q 'waiting for a VMM' "$WORK/client$i.log" && break; sleep 0.05; done
  grep -q 'waiting for a VMM' "$WORK/client$i.log" || { echo "vrio-client $i did not start:"; cat "$WORK/client$i.log"; echo "RESULT: FAIL"; exit 1; }
  head -n1 "$WORK/client$i.log"
done

guest() {  # guest I
  local i=$1 peer=${IPS[$((1 - $1))]}
  timeout "$TMO" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 1 -m "${MEM}M" \
    -object memory-backend-memfd,id=mem,size=${MEM}M,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path="$WORK/vun$i.sock" \
    -netdev vhost-user,id=n0,chardev=c0,queues=1 \
    -device virtio-net-pci,netdev=n0,mac="${MACS[$i]}" \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initramfs.cpio.gz" \
    -append "console=ttyS0 loglevel=4 panic=-1 netip=${IPS[$i]} peer=$peer role=${ROLES[$i]} netmb=$NETMB pings=$PINGS $HOSTARG" \
    -display none -monitor none -serial "file:$WORK/serial$i.log" -no-reboot
}
# From the namespace: ping each guest (both ways through a TAP, the
# bridge, and a server's switch) and tell it so on port 5002 (the guest
# stays up until then), then send HOSTMB MiB to guest 2.
from_namespace() {
  local deadline=$(( $(date +%s) + TMO )) ip
  for ip in "${IPS[@]}"; do
    until ip netns exec "$NS" ping -c 1 -W 2 "$ip" > /dev/null 2>&1; do
      [ "$(date +%s)" -lt $deadline ] || { echo "HOST NS PING $ip FAILED"; return 1; }
      sleep 1
    done
    ip netns exec "$NS" ping -c 3 -W 2 "$ip" | tail -n 2
    echo "HOST NS PING $ip OK ($(el) s)"
    until timeout 10 ip netns exec "$NS" bash -c "echo reached > /dev/tcp/$ip/5002" 2> /dev/null; do
      [ "$(date +%s)" -lt $deadline ] || { echo "HOST NS TELL $ip FAILED"; return 1; }
      sleep 1
    done
  done
  until ip netns exec "$NS" bash -c "cat '$WORK/hostdata' > /dev/tcp/${IPS[1]}/5001" 2> /dev/null; do
    [ "$(date +%s)" -lt $deadline ] || { echo "HOST NS SEND FAILED"; return 1; }
    sleep 1
  done
  echo "HOST NS SENT $HOSTMB MiB to ${IPS[1]}:5001 md5=$(md5sum < "$WORK/hostdata" | cut -d' ' -f1) ($(el) s)"
}
HOSTARG=; [ "$UPLINK" = 1 ] && HOSTARG="hostmb=$HOSTMB"
echo "host: booting two guests ($(el) s)"
guest 0 & G0=$!
guest 1 & G1=$!
PIDS+=($G0 $G1)
NSRC=0
if [ "$UPLINK" = 1 ]; then from_namespace; NSRC=$?; fi
wait $G0; Q0=$?; wait $G1; Q1=$?
echo "host: qemu exit rc=$Q0/$Q1 after $(el) s (124 = timeout)"
for i in 0 1; do
  echo "---- guest $((i + 1)) (${IPS[$i]}, ${ROLES[$i]}) serial:"
  tr -d '\r' < "$WORK/serial$i.log" | grep -avE '^\s*$' | tail -n "${SERIAL_TAIL:-60}"
done
# --once: each client exits when its QEMU disconnects.
CRC=0
for i in "${!CPIDS[@]}"; do
  p=${CPIDS[$i]}
  # Up to 30 s: it drains its vrings first.
  for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then echo "host: vrio-client $i still running after the VMM left"; kill "$p"; CRC=99; fi
  wait "$p"; rc=$?; [ "$rc" = 0 ] || [ "$CRC" != 0 ] || CRC=$rc
  echo "---- vrio-client $i (rc=$rc):"; tail -n 30 "$WORK/client$i.log"
done
PIDS=()
SRC=0
if [ "$FRONT" = testpmd ]; then
  # SIGINT: testpmd prints its port counters and exits.
  kill -INT "${SPIDS[0]}"; wait "${SPIDS[0]}"; rc=$?
  echo "---- dpdk-testpmd (rc=$rc):"; grep -aE 'Port [01]|RX-packets|TX-packets|RX-dropped|Error|error' "$WORK/testpmd.log" | tail -20
else
  for j in "${!SPIDS[@]}"; do
    kill -TERM "${SPIDS[$j]}"; wait "${SPIDS[$j]}"; rc=$?; [ "$rc" = 0 ] || SRC=$rc
    echo "---- vrio-server $j (rc=$rc):"; cat "$WORK/server$j.log"
  done
fi
SPIDS=()

ok=1
G0=$(tr -d '\r' < "$WORK/serial0.log"); G1=$(tr -d '\r' < "$WORK/serial1.log")
grep -q "PING ${IPS[1]} rc=0" <<< "$G0" && grep -q "PING ${IPS[0]} rc=0" <<< "$G1" \
  && echo "HOST PING OK" || { echo "HOST PING FAILED"; ok=0; }
S=$(sed -n 's/.*NET SEND md5=\([0-9a-f]*\).*/\1/p' <<< "$G0" | head -n1)
R=$(sed -n 's/.*NET RECV md5=\([0-9a-f]*\).*/\1/p' <<< "$G1" | head -n1)
if [ -n "$S" ] && [ "$S" = "$R" ]; then echo "HOST MD5 OK md5=$S ($NETMB MiB)"; else echo "HOST MD5 MISMATCH sent=${S:-none} received=${R:-none}"; ok=0; fi
sed -n 's/.*\(NET SENT .*\)/host: \1/p' <<< "$G0"
for g in "$G0" "$G1"; do grep -q "VRIO-GUEST-DONE rc=0" <<< "$g" || { echo "host: a guest script failed"; ok=0; }; done
if [ "$UPLINK" = 1 ]; then
  H=$(sed -n 's/.*NET HOSTRECV md5=\([0-9a-f]*\).*/\1/p' <<< "$G1" | head -n1)
  W=$(md5sum < "$WORK/hostdata" | cut -d' ' -f1)
  if [ "$NSRC" = 0 ] && [ "$H" = "$W" ]; then echo "HOST NS MD5 OK md5=$W ($HOSTMB MiB)"; else echo "HOST NS MD5 MISMATCH sent=$W received=${H:-none} (namespace rc=$NSRC)"; ok=0; fi
fi
[ "$Q0" = 0 ] && [ "$Q1" = 0 ] || ok=0
[ "$CRC" = 0 ] || ok=0
[ "$SRC" = 0 ] || ok=0
echo "host: total $(el) s"
if [ $ok = 1 ]; then echo "RESULT: PASS"; exit 0; else echo "RESULT: FAIL (qemu $Q0/$Q1, clients $CRC, server $SRC)"; exit 1; fi
