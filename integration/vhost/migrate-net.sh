#!/bin/bash
# Live migration of a guest on vhost-user-net while it receives a TCP stream
# through the I/O server's switch (issue 16, "Net"):
#
#   guest 1 (10.0.0.1, sender) -> QEMU -> vrio-client 1 (device 1) ---------+
#   guest 2 (10.0.0.2, receiver) on QEMU side a -> vrio-client a (device 2) +--> one vrio-server
#                  ...migrated to QEMU side b -> vrio-client b (device 2) --+    (its switch joins them)
#
# Clients a and b serve the same device (id 2, MAC 52:54:00:00:00:02, one
# credential) on their own sockets (vunA.sock, vunB.sock) and keep serving
# after their VMM leaves (no --once). Guest 1 streams random data to guest 2
# over TCP (busybox nc) in 1 MiB chunks (GUEST-SCRIPT, default
# migrate-net-guest.sh). Once it prints "NET STREAMING", the host migrates
# guest 2 MIGRATIONS times back and forth: each time a QEMU starts on the
# other side with the same options plus `-incoming tcp:127.0.0.1:PORT`,
# the source's HMP monitor runs `migrate -d` and polls `info migrate` until
# completed or failed; the source QEMU quits, and the host waits for the
# receiver to report more bytes from the new side before the next one.
# Each migration prints
#   NET MIGRATION i a->b status=completed total_ms=... downtime_ms=... streaming=yes rxq_before=N ...
# (streaming=yes: the sender had not finished when the migration completed;
# rxq_before: the bytes the receiver's socket held unread in its last report
# before the migration, data sitting in RX buffers the server wrote).
# After the last one (and GAP s), the host tells the sender to stop (a line
# on guest 1's second serial port, ttyS1); it sends what is left of its
# NETMB MiB minimum and closes; the receiver prints the md5 of what it
# stored, on whichever QEMU runs it then; the host compares it with the
# sender's md5 and prints "RESULT: PASS" or "RESULT: FAIL" (with the logs).
#
# Usage: migrate-net.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]
#   (vrio-ctl is taken from VRIO-SERVER's directory)
# Env:   MIGRATIONS (2), GAP (s between a migration and the next or the
#        stop, 3), NETMB (MiB the sender sends at least, 16), MAXMB (at
#        most, 160: both guests keep it in a tmpfs, half their RAM),
#        CHUNK_SLEEP (s between 1 MiB chunks, 0.1), RECV_SLEEP (the
#        receiver reads 64 KiB at a time with pauses this long, so its
#        socket's queue stays full: 0.02; 0 = as fast as it goes), MIGTMO (s
#        per migration, 180), MAXBW (max-bandwidth, e.g. 1G; default
#        QEMU's), DOWNTIME_MS (downtime-limit; default QEMU's 300), MEM (MiB
#        per guest, 512), TMO (s the guests get to finish after the stop,
#        300), BOOTTMO (s until the stream starts, 300), WORK (temp dir;
#        KEEP=1 keeps it), SERIAL_TAIL (60), RUST_LOG (info),
#        CANCEL (1: first a migration capped at CANCEL_BW (1M) per second
#        that cannot finish, cancelled after CANCEL_AFTER s (3): status
#        "cancelled", its destination QEMU killed, the bandwidth restored;
#        the receiver must go on on the source and the source's agent
#        must log "logging=false"; "NET MIGRATION CANCELLED OK")
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:?usage: migrate-net.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]}
CLIENT=${2:?vrio-client missing}
SCRIPT=${3:-$HERE/migrate-net-guest.sh}
BIN=$(dirname "$SERVER")
MEM=${MEM:-512}; TMO=${TMO:-300}; BOOTTMO=${BOOTTMO:-300}
NETMB=${NETMB:-16}; MAXMB=${MAXMB:-160}; CHUNK_SLEEP=${CHUNK_SLEEP:-0.1}; RECV_SLEEP=${RECV_SLEEP:-0.02}
MIGRATIONS=${MIGRATIONS:-2}; GAP=${GAP:-3}; MIGTMO=${MIGTMO:-180}
MAXBW=${MAXBW:-}; DOWNTIME_MS=${DOWNTIME_MS:-}
CANCEL=${CANCEL:-0}; CANCEL_BW=${CANCEL_BW:-1M}; CANCEL_AFTER=${CANCEL_AFTER:-3}
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/vrio-migrate-net.XXXXXX")}
mkdir -p "$WORK"
SPID=; G1PID=; declare -A CPIDS=(); declare -A QPIDS=()
cleanup() {
  for p in "${QPIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -n "$G1PID" ] && kill "$G1PID" 2>/dev/null
  for p in "${CPIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null
  wait 2>/dev/null
  [ -z "${KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 143" TERM INT
T0=$(date +%s.%N)
el() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}'; }
say() { echo "host: $* ($(el) s)"; }
[ -x "$BIN/vrio-ctl" ] || { echo "$BIN/vrio-ctl missing (build it next to vrio-server)"; echo "RESULT: FAIL"; exit 1; }
EXTRA_MODULES=virtio_net "$HERE/build-initramfs.sh" "$WORK/initramfs.cpio.gz" "$SCRIPT" \
  || { echo "RESULT: FAIL (initramfs)"; exit 1; }

# ---- HMP: one connection per call; the monitor takes one client at a time.
# QEMU's HMP monitor, from python3 (integration/vhost/hmp.py).
hmp() { python3 "$HERE/hmp.py" "$@"; }

# ---- the I/O server (soft fabric), a data key, one credential per device
"$BIN/vrio-ctl" key generate --out "$WORK/data.key" > /dev/null || { echo "RESULT: FAIL (key)"; exit 1; }
cred() { "$BIN/vrio-ctl" credential mint --key-file "$WORK/data.key" --device-id "$1" --volume net --mode ro; }
"$SERVER" --fabric soft --listen 127.0.0.1:0 --disk memory --size-mib 16 --key-file "$WORK/data.key" \
  --sidecores 1 --stats-every 0 > "$WORK/server.log" 2>&1 &
SPID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.log" && break; sleep 0.1; done
ADDR=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$WORK/server.log" | head -n1)
[ -n "$ADDR" ] || { echo "vrio-server did not start:"; cat "$WORK/server.log"; echo "RESULT: FAIL"; exit 1; }
say "vrio-server on $ADDR"

# ---- the agents: 1 for guest 1 (--once); a and b for guest 2 (device 2)
MAC1=52:54:00:00:00:01; MAC2=52:54:00:00:00:02
waits() { local n; n=$(grep -c 'waiting for a VMM' "$WORK/client-$1.log" 2>/dev/null); echo "${n:-0}"; }
start_client() {  # NAME SOCKET DEVICE-ID MAC [--once]
  local name=$1 sock=$2 id=$3 mac=$4; shift 4
  RUST_LOG=${RUST_LOG:-info} "$CLIENT" vhost-user-net --fabric soft --socket "$WORK/$sock" \
    --server "$ADDR" --mac "$mac" --device-id "$id" --credential "$(cred "$id")" "$@" \
    >> "$WORK/client-$name.log" 2>&1 &
  CPIDS[$name]=$!
  for _ in $(seq 600); do [ -S "$WORK/$sock" ] && [ "$(waits "$name")" -ge 1 ] && break; sleep 0.05; done
  [ "$(waits "$name")" -ge 1 ] || { echo "vrio-client $name did not start:"; cat "$WORK/client-$name.log"; echo "RESULT: FAIL"; exit 1; }
  say "vrio-client $name (pid ${CPIDS[$name]}) on $WORK/$sock: $(head -n1 "$WORK/client-$name.log")"
}
start_client 1 vun1.sock 1 "$MAC1" --once
start_client a vunA.sock 2 "$MAC2"
start_client b vunB.sock 2 "$MAC2"

# ---- guest 1, the sender: one QEMU; its ttyS1 is the host's control port
CTLSOCK=$WORK/ctl1.sock
APPEND_COMMON="console=ttyS0 loglevel=4 panic=-1 netmb=$NETMB maxmb=$MAXMB chunksleep=$CHUNK_SLEEP rsleep=$RECV_SLEEP pings=3"
timeout $((BOOTTMO + TMO + MIGRATIONS * (MIGTMO + GAP + 90))) qemu-system-x86_64 -name vrio-net-sender \
  -accel tcg,thread=multi -cpu max -smp 1 -m "${MEM}M" \
  -object memory-backend-memfd,id=mem,size=${MEM}M,share=on -numa node,memdev=mem \
  -chardev socket,id=c0,path="$WORK/vun1.sock" \
  -netdev vhost-user,id=n0,chardev=c0,queues=1 \
  -device virtio-net-pci,netdev=n0,mac="$MAC1" \
  -kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initramfs.cpio.gz" \
  -append "$APPEND_COMMON netip=10.0.0.1 peer=10.0.0.2 role=send ctl=1" \
  -display none -monitor none -serial "file:$WORK/serial-g1.log" \
  -serial "unix:$CTLSOCK,server=on,wait=off" -no-reboot > "$WORK/qemu-g1.log" 2>&1 &
G1PID=$!
say "guest 1 (sender, 10.0.0.1) on QEMU pid $G1PID"

# ---- guest 2, the receiver: QEMU number N on SIDE (a: vunA.sock, b: vunB.sock)
declare -A SESS=([a]=0 [b]=0)
QN=0; declare -A QSIDE=()
sock_of() { [ "$1" = a ] && echo vunA.sock || echo vunB.sock; }
# The side's client is back in accept (once per VMM it served).
client_ready() {  # SIDE
  local want=$((SESS[$1] + 1))
  for _ in $(seq 600); do
    [ "$(waits "$1")" -ge "$want" ] && return 0
    kill -0 "${CPIDS[$1]}" 2>/dev/null || break
    sleep 0.05
  done
  echo "FAIL host: vrio-client $1 is not waiting for a VMM (it served ${SESS[$1]}; alive: $(kill -0 "${CPIDS[$1]}" 2>/dev/null && echo yes || echo no))"
  return 1
}
start_qemu() {  # SIDE [INCOMING-URI]
  local side=$1 inc=${2:-} n
  client_ready "$side" || return 1
  QN=$((QN + 1)); n=$QN; QSIDE[$n]=$side; SESS[$side]=$((SESS[$side] + 1))
  local extra=()
  [ -n "$inc" ] && extra=(-incoming "$inc")
  qemu-system-x86_64 -name "vrio-net-recv-$n" -accel tcg,thread=multi -cpu max -smp 1 -m "${MEM}M" \
    -object memory-backend-memfd,id=mem,size=${MEM}M,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path="$WORK/$(sock_of "$side")" \
    -netdev vhost-user,id=n0,chardev=c0,queues=1 \
    -device virtio-net-pci,netdev=n0,mac="$MAC2" \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initramfs.cpio.gz" \
    -append "$APPEND_COMMON netip=10.0.0.2 peer=10.0.0.1 role=recv" \
    -display none -monitor "unix:$WORK/mon-$n.sock,server=on,wait=off" \
    -serial "file:$WORK/serial-$n.log" -no-reboot "${extra[@]}" > "$WORK/qemu-$n.log" 2>&1 &
  QPIDS[$n]=$!
  say "receiver QEMU $n (pid ${QPIDS[$n]}) on side $side ($(sock_of "$side"))${inc:+, -incoming $inc}"
}
. "$HERE/migrate-lib.sh"
g1_alive() { kill -0 "$G1PID" 2>/dev/null; }
# The receiver's latest "NET RECEIVED bytes=" in QEMU N's serial (0: none).
received() { local b; b=$(tr -d '\r' < "$WORK/serial-$1.log" 2>/dev/null | sed -n 's/.*NET RECEIVED bytes=\([0-9]*\).*/\1/p' | tail -n1); echo "${b:-0}"; }
# Its latest socket queue ("rxq=").
rxq() { tr -d '\r' < "$WORK/serial-$1.log" 2>/dev/null | sed -n 's/.*NET RECEIVED bytes=[0-9]* rxq=\([0-9]*\).*/\1/p' | tail -n1; }
sent_done() { grep -aq "NET SENT" "$WORK/serial-g1.log" 2>/dev/null; }

ok=1; RES=(); CUR=1
start_qemu a || { echo "RESULT: FAIL"; exit 1; }
say "waiting for the stream (up to $BOOTTMO s)"
for _ in $(seq $((BOOTTMO * 10))); do
  grep -aq "NET STREAMING" "$WORK/serial-g1.log" 2>/dev/null && break
  g1_alive && qemu_alive 1 || break
  sleep 0.1
done
if grep -aq "NET STREAMING" "$WORK/serial-g1.log" 2>/dev/null; then
  say "the sender streams: $(grep -a "NET STREAMING" "$WORK/serial-g1.log" | tr -d '\r')"
  # A few MiB in first, so the receiver's RX path is busy when logging starts.
  for _ in $(seq 600); do [ "$(received 1)" -gt 0 ] && break; qemu_alive 1 || break; sleep 0.1; done
  say "the receiver on side a has $(received 1) bytes"
  [ -n "$MAXBW" ] && hmp "$WORK/mon-1.sock" "migrate_set_parameter max-bandwidth $MAXBW"
  [ -n "$DOWNTIME_MS" ] && hmp "$WORK/mon-1.sock" "migrate_set_parameter downtime-limit $DOWNTIME_MS"
else
  echo "FAIL host: no stream within $BOOTTMO s (sender alive: $(g1_alive && echo yes || echo no), receiver alive: $(qemu_alive 1 && echo yes || echo no))"
  ok=0
fi

# ---- CANCEL: a migration that cannot finish, cancelled; the source goes on
# receiving, and its agent stops logging (LOG_ALL off).
if [ $ok = 1 ] && [ "$CANCEL" = 1 ]; then
  if next_destination "0 (the cancelled one)" "the receiver"; then
    BW0=$(hmp "$WORK/mon-$CUR.sock" --raw "info migrate_parameters" | sed -n 's/.*max-bandwidth: \([0-9]*\) bytes.*/\1/p')
    off0=$(grep -c "logging=false" "$WORK/client-$src.log")
    hmp "$WORK/mon-$CUR.sock" "migrate_set_parameter max-bandwidth $CANCEL_BW"
    say "cancelled migration: QEMU $CUR ($src) -> QEMU $d ($dst), max-bandwidth $CANCEL_BW, cancelled after $CANCEL_AFTER s"
    hmp "$WORK/mon-$CUR.sock" --migrate "tcp:127.0.0.1:$port" 120 "$CANCEL_AFTER" | tee "$WORK/cancel.txt"
    cst=$(sed -n 's/^MIGSTAT status=\([^ ]*\).*/\1/p' "$WORK/cancel.txt")
    kill "${QPIDS[$d]}" 2>/dev/null; reap_qemu "$d" 5
    hmp "$WORK/mon-$CUR.sock" "migrate_set_parameter max-bandwidth ${MAXBW:-${BW0:-134217728}B}"
    b0=$(received "$CUR")
    for _ in $(seq $(((GAP + 60) * 10))); do [ "$(received "$CUR")" -gt "$b0" ] && break; qemu_alive "$CUR" || break; sleep 0.1; done
    off1=$(grep -c "logging=false" "$WORK/client-$src.log")
    if [ "$cst" = cancelled ] && hmp "$WORK/mon-$CUR.sock" --raw "info status" | grep -q "running" \
      && [ "$(received "$CUR")" -gt "$b0" ] && [ "$off1" -gt "$off0" ]; then
      echo "NET MIGRATION CANCELLED OK $src->$dst (the receiver goes on on $src: $(received "$CUR") bytes, had $b0; its agent stopped logging)"
    else
      echo "FAIL host: the cancelled migration: status ${cst:-none}, receiver bytes $b0 -> $(received "$CUR"), 'logging=false' lines of client $src $off0 -> $off1"
      hmp "$WORK/mon-$CUR.sock" "info status"
      ok=0
    fi
  else
    ok=0
  fi
fi

# ---- the migrations of guest 2, back and forth
for i in $(seq "$MIGRATIONS"); do
  [ $ok = 1 ] || break
  next_destination "$i" "the receiver" || { ok=0; break; }
  b0=$(received "$CUR"); rq=$(rxq "$CUR")
  say "migration $i: QEMU $CUR ($src) -> QEMU $d ($dst) over tcp:127.0.0.1:$port; the receiver has $b0 bytes, ${rq:-?} more queued in its socket"
  hmp "$WORK/mon-$CUR.sock" --migrate "tcp:127.0.0.1:$port" "$MIGTMO" | tee "$WORK/mig-$i.txt"
  streaming=yes; sent_done && streaming=no
  line=$(sed -n 's/^MIGSTAT //p' "$WORK/mig-$i.txt")
  st=$(sed -n 's/^status=\([^ ]*\).*/\1/p' <<< "$line")
  f() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<< "$line"; }
  tot=$(f total_ms); dt=$(f downtime_ms); su=$(f setup_ms); trk=$(f transferred_kb)
  echo "NET MIGRATION $i $src->$dst status=${st:-none} total_ms=${tot:--} downtime_ms=${dt:--} setup_ms=${su:--} transferred_kb=${trk:--} streaming=$streaming rxq_before=${rq:--}"
  if [ "$st" != completed ]; then
    [ "$st" = refused ] && sed -n 's/^MIGSTAT .*error=/QEMU REFUSED MIGRATION: /p' "$WORK/mig-$i.txt"
    echo "FAIL host: migration $i $src->$dst ended with status ${st:-none}"
    hmp "$WORK/mon-$CUR.sock" "info status" 2>&1
    kill "${QPIDS[$d]}" 2>/dev/null; reap_qemu "$d" 5
    ok=0; break
  fi
  [ "$streaming" = yes ] || { echo "FAIL host: the sender had finished before migration $i completed (the stream must span the migrations)"; ok=0; }
  RES+=("$i $src->$dst total_ms=$tot downtime_ms=$dt setup_ms=$su transferred_kb=$trk streaming=$streaming rxq_before=${rq:--}")
  # The destination runs the guest; the source, paused, quits.
  run=
  for _ in $(seq 100); do
    hmp "$WORK/mon-$d.sock" --raw "info status" | grep -q "VM status: running" && { run=1; break; }
    qemu_alive "$d" || break
    sleep 0.1
  done
  [ -n "$run" ] || { echo "FAIL host: QEMU $d does not run the receiver after migration $i"; hmp "$WORK/mon-$d.sock" "info status"; ok=0; }
  hmp "$WORK/mon-$CUR.sock" "info status" "quit" > /dev/null 2>&1
  reap_qemu "$CUR" 30
  CUR=$d
  [ $ok = 1 ] || break
  # The receiver goes on on the new side: more bytes, reported from there.
  for _ in $(seq $(((GAP + 60) * 10))); do [ "$(received "$d")" -gt "$b0" ] && break; qemu_alive "$d" || break; sleep 0.1; done
  if [ "$(received "$d")" -gt "$b0" ]; then
    say "the receiver runs on side $dst (QEMU $d): $(received "$d") bytes (had $b0 before the migration)"
  else
    echo "FAIL host: the receiver reported no more bytes from side $dst within $((GAP + 60)) s of migration $i (had $b0)"
    tr -d '\r' < "$WORK/serial-$d.log" | grep -a "VRIO\[" | tail -n 5
    ok=0; break
  fi
  sleep "$GAP"
