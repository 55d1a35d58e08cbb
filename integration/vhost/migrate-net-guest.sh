#!/bin/sh
# Guest script for the live migration of a guest on vhost-user-net
# (migrate-net.sh): two guests on one vrio I/O server's switch; the host
# migrates the receiver back and forth between two QEMUs while the sender
# streams TCP to it.
#   netip=A.B.C.D  this guest's address (/24 on eth0)
#   peer=A.B.C.D   the other guest
#   role=recv      listens on port 5000 (from boot on), stores what arrives
#                  until the sender's EOF, printing "NET RECEIVED bytes=N"
#                  every 2 s while it grows, then "NET RECV md5=... bytes=N";
#                  waits at most rtmo s (900) for the end of the stream.
#                  It reads slowly, 64 KiB at a time with rsleep s (0.02)
#                  pauses, from a socket with a 1 MiB first receive buffer:
#                  its queue ("rxq=" on the RECEIVED lines) stays full, so
#                  at any switch-over it holds data the guest took in (TCP
#                  checksums verified) in RX buffers the server wrote; those
#                  reach the destination only through the dirty log.
#                  rsleep=0: plain nc into the file, as fast as it goes.
#   role=send      once the peer answers pings, streams random data in 1 MiB
#                  chunks (fresh from /dev/urandom, each also appended to
#                  /tmp/sent), sleeping chunksleep s (0.1) between chunks:
#                  "NET STREAMING" after the first chunk went out, "NET
#                  STREAMED n MiB" every 4. It sends at least netmb MiB (16);
#                  with ctl=1 it goes on until the host writes a line to
#                  ttyS1 (the host's control serial port), at most maxmb MiB
#                  (160). Then "NET SENT n MiB in s s: r MiB/s" and
#                  "NET SEND md5=... bytes=N" (of /tmp/sent).
#   pings=N        echo requests timed once the peer answers (default 3)
# Both ping the peer first ("PING <peer> rc=0").
arg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p;s/^$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline | head -n1; }
up() { cut -d' ' -f1 /proc/uptime; }
# To the console even inside the sender's pipeline (whose stdout is nc's).
log() { echo "VRIO[$(up)] $*" >&2; }
fail() { log "FAIL $*"; dmesg | tail -20 >&2; exit 1; }
IP=$(arg netip); PEER=$(arg peer); ROLE=$(arg role)
MB=$(arg netmb); MB=${MB:-16}
MAXMB=$(arg maxmb); MAXMB=${MAXMB:-160}
SLEEP=$(arg chunksleep); SLEEP=${SLEEP:-0.1}
CTL=$(arg ctl); CTL=${CTL:-0}
RTMO=$(arg rtmo); RTMO=${RTMO:-900}
RSLEEP=$(arg rsleep); RSLEEP=${RSLEEP:-0.02}
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

# The receiving socket's queue, in bytes (what the guest took in, its TCP
# checksum verified, and nc has not read yet).
rxq() { awk -v p=":$(printf %04X $PORT)" '$2 ~ p"$" && $4 == "01" { split($5, q, ":"); printf "%d", ("0x" q[2]) + 0; f = 1; exit } END { if (!f) printf "0" }' /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
# Reads at most 64 KiB at a time, rsleep s apart; stops at nc's EOF.
reader() {
  : > /tmp/recv
  while :; do
    dd bs=65536 count=1 2> /tmp/dderr >> /tmp/recv
    read -r l < /tmp/dderr
    case "$l" in 0+0*) break ;; esac
    [ "$RSLEEP" = 0 ] || sleep "$RSLEEP"
  done
}
NCPID=
if [ "$ROLE" = recv ]; then
  if [ "$RSLEEP" = 0 ]; then
    # Listening before the sender can connect. nc half-closes when its
    # stdin ends, and the sender stops on that EOF: keep its stdin open.
    sleep 100000 | nc -l -p $PORT > /tmp/recv &
  else
    # A slow reader: the socket's queue stays full (a large first receive
    # buffer), so whenever the host migrates, data the guest has taken in
    # sits in RX buffers the server wrote.
    echo "4096 1048576 6291456" > /proc/sys/net/ipv4/tcp_rmem || log "cannot set tcp_rmem"
    sleep 100000 | nc -l -p $PORT | reader &
  fi
  NCPID=$!
  log "NET LISTENING on $PORT (reader pause ${RSLEEP} s)"
