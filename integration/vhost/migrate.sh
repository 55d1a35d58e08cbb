#!/bin/bash
# Live migration of a guest whose vhost-user-blk disk vrio serves (issue 16):
#
#   QEMU #1 (side a) --vhost-user--> vrio-client a (--vm-host host-a) -+
#                                                                      +--> vrio-server io-a --disk file
#   QEMU #2 (side b, -incoming) --> vrio-client b (--vm-host host-b) --+       (vrio-controller places both)
#
# Both clients serve the same device (--device-name vub, its credential from
# the controller) on their own sockets and keep serving after their VMM
# leaves (no --once). The source QEMU boots the guest (GUEST-SCRIPT, default
# migrate-guest.sh, image with fio); once it prints "MIGRATE GUEST READY",
# the host migrates it MIGRATIONS times back and forth: each time a new QEMU
# starts on the other side with the same devices and memory and
# `-incoming tcp:127.0.0.1:PORT`, the source's HMP monitor runs
# `migrate -d` and `info migrate` until the migration completed or failed,
# the old QEMU quits, and after GAP s (and a loop line of the guest's on the
# new side) the next migration goes the other way. Each one prints
#   MIGRATION i a->b total_ms=... downtime_ms=... setup_ms=... status=completed
# as QEMU reports it. Then the host writes "VRIO HOST DONE" in the disk's
# last 4 KiB, the guest ends its I/O and runs its checks, and the host waits
# for "VRIO-GUEST-DONE rc=0" on the last QEMU's serial, checks the backing
# file's ext4 (e2fsck -fn), stops everything and prints "RESULT: PASS" or
# "RESULT: FAIL" (with the logs). A guest that stops making progress gets a
# diagnosis first: each vring's avail/used indexes and used_event/avail_event
# as they are in guest memory (HMP info virtio-vhost-queue-status + xp), and
# the guest's blocked tasks (sysrq 9 and w through sendkey).
#
# Usage: migrate.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]
#   (vrio-controller and vrio-ctl are taken from VRIO-SERVER's directory)
# Env:   MIGRATIONS (3), GAP (s of guest I/O between migrations, 5),
#        CANCEL (1: first a migration capped at CANCEL_BW (1M) per second
#        that cannot finish, cancelled after CANCEL_AFTER s (3), status
#        "cancelled", its destination QEMU killed, the bandwidth restored;
#        "MIGRATION CANCELLED OK"), NOIO (1: the guest idles, noio=1),
#        MIGTMO (s per migration, 180), MAXBW (max-bandwidth for the real
#        migrations, e.g. 1G; default QEMU's), DOWNTIME_MS (downtime-limit;
#        default QEMU's 300), NQ (2), SMP (2), MEM (512 MiB), DISKMB (256),
#        FSMB (96), FIOOFF (128), FIOMB (64), TMO (s the guest gets after the
#        host's done line, 300), APPEND (more kernel parameters), FABRIC
#        (soft), WORK (temp dir; KEEP=1 keeps it), SERIAL_TAIL (60),
#        READ_DELAY_MS (20: the I/O server holds every read this long, with
#        a "fault" stage set through the controller, so requests are in
#        flight whenever QEMU stops the guest: they complete while the
#        vrings drain, after the last copy of guest RAM began; 0: none),
#        UNLOGGED (1: both clients get --test-unlogged-writes: they do not
#        mark what the I/O server writes in QEMU's dirty log, so the
#        destination loses data; the run must then fail its verification).
# Each completed migration is followed by a check that the controller
# moved the device to the destination's VM host ("CONTROL PLANE vub on
# host-X", from vrio-ctl devices).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:?usage: migrate.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]}
CLIENT=${2:?vrio-client missing}
SCRIPT=${3:-$HERE/migrate-guest.sh}
BIN=$(dirname "$SERVER")
NQ=${NQ:-2}; SMP=${SMP:-2}; MEM=${MEM:-512}; TMO=${TMO:-300}
DISKMB=${DISKMB:-256}; FSMB=${FSMB:-96}; FIOOFF=${FIOOFF:-128}; FIOMB=${FIOMB:-64}
MIGRATIONS=${MIGRATIONS:-3}; GAP=${GAP:-5}; CANCEL=${CANCEL:-0}; NOIO=${NOIO:-0}
READ_DELAY_MS=${READ_DELAY_MS:-20}; UNLOGGED=${UNLOGGED:-0}; UNLOG=(); [ "$UNLOGGED" = 1 ] && UNLOG=(--test-unlogged-writes)
CANCEL_BW=${CANCEL_BW:-1M}; CANCEL_AFTER=${CANCEL_AFTER:-3}; MIGTMO=${MIGTMO:-180}
MAXBW=${MAXBW:-}; DOWNTIME_MS=${DOWNTIME_MS:-}; FABRIC=${FABRIC:-soft}
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/vrio-migrate.XXXXXX")}
mkdir -p "$WORK"
DISK=$WORK/disk.raw
SPIDS=(); declare -A CPIDS=(); declare -A QPIDS=()
cleanup() {
  for p in "${QPIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${CPIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${SPIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  [ -z "${KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
T0=$(date +%s.%N)
el() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}'; }
say() { echo "host: $* ($(el) s)"; }
for f in vrio-controller vrio-ctl; do
  [ -x "$BIN/$f" ] || { echo "$BIN/$f missing (build it next to vrio-server)"; echo "RESULT: FAIL"; exit 1; }
done
[ "$NOIO" = 1 ] || [ "${FIO:-1}" = 1 ] || { echo "the guest's I/O needs fio (FIO=1)"; echo "RESULT: FAIL"; exit 1; }
FIO=1 "$HERE/build-initramfs.sh" "$WORK/initramfs.cpio.gz" "$SCRIPT" || { echo "RESULT: FAIL (initramfs)"; exit 1; }

# ---- HMP: one connection per call; the monitor takes one client at a time.
# QEMU's HMP monitor, from python3 (integration/vhost/hmp.py).
hmp() { python3 "$HERE/hmp.py" "$@"; }

# ---- control plane and I/O server, as run.sh's BACKEND=controlled (one server)
export VRIO_TOKEN=vhost-migrate-token
qemu-img create -f raw "$DISK" "${DISKMB}M" > /dev/null || { echo "RESULT: FAIL"; exit 1; }
"$BIN/vrio-ctl" key generate --out "$WORK/data.key" > /dev/null || { echo "RESULT: FAIL"; exit 1; }
"$BIN/vrio-controller" --listen 127.0.0.1:0 --memory --lease-ttl-ms 3000 --tick-ms 200 \
  --rebalance-secs 0 --data-key "$WORK/data.key" > "$WORK/controller.log" 2>&1 &
SPIDS+=($!)
for _ in $(seq 100); do grep -qE '^127\.0\.0\.1:[0-9]+$' "$WORK/controller.log" && break; sleep 0.1; done
CTL=$(grep -E '^127\.0\.0\.1:[0-9]+$' "$WORK/controller.log" | head -n1)
[ -n "$CTL" ] || { echo "vrio-controller did not start:"; cat "$WORK/controller.log"; echo "RESULT: FAIL"; exit 1; }
LISTEN=127.0.0.1:0; [ "$FABRIC" = shm ] && LISTEN=unix:$WORK/io-a.sock
RUST_LOG=${RUST_LOG:-info} "$SERVER" --fabric "$FABRIC" --listen "$LISTEN" --disk file --file "$DISK" --size-mib "$DISKMB" \
  --key-file "$WORK/data.key" --sidecores 2 --stats-every 0 --controller "$CTL" --server-id io-a \
  > "$WORK/server.log" 2>&1 &
SPIDS+=($!)
for _ in $(seq 200); do
  [ "$("$BIN/vrio-ctl" --addr "$CTL" servers --json 2>/dev/null | grep -o '"alive": *true' | wc -l)" = 1 ] && break
  sleep 0.1
done
say "vrio-controller on $CTL, I/O server:"; "$BIN/vrio-ctl" --addr "$CTL" servers
"$BIN/vrio-ctl" --addr "$CTL" volume create default --size-mib "$DISKMB" > /dev/null &&
  "$BIN/vrio-ctl" --addr "$CTL" volume grant default vub --mode rw > /dev/null ||
  { echo "host: could not grant the volume"; echo "RESULT: FAIL"; exit 1; }
if [ "$READ_DELAY_MS" -gt 0 ]; then
  "$BIN/vrio-ctl" --addr "$CTL" policy set vub --json \
    "{\"stages\":[{\"stage\":\"fault\",\"first_sector\":0,\"sectors\":$((DISKMB * 2048)),\"ops\":[\"read\"],\"delay_ms\":$READ_DELAY_MS}]}" > /dev/null ||
    { echo "host: could not set the read delay"; echo "RESULT: FAIL"; exit 1; }
  say "the I/O server holds every read of vub for $READ_DELAY_MS ms"
fi
control_plane() {  # WHEN
  echo "---- control plane $1: vrio-ctl devices"
  "$BIN/vrio-ctl" --addr "$CTL" devices 2>&1 | sed 's/^/  /'
  echo "---- control plane $1: vrio-ctl assignments"
  "$BIN/vrio-ctl" --addr "$CTL" assignments 2>&1 | sed 's/^/  /'
}

# ---- the two VM hosts' agents: same device, own socket, own VM id
waits() { local n; n=$(grep -c 'waiting for a VMM' "$WORK/client-$1.log" 2>/dev/null); echo "${n:-0}"; }
start_client() {  # SIDE
  RUST_LOG=${RUST_LOG:-info} "$CLIENT" vhost-user-blk --fabric "$FABRIC" --socket "$WORK/vub-$1.sock" \
    --controller "$CTL" --device-name vub --vm-id vm1 --vm-host "host-$1" --queues "$NQ" "${UNLOG[@]}" >> "$WORK/client-$1.log" 2>&1 &
  CPIDS[$1]=$!
  for _ in $(seq 600); do [ -S "$WORK/vub-$1.sock" ] && [ "$(waits "$1")" -ge 1 ] && break; sleep 0.05; done
  [ "$(waits "$1")" -ge 1 ] || { echo "vrio-client $1 did not start:"; cat "$WORK/client-$1.log"; echo "RESULT: FAIL"; exit 1; }
  say "vrio-client $1 (pid ${CPIDS[$1]}, vm host-$1) on $WORK/vub-$1.sock: $(head -n1 "$WORK/client-$1.log")"
}
start_client a
start_client b
control_plane "with both agents up, before the guest"

# ---- QEMUs: number N on SIDE, the same devices and memory each time
declare -A SESS=([a]=0 [b]=0)
QN=0; declare -A QSIDE=()
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
start_qemu() {  # SIDE [INCOMING-URI]: QEMU number QN+1
  local side=$1 inc=${2:-} n
  client_ready "$side" || return 1
  QN=$((QN + 1)); n=$QN; QSIDE[$n]=$side; SESS[$side]=$((SESS[$side] + 1))
  local extra=()
  [ -n "$inc" ] && extra=(-incoming "$inc")
  qemu-system-x86_64 -name "vrio-mig-$n" -accel tcg,thread=multi -cpu max -smp "$SMP" -m "${MEM}M" \
    -object memory-backend-memfd,id=mem,size=${MEM}M,share=on -numa node,memdev=mem \
    -chardev socket,id=vub0,path="$WORK/vub-$side.sock" \
    -device vhost-user-blk-pci,chardev=vub0,num-queues="$NQ" \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initramfs.cpio.gz" \
    -append "console=ttyS0 loglevel=4 panic=-1 fsmb=$FSMB fiooff=$FIOOFF fiomb=$FIOMB noio=$NOIO ${APPEND:-}" \
    -nic none -display none -monitor "unix:$WORK/mon-$n.sock,server=on,wait=off" \
    -serial "file:$WORK/serial-$n.log" -no-reboot "${extra[@]}" > "$WORK/qemu-$n.log" 2>&1 &
  QPIDS[$n]=$!
  say "QEMU $n (pid ${QPIDS[$n]}) on side $side${inc:+, -incoming $inc}"
}
. "$HERE/migrate-lib.sh"
# The guest's serial lines ("VRIO[") so far, over every QEMU.
serial() { cat "$WORK"/serial-*.log 2>/dev/null | tr -d '\r'; }
wait_serial() {  # N MARK SECONDS
  for _ in $(seq $(($3 * 10))); do
    grep -aq "$2" "$WORK/serial-$1.log" 2>/dev/null && return 0
    qemu_alive "$1" || break
    sleep 0.1
  done
  grep -aq "$2" "$WORK/serial-$1.log" 2>/dev/null
}
loops() { local n; n=$(grep -acE "MIGRATE (LOOP|IDLE)" "$WORK/serial-$1.log" 2>/dev/null); echo "${n:-0}"; }
# The guest's done line, in the disk's last 4 KiB (read there with O_DIRECT).
host_done() {
  printf 'VRIO HOST DONE\n' | dd of="$DISK" bs=4096 seek=$((DISKMB * 256 - 1)) conv=notrunc 2>/dev/null
  say "told the guest its I/O may end"
}

ok=1; RES=(); CUR=1
start_qemu a || { echo "RESULT: FAIL"; exit 1; }
if ! wait_serial 1 "MIGRATE GUEST READY" 240; then
  echo "FAIL host: the guest did not get ready (serial of QEMU 1):"; serial | tail -n 40
  reap_qemu 1 1; ok=0
else
  say "the guest is ready: $(grep -a "MIGRATE GUEST READY" "$WORK/serial-1.log" | tr -d '\r')"
  sleep 2
  control_plane "with the guest running on side a"
  hmp "$WORK/mon-1.sock" "info migrate_parameters" > "$WORK/params.txt"
  BW0=$(sed -n 's/.*max-bandwidth: \([0-9]*\) bytes.*/\1/p' "$WORK/params.txt")
  [ -n "$MAXBW" ] && hmp "$WORK/mon-1.sock" "migrate_set_parameter max-bandwidth $MAXBW"
  [ -n "$DOWNTIME_MS" ] && hmp "$WORK/mon-1.sock" "migrate_set_parameter downtime-limit $DOWNTIME_MS"
fi
# A guest that stopped: QEMU's view of the vrings (the guest's indexes in
# memory, and the back-end's) and the guest's blocked tasks (sysrq w).
diagnose() {  # N
  local n=$1 path q
  qemu_alive "$n" || return 0
  echo "---- diagnosis of QEMU $n (side ${QSIDE[$n]}):"
  hmp "$WORK/mon-$n.sock" "info status"
  path=$(hmp "$WORK/mon-$n.sock" --raw "info virtio" | sed -n 's/^\(\/[^ ]*\) \[.*block.*/\1/p' | head -n1)
  [ -n "$path" ] || path=$(hmp "$WORK/mon-$n.sock" --raw "info virtio" | awk '{print $1}' | head -n1)
  for q in $(seq 0 $((NQ - 1))); do
    local st av us
    st=$(hmp "$WORK/mon-$n.sock" --raw "info virtio-vhost-queue-status $path $q")
    av=$(sed -n 's/.*avail_phys: *\(0x[0-9a-f]*\).*/\1/p' <<< "$st"); us=$(sed -n 's/.*used_phys: *\(0x[0-9a-f]*\).*/\1/p' <<< "$st")
    [ -n "$av" ] && [ -n "$us" ] || { echo "$st"; continue; }
    # The split ring in guest memory: avail flags, idx, ring[128], used_event;
    # used flags, idx, ring[128] (8 bytes each), avail_event.
    local qs=$(sed -n 's/.*num: *\([0-9]*\).*/\1/p' <<< "$st" | head -n1)
    echo "host: vring $q (size ${qs:-?}) in guest memory, avail at $av, used at $us:"
    local what addr cnt
    for what in "avail.flags avail.idx:$av:2" "used_event:$((av + 4 + 2 * ${qs:-128})):1" \
      "used.flags used.idx:$us:2" "avail_event:$((us + 4 + 8 * ${qs:-128})):1"; do
      IFS=: read -r what addr cnt <<< "$what"
      echo "  $what = $(hmp "$WORK/mon-$n.sock" --raw "xp /${cnt}hx $addr" | sed 's/^[0-9a-f]*: *//')"
    done
  done
  # The guest's blocked tasks, at a console log level that shows them.
  hmp "$WORK/mon-$n.sock" "sendkey alt-sysrq-9" "sendkey alt-sysrq-w" > /dev/null
  sleep 3
  echo "-- the guest's serial after sysrq-w:"
  tr -d '\r' < "$WORK/serial-$n.log" | grep -avE '^\s*$' | tail -n 80
}

# ---- CANCEL: a migration that cannot finish, cancelled; the source goes on.
if [ $ok = 1 ] && [ "$CANCEL" = 1 ]; then
  if next_destination "0 (the cancelled one)" "the guest"; then
    hmp "$WORK/mon-$CUR.sock" "migrate_set_parameter max-bandwidth $CANCEL_BW"
    hmp "$WORK/mon-$CUR.sock" --migrate "tcp:127.0.0.1:$port" 120 "$CANCEL_AFTER" | tee "$WORK/cancel.txt"
    st=$(sed -n 's/^MIGSTAT status=\([^ ]*\).*/\1/p' "$WORK/cancel.txt")
    kill "${QPIDS[$d]}" 2>/dev/null; reap_qemu "$d" 5
    if [ -n "$BW0" ]; then hmp "$WORK/mon-$CUR.sock" "migrate_set_parameter max-bandwidth ${MAXBW:-${BW0}B}"; fi
    hmp "$WORK/mon-$CUR.sock" "info status"
    if [ "$st" = cancelled ] && hmp "$WORK/mon-$CUR.sock" --raw "info status" | grep -q "running"; then
      # The guest goes on with its I/O on the source.
      l0=$(loops "$CUR"); sleep "$GAP"
      for _ in $(seq 600); do [ "$(loops "$CUR")" -gt "$l0" ] && break; qemu_alive "$CUR" || break; sleep 0.1; done
      if [ "$(loops "$CUR")" -gt "$l0" ]; then
        echo "MIGRATION CANCELLED OK $src->$dst (the guest runs on $src: $(($(loops "$CUR") - l0)) more loop line(s))"
      else
        echo "FAIL host: after the cancelled migration the guest made no progress on $src"; ok=0
        diagnose "$CUR"
      fi
    else
      echo "FAIL host: the cancelled migration ended with status ${st:-none}, or the source is not running"; ok=0
      sed -n 's/^MIGSTAT .*error=/QEMU REFUSED MIGRATION: /p' "$WORK/cancel.txt"
    fi
  else
    ok=0
  fi
fi

# ---- the migrations, back and forth
for i in $(seq "$MIGRATIONS"); do
  [ $ok = 1 ] || break
  next_destination "$i" "the guest" || { ok=0; break; }
  say "migration $i: QEMU $CUR ($src) -> QEMU $d ($dst) over tcp:127.0.0.1:$port"
  hmp "$WORK/mon-$CUR.sock" --migrate "tcp:127.0.0.1:$port" "$MIGTMO" | tee "$WORK/mig-$i.txt"
  st=$(sed -n 's/^MIGSTAT status=\([^ ]*\).*/\1/p' "$WORK/mig-$i.txt")
  line=$(sed -n 's/^MIGSTAT //p' "$WORK/mig-$i.txt")
  tot=$(sed -n 's/.* total_ms=\([^ ]*\).*/\1/p' <<< "$line"); dt=$(sed -n 's/.* downtime_ms=\([^ ]*\).*/\1/p' <<< "$line")
  su=$(sed -n 's/.* setup_ms=\([^ ]*\).*/\1/p' <<< "$line"); tr_=$(sed -n 's/.* transferred_kb=\([^ ]*\).*/\1/p' <<< "$line")
  echo "MIGRATION $i $src->$dst total_ms=${tot:--} downtime_ms=${dt:--} setup_ms=${su:--} transferred_kb=${tr_:--} io=$((1 - NOIO)) status=${st:-none}"
  if [ "$st" != completed ]; then
    [ "$st" = refused ] && sed -n 's/^MIGSTAT .*error=/QEMU REFUSED MIGRATION: /p' "$WORK/mig-$i.txt"
    echo "FAIL host: migration $i $src->$dst ended with status ${st:-none}"
    hmp "$WORK/mon-$CUR.sock" "info status" 2>&1
    kill "${QPIDS[$d]}" 2>/dev/null; reap_qemu "$d" 5
    ok=0; break
  fi
  RES+=("$i $src->$dst total_ms=$tot downtime_ms=$dt")
  # The destination runs the guest; the source, paused, quits.
  run=
  for _ in $(seq 100); do
    hmp "$WORK/mon-$d.sock" --raw "info status" | grep -q "VM status: running" && { run=1; break; }
    qemu_alive "$d" || break
    sleep 0.1
  done
  [ -n "$run" ] || { echo "FAIL host: QEMU $d does not run the guest after migration $i"; hmp "$WORK/mon-$d.sock" "info status"; ok=0; }
  hmp "$WORK/mon-$CUR.sock" "info status" "quit" > /dev/null 2>&1
  reap_qemu "$CUR" 30
  CUR=$d
  [ $ok = 1 ] || break
  # The guest's I/O runs on the new side: a loop line of its there, GAP s.
  l0=$(loops "$d"); sleep "$GAP"
  for _ in $(seq 600); do [ "$(loops "$d")" -gt "$l0" ] && break; qemu_alive "$d" || break; sleep 0.1; done
  if [ "$(loops "$d")" -gt "$l0" ]; then
    say "the guest runs on $dst: $(grep -aE "MIGRATE (LOOP|IDLE)" "$WORK/serial-$d.log" | tail -n1 | tr -d '\r')"
  else
    echo "FAIL host: no loop line from the guest on $dst within $((GAP + 60)) s of migration $i"
    serial | grep -a "VRIO\[" | tail -n 5
    diagnose "$d"
    ok=0
  fi
  control_plane "after migration $i ($src->$dst)"
  # The destination's client told the controller (ClaimDevice) when its
  # vrings attached: the device's agent is host-$dst now (up to 10 s).
  owner=
  for _ in $(seq 100); do
    owner=$("$BIN/vrio-ctl" --addr "$CTL" devices 2>/dev/null | awk '$1 == "vub" { print $5 }')
    [ "$owner" = "host-$dst" ] && break
    sleep 0.1
  done
  if [ "$owner" = "host-$dst" ]; then
    echo "CONTROL PLANE vub on host-$dst after migration $i"
  else
    echo "FAIL host: after migration $i the controller has vub's agent at '${owner}', not host-$dst"
    ok=0
  fi
done

# ---- the end: the guest's checks on the last side
host_done
if qemu_alive "$CUR"; then
  # A guest already found stuck gets less.
  t=$TMO; [ $ok = 1 ] || t=30
  if wait_serial "$CUR" "VRIO-GUEST-DONE" "$t"; then :; else echo "FAIL host: no end of the guest on QEMU $CUR within $t s"; diagnose "$CUR"; ok=0; fi
  reap_qemu "$CUR" 30
fi
G=$(tr -d '\r' < "$WORK/serial-$CUR.log" 2>/dev/null)
grep -q "VRIO-GUEST-DONE rc=0" <<< "$G" || { echo "FAIL host: the guest script failed (serial of QEMU $CUR)"; ok=0; }
grep -q "MIGRATE GUEST OK" <<< "$G" || ok=0
control_plane "at the end"
# Every QEMU is gone; the agents still wait for their next VMM.
for n in "${!QPIDS[@]}"; do kill "${QPIDS[$n]}" 2>/dev/null; reap_qemu "$n" 1; done
for s in a b; do
  if kill -0 "${CPIDS[$s]}" 2>/dev/null; then
    say "vrio-client $s alive after ${SESS[$s]} VMM session(s)"; kill "${CPIDS[$s]}"; wait "${CPIDS[$s]}" 2>/dev/null
  else
    wait "${CPIDS[$s]}"; echo "FAIL host: vrio-client $s died (rc=$?)"; ok=0
  fi
  unset "CPIDS[$s]"
done
for p in "${SPIDS[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
SPIDS=()
if e2fsck -fn "$DISK" > "$WORK/e2fsck.log" 2>&1; then echo "HOST E2FSCK OK"; else echo "HOST E2FSCK FAILED:"; cat "$WORK/e2fsck.log"; ok=0; fi
[ "${#RES[@]}" = "$MIGRATIONS" ] || { echo "host: ${#RES[@]} of $MIGRATIONS migration(s) completed"; ok=0; }

echo "---- the guest (its lines over all $QN QEMUs):"
for n in $(seq "$QN"); do
  [ -f "$WORK/serial-$n.log" ] || continue
  echo "-- serial of QEMU $n (side ${QSIDE[$n]}):"
  tr -d '\r' < "$WORK/serial-$n.log" | grep -a "VRIO\[" | grep -avE "MIGRATE (LOOP|IDLE)" | sed 's/^/  /'
  echo "  ($(loops "$n") loop line(s) on this side)"
done
echo "---- figures (QEMU's info migrate; io=$((1 - NOIO)), ${MEM} MiB, TCG, $SMP vCPUs):"
for r in "${RES[@]}"; do echo "  migration $r"; done
if [ $ok = 1 ]; then
  echo "host: total $(el) s"; echo "RESULT: PASS"; exit 0
fi
for s in a b; do echo "---- vrio-client $s:"; cat "$WORK/client-$s.log"; done
echo "---- vrio-server io-a:"; cat "$WORK/server.log"
echo "---- vrio-controller:"; cat "$WORK/controller.log"
for n in $(seq "$QN"); do
  echo "---- tail of the serial of QEMU $n (side ${QSIDE[$n]}):"
  tr -d '\r' < "$WORK/serial-$n.log" 2>/dev/null | grep -avE '^\s*$' | tail -n "${SERIAL_TAIL:-60}"
done
echo "host: total $(el) s"
echo "RESULT: FAIL"; exit 1