done

# ---- the end: the sender stops, both guests check and power off
if g1_alive; then
  python3 - "$CTLSOCK" <<'PY' && say "told the sender to stop" || { echo "FAIL host: cannot tell the sender to stop"; ok=0; }
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"stop\n")
s.close()
PY
fi
# Both guests power off when their scripts end.
for _ in $(seq $((TMO * 10))); do { g1_alive || qemu_alive "$CUR"; } || break; sleep 0.1; done
g1_alive && { say "guest 1 still running: killed"; kill "$G1PID"; }
wait "$G1PID" 2>/dev/null; G1RC=$?; G1PID=
say "guest 1 QEMU exited rc=$G1RC (124 = timeout)"
reap_qemu "$CUR" 5
for n in "${!QPIDS[@]}"; do kill "${QPIDS[$n]}" 2>/dev/null; reap_qemu "$n" 1; done

# ---- the agents: 1 exits after its VMM (--once); a and b still wait
for _ in $(seq 300); do kill -0 "${CPIDS[1]}" 2>/dev/null || break; sleep 0.1; done
if kill -0 "${CPIDS[1]}" 2>/dev/null; then
  echo "FAIL host: vrio-client 1 still running after its VMM left"; kill "${CPIDS[1]}"; wait "${CPIDS[1]}" 2>/dev/null; ok=0