fi

# The peer may still be booting: retry until it answers (bounded).
ok=1
for i in $(seq 60); do
  if ping -c 1 -W 2 "$PEER" > /dev/null 2>&1; then ok=0; break; fi
done
ping -c "$PINGS" -W 2 "$PEER" >&2; rc=$?
[ $ok = 0 ] && [ $rc = 0 ] || rc=1
log "PING $PEER rc=$rc"
[ $rc = 0 ] || fail "no ping reply from $PEER"

size() { stat -c %s "$1" 2>/dev/null || echo 0; }
if [ "$ROLE" = recv ]; then
  # Until the sender's EOF ends nc (it then closes; the sender's nc exits
  # on that close).
  n=0; last=-1
  while kill -0 "$NCPID" 2>/dev/null && [ $n -lt $((RTMO * 10)) ]; do
    sleep 0.1; n=$((n+1))
    if [ $((n % 20)) = 0 ]; then
      s=$(size /tmp/recv)
      [ "$s" != "$last" ] && log "NET RECEIVED bytes=$s rxq=$(rxq)"
      last=$s
    fi
  done
  kill -0 "$NCPID" 2>/dev/null && fail "the stream did not end within $RTMO s ($(size /tmp/recv) bytes so far)"
  got=$(size /tmp/recv)
  log "NET RECV md5=$(md5sum /tmp/recv | cut -d' ' -f1) bytes=$got"
  [ "$got" -gt 0 ] || fail "received nothing"
else
  if [ "$CTL" = 1 ]; then
    # The host's control port: one line ends the stream (after netmb MiB).
    stty -F /dev/ttyS1 raw -echo 2>/dev/null || log "stty ttyS1 failed"
    cat /dev/ttyS1 > /tmp/ctl 2>/dev/null &
  fi
  stream() {
    i=0
    : > /tmp/sent
    while [ $i -lt $MAXMB ]; do
      if [ $i -ge $MB ]; then
        [ "$CTL" = 1 ] || break
        [ -s /tmp/ctl ] && { log "NET STOP from the host after $i MiB"; break; }
      fi
      dd if=/dev/urandom of=/tmp/chunk bs=1M count=1 2>/dev/null || exit 1
      cat /tmp/chunk >> /tmp/sent
      # Fails (SIGPIPE) once nc is gone: a refused connect, a broken stream.
      cat /tmp/chunk || exit 1
      i=$((i+1))
      [ $i = 1 ] && log "NET STREAMING to $PEER:$PORT (1 MiB chunks, ${SLEEP} s apart, at least $MB MiB)"
      [ $((i % 4)) = 0 ] && log "NET STREAMED $i MiB"
      sleep "$SLEEP"
    done
    log "NET STREAM END after $i MiB"
  }
  sent=
  for try in $(seq 30); do
    t0=$(up)
    if stream | nc -w 10 "$PEER" $PORT > /dev/null; then sent=1; break; fi
    # Only a refused connect may be retried: a stream that started is over.
    [ -s /tmp/sent ] && [ "$(size /tmp/sent)" -gt $((1024 * 1024)) ] && break
    log "nc to $PEER:$PORT failed (try $try); again"
    sleep 1
  done
  t1=$(up)
  B=$(size /tmp/sent)
  [ -n "$sent" ] || fail "the stream to $PEER:$PORT failed after $B bytes"
  M=$((B / 1048576))
  log "NET SENT $M MiB in $(awk -v a="$t1" -v b="$t0" 'BEGIN{printf "%.2f", a-b}') s: $(awk -v a="$t1" -v b="$t0" -v m="$M" 'BEGIN{d=a-b; if (d<=0) d=0.01; printf "%.2f", m/d}') MiB/s"
  log "NET SEND md5=$(md5sum /tmp/sent | cut -d' ' -f1) bytes=$B"
fi
ip -s link show eth0 >&2
log "NET CHECKS DONE"
