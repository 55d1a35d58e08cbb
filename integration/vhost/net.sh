#!/bin/sh
# Guest script: the stock virtio_net driver on -netdev vhost-user, two
# guests on one vrio I/O server's switch (run-net.sh boots both).
#   netip=A.B.C.D  this guest's address (/24 on eth0)
#   peer=A.B.C.D   the other guest
#   role=recv      listens on port 5000, stores what arrives and prints its
#                  md5; role=send makes netmb MiB (default 64) of random
#                  data, prints its md5 and sends it once the peer answers.
#   hostmb=N       (recv) also take N MiB on port 5001 from the host's side
#                  of the uplink and print its md5 ("NET HOSTRECV"); (both)
#                  stay up until the host's side, having pinged this guest,
#                  says so on port 5002 ("NET REACHED").
#   pings=N        echo requests timed once the peer answers (default 3)
# Both ping the peer first ("PING <peer> rc=0").
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
log() { echo "VRIO[$(cut -d' ' -f1 /proc/uptime)] $*"; }
fail() { log "FAIL $*"; dmesg | tail -20; exit 1; }
IP=$(arg netip); PEER=$(arg peer); ROLE=$(arg role)
MB=$(arg netmb); MB=${MB:-64}
HOSTMB=$(arg hostmb)
PINGS=$(arg pings); PINGS=${PINGS:-3}
PORT=5000
[ -n "$IP" ] && [ -n "$PEER" ] && [ -n "$ROLE" ] || fail "netip, peer and role are needed"

for m in virtio_pci virtio_net; do modprobe $m || log "modprobe $m failed"; done
n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -e /sys/class/net/eth0 ] || fail "no eth0"
ip link set lo up
ip addr add "$IP/24" dev eth0 || fail "ip addr"
ip link set eth0 up || fail "ip link up"
log "eth0: mac $(cat /sys/class/net/eth0/address) mtu $(cat /sys/class/net/eth0/mtu) features $(cat /sys/class/net/eth0/device/features 2>/dev/null)"

if [ -n "$HOSTMB" ]; then
  nc -l -p 5002 < /dev/null > /tmp/reached &
fi
if [ -n "$HOSTMB" ] && [ "$ROLE" = recv ]; then
  sleep 600 | nc -l -p 5001 > /tmp/hostrecv &
  log "NET LISTENING on 5001 for $HOSTMB MiB from the host"
fi

# The peer may still be booting: retry until it answers (bounded).
ok=1
for i in $(seq 60); do
  if ping -c 1 -W 2 "$PEER" > /dev/null 2>&1; then ok=0; break; fi
done
ping -c "$PINGS" -W 2 "$PEER"; rc=$?
[ $ok = 0 ] && [ $rc = 0 ] || rc=1
log "PING $PEER rc=$rc"
[ $rc = 0 ] || fail "no ping reply from $PEER"

BYTES=$((MB * 1024 * 1024))
if [ "$ROLE" = recv ]; then
  # nc half-closes when its stdin ends, and the sender stops on that EOF:
  # keep its stdin open while receiving.
  sleep 600 | nc -l -p $PORT > /tmp/recv &
  log "NET LISTENING on $PORT"
  n=0
  while [ "$(stat -c %s /tmp/recv 2>/dev/null || echo 0)" -lt $BYTES ] && [ $n -lt 1800 ]; do
    sleep 0.1; n=$((n+1))
  done
  sleep 1
  got=$(stat -c %s /tmp/recv 2>/dev/null || echo 0)
  R=$(md5sum /tmp/recv | cut -d' ' -f1)
  log "NET RECV md5=$R bytes=$got"
  [ "$got" = $BYTES ] || fail "received $got of $BYTES bytes"
  if [ -n "$HOSTMB" ]; then
    HB=$((HOSTMB * 1024 * 1024)); n=0
    while [ "$(stat -c %s /tmp/hostrecv 2>/dev/null || echo 0)" -lt $HB ] && [ $n -lt 1800 ]; do
      sleep 0.1; n=$((n+1))
    done
    sleep 1
    got=$(stat -c %s /tmp/hostrecv 2>/dev/null || echo 0)
    log "NET HOSTRECV md5=$(md5sum /tmp/hostrecv | cut -d' ' -f1) bytes=$got"
    [ "$got" = $HB ] || fail "received $got of $HB bytes from the host"
  fi
  # Stay up until the sender has the end of the stream: this nc exits on
  # the sender's EOF and closes, the sender's nc exits on that close, and
  # the socket is gone once the sender acked it.
  n=0
  while grep -qE "^ *[0-9]+: [0-9A-F]+:$(printf %04X $PORT) " /proc/net/tcp /proc/net/tcp6 2>/dev/null && [ $n -lt 600 ]; do
    sleep 0.1; n=$((n+1))
  done
  grep -qE "^ *[0-9]+: [0-9A-F]+:$(printf %04X $PORT) " /proc/net/tcp /proc/net/tcp6 2>/dev/null \
    && fail "the stream on port $PORT was not closed 60 s after it ended"
else
  dd if=/dev/urandom of=/tmp/send bs=1M count=$MB 2>/dev/null || fail "urandom"
  S=$(md5sum /tmp/send | cut -d' ' -f1)
  log "NET SEND md5=$S bytes=$BYTES"
  # Until the receiver listens, nc is refused: retry.
  for i in $(seq 100); do
    t0=$(cut -d' ' -f1 /proc/uptime)
    if nc -w 5 "$PEER" $PORT < /tmp/send; then break; fi
    sleep 0.5
  done
  t1=$(cut -d' ' -f1 /proc/uptime)
  log "NET SENT $MB MiB in $(awk -v a="$t1" -v b="$t0" 'BEGIN{printf "%.2f", a-b}') s: $(awk -v a="$t1" -v b="$t0" -v m="$MB" 'BEGIN{d=a-b; if (d<=0) d=0.01; printf "%.1f", m/d}') MiB/s"
fi
if [ -n "$HOSTMB" ]; then
  # The host's side pings this guest some time after boot; a sender has
  # nothing else to wait for, so it would go before.
  n=0; while [ ! -s /tmp/reached ] && [ $n -lt 1800 ]; do sleep 0.1; n=$((n+1)); done
  [ -s /tmp/reached ] || fail "the host's side did not reach this guest within 180 s"
  log "NET REACHED by the host's side"
fi
ip -s link show eth0
log "NET CHECKS DONE"