else
  wait "${CPIDS[1]}"; rc=$?; [ "$rc" = 0 ] || { echo "FAIL host: vrio-client 1 exited rc=$rc"; ok=0; }
fi
unset "CPIDS[1]"
for s in a b; do
  if kill -0 "${CPIDS[$s]}" 2>/dev/null; then
    say "vrio-client $s alive after ${SESS[$s]} VMM session(s)"; kill "${CPIDS[$s]}"; wait "${CPIDS[$s]}" 2>/dev/null
  else
    wait "${CPIDS[$s]}"; echo "FAIL host: vrio-client $s died (rc=$?)"; ok=0
  fi
  unset "CPIDS[$s]"
done
kill -TERM "$SPID" 2>/dev/null; wait "$SPID"; SRC=$?; SPID=
[ "$SRC" = 0 ] || { echo "FAIL host: vrio-server exited rc=$SRC"; ok=0; }

# ---- the md5s
G1=$(tr -d '\r' < "$WORK/serial-g1.log" 2>/dev/null)
S=$(sed -n 's/.*NET SEND md5=\([0-9a-f]*\).*/\1/p' <<< "$G1" | head -n1)
SB=$(sed -n 's/.*NET SEND md5=[0-9a-f]* bytes=\([0-9]*\).*/\1/p' <<< "$G1" | head -n1)
R=; RB=; RN=
for n in $(seq "$QN"); do
  l=$(tr -d '\r' < "$WORK/serial-$n.log" 2>/dev/null | grep -a "NET RECV md5=" | head -n1)
  [ -n "$l" ] || continue
  R=$(sed -n 's/.*NET RECV md5=\([0-9a-f]*\).*/\1/p' <<< "$l"); RB=$(sed -n 's/.*bytes=\([0-9]*\).*/\1/p' <<< "$l"); RN=$n
done
sed -n 's/.*\(NET SENT .*\)/host: guest 1: \1/p' <<< "$G1"
if [ -n "$S" ] && [ "$S" = "$R" ] && [ "$SB" = "$RB" ]; then
  echo "HOST MD5 OK md5=$S bytes=$SB (received on QEMU $RN, side ${QSIDE[$RN]})"
else
  echo "HOST MD5 MISMATCH sent=${S:-none} bytes=${SB:-?} received=${R:-none} bytes=${RB:-?}${RN:+ (QEMU $RN)}"; ok=0
fi
grep -q "VRIO-GUEST-DONE rc=0" <<< "$G1" || { echo "FAIL host: the sender's script failed"; ok=0; }
[ -n "$RN" ] && grep -aq "VRIO-GUEST-DONE rc=0" "$WORK/serial-$RN.log" || { echo "FAIL host: the receiver's script failed"; ok=0; }
[ "$G1RC" = 0 ] || ok=0
[ "${#RES[@]}" = "$MIGRATIONS" ] || { echo "host: ${#RES[@]} of $MIGRATIONS migration(s) completed"; ok=0; }

echo "---- the dirty log, as the agents saw it:"
for s in a b; do
  grep -aE "SET_LOG_BASE|dirty logging|dirty log|LOG_ALL|queue attached|queue detached|disconnected|ended with an error" "$WORK/client-$s.log" \
    | sed "s/^/  client $s: /"
done
echo "---- the receiver (its lines over all $QN QEMUs):"
for n in $(seq "$QN"); do
  [ -f "$WORK/serial-$n.log" ] || continue
  echo "-- serial of QEMU $n (side ${QSIDE[$n]}):"
  tr -d '\r' < "$WORK/serial-$n.log" | grep -a "VRIO\[" | grep -av "NET RECEIVED" | sed 's/^/  /'
  echo "  NET RECEIVED on this side: $(tr -d '\r' < "$WORK/serial-$n.log" | grep -ac "NET RECEIVED") line(s), last $(received "$n") bytes"
done
echo "---- the sender:"
grep -a "VRIO\[" <<< "$G1" | grep -av "NET STREAMED" | sed 's/^/  /'
echo "---- figures (QEMU's info migrate; receiving a TCP stream, ${MEM} MiB, TCG, 1 vCPU):"
for r in "${RES[@]}"; do echo "  migration $r"; done
if [ $ok = 1 ]; then
  echo "host: total $(el) s"; echo "RESULT: PASS"; exit 0
fi
for s in 1 a b; do echo "---- vrio-client $s:"; cat "$WORK/client-$s.log"; done
echo "---- vrio-server:"; cat "$WORK/server.log"
echo "---- tail of the serial of guest 1 (sender):"
tr -d '\r' < "$WORK/serial-g1.log" 2>/dev/null | grep -avE '^\s*$' | tail -n "${SERIAL_TAIL:-60}"
[ -s "$WORK/qemu-g1.log" ] && sed "s/^/  qemu g1: /" "$WORK/qemu-g1.log"
for n in $(seq "$QN"); do
  echo "---- tail of the serial of receiver QEMU $n (side ${QSIDE[$n]}):"
  tr -d '\r' < "$WORK/serial-$n.log" 2>/dev/null | grep -avE '^\s*$' | tail -n "${SERIAL_TAIL:-60}"
done
echo "host: total $(el) s"
echo "RESULT: FAIL"; exit 1
