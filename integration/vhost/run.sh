#!/bin/bash
# Host side of the vhost-user-blk end-to-end run:
#   QEMU (TCG, stock Debian kernel, virtio_blk on vhost-user-blk-pci)
#     -> vrio-client vhost-user-blk (the VM-host agent)
#     -> soft (or shm) fabric -> vrio-server --disk file (the I/O server);
#   or, with BACKEND=local, vrio-client vhost-user-blk --local-file serving
#   the vrings itself with a local sidecore (no I/O server).
# The guest runs GUEST-SCRIPT (default blk.sh); afterwards the host checks
# the server's backing file: the pattern's md5, e2fsck -fn on the ext4 part
# and a file's md5 read with debugfs.
#
# Usage: run.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]
# Env:   NQ (queues, default 2), SMP (2), MEM (512 MiB), TMO (guest timeout s, 300),
#        BLKMB (64), PATOFF (192), FSMB (128; 0: no ext4 part, guest or
#        host), DISKMB (256), WORK (temp dir),
#        FABRIC (soft: loopback TCP, default; shm: shared memory over a
#        Unix socket in WORK), BACKEND (vrio: remote I/O server; local: vrio local sidecore;
#        qsd: qemu-storage-daemon's vhost-user-blk export on the same kind
#        of file, the baseline for compare.sh),
#        CHECKS (1: the blk.sh checks on the backing file; 0: none),
#        BOOTS (guests booted one after another against the same vrio-client,
#        default 1: the client must survive each VMM disconnect)
#        APPEND (more kernel parameters for the guest script), FIO (1: fio
#        in the guest image), SERIAL_TAIL (serial lines printed, 200),
#        KILLS (e.g. "5 12+1.5": SIGKILL vrio-client that many seconds after
#        the guest prints "RECONNECT IO START" and start it again on the same
#        socket after RESTART_DELAY s (0.5); "T+H" first SIGSTOPs it at T and
#        kills it H s after the guest is inside an iteration's dds, so the
#        guest surely has requests in flight; "T*H" SIGSTOPs the I/O server
#        at T instead, kills the client likewise and SIGCONTs the server
#        before the restart, so requests the client saw (and recorded in the
#        inflight region) are in flight; each kill waits until the client
#        attached all NQ vrings; QEMU's chardev reconnects every
#        RECONNECT_MS ms (500); needs BOOTS=1 and a vrio back-end),
#        BACKEND=controlled: vrio-controller (next to VRIO-SERVER) and two
#        vrio-servers io-a and io-b on the same backing file; the client asks
#        the controller where each vring goes and follows its moves;
#        MOVES (e.g. "4 8 12": that many seconds after "RECONNECT IO START"
#        and all NQ vrings attached, vrio-ctl moves every queue to the other
#        server, io-b first; each round waits for the agent's handovers),
#        with KILLS or MOVES the guest (reconnect.sh, hostdone=1) loops until
#        the host writes "VRIO HOST DONE" in the disk's last 4 KiB, once its
#        kills or moves are over and the last client runs every vring,
#        HOTPLUG (MiB: QEMU gets -m MEM,slots=2,maxmem=MEM+HOTPLUG and an HMP
#        monitor socket; when the guest prints "HOTPLUG READY", a pc-dimm
#        of that size on a shared memfd is plugged; guest: hotplug.sh),
#        DISK_IMAGE (the backing file instead of WORK/disk.raw, left in
#        place afterwards; an existing one is used as it is: a second run
#        reads back what the first wrote),
#        CRYPT_KEY (128 hex digits, BACKEND=vrio only: vrio-server gets
#        --policy CRYPT_DEVICE=FILE, an AES-XTS-256 "crypt" stage with this
#        key, for the device vrio-client attaches as (CRYPT_DEVICE, default
#        0, its --device-id); the backing file then holds ciphertext, so the
#        host's plaintext checks (pattern md5, e2fsck -fn, debugfs) give way
#        to the marker check; guest: crypt.sh),
#        MARKER (a string the guest wrote, default VRIO-PLAINTEXT-MARKER
#        with CRYPT_KEY: run.sh counts it in the backing file, "HOST MARKER
#        count=N"; with CRYPT_KEY any occurrence fails the run)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:?usage: run.sh VRIO-SERVER VRIO-CLIENT [GUEST-SCRIPT]}
CLIENT=${2:?vrio-client missing}
SCRIPT=${3:-$HERE/blk.sh}
NQ=${NQ:-2}; SMP=${SMP:-2}; MEM=${MEM:-512}; TMO=${TMO:-300}
BLKMB=${BLKMB:-64}; PATOFF=${PATOFF:-192}; FSMB=${FSMB:-128}; DISKMB=${DISKMB:-256}
KVER=${KVER:-$(ls /boot/vmlinuz-*-amd64 | sed "s|/boot/vmlinuz-||" | sort -V | tail -n1)}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/vrio-vhost.XXXXXX")}
mkdir -p "$WORK"
DISK=${DISK_IMAGE:-$WORK/disk.raw}; SOCK=$WORK/vub.sock; SERIAL=$WORK/serial.log
SPID=; CPID=; KPID=; SPIDS=(); MPID=; HPID=
cleanup() {
  [ -n "$HPID" ] && kill "$HPID" 2>/dev/null
  [ -n "$KPID" ] && kill "$KPID" 2>/dev/null
  [ -n "$MPID" ] && kill "$MPID" 2>/dev/null
  for p in "${SPIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -f "$WORK/client.pid" ] && kill "$(cat "$WORK/client.pid")" 2>/dev/null
  [ -n "$CPID" ] && kill "$CPID" 2>/dev/null
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null
  wait 2>/dev/null
  [ -z "${KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
T0=$(date +%s.%N)
el() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}'; }

"$HERE/build-initramfs.sh" "$WORK/initramfs.cpio.gz" "$SCRIPT" || { echo "RESULT: FAIL (initramfs)"; exit 1; }

BACKEND=${BACKEND:-vrio}; CHECKS=${CHECKS:-1}; BOOTS=${BOOTS:-1}
CRYPT_KEY=${CRYPT_KEY:-}; CRYPT_DEVICE=${CRYPT_DEVICE:-0}
MARKER=${MARKER:-}; [ -n "$CRYPT_KEY" ] && MARKER=${MARKER:-VRIO-PLAINTEXT-MARKER}
if [ -n "$CRYPT_KEY" ] && [ "$BACKEND" != vrio ]; then
  echo "CRYPT_KEY needs BACKEND=vrio (the I/O server encrypts)"; echo "RESULT: FAIL"; exit 1
fi
# A fresh backing file, unless DISK_IMAGE names one that exists.
new_disk() {
  [ -n "${DISK_IMAGE:-}" ] && [ -e "$DISK" ] && return 0
  qemu-img create -f raw "$DISK" "${DISKMB}M" > /dev/null
}
FABRIC=${FABRIC:-soft}
# Where an I/O server named $1 listens on $FABRIC.
listen_addr() { if [ "$FABRIC" = shm ]; then echo "unix:$WORK/io-$1.sock"; else echo 127.0.0.1:0; fi; }
ONCE=; [ "$BOOTS" = 1 ] && ONCE=--once
KILLS=${KILLS:-}; RESTART_DELAY=${RESTART_DELAY:-0.5}; RECONNECT_MS=${RECONNECT_MS:-500}
if [ -n "$KILLS" ] && { [ "$BOOTS" != 1 ] || [ "$BACKEND" = qsd ]; }; then
  echo "KILLS needs BOOTS=1 and BACKEND vrio or local"; echo "RESULT: FAIL"; exit 1
fi

# Starts vrio-client with CLIENT_ARGS, appending to client.log, its pid in
# CPID and $WORK/client.pid; returns once it listens on the socket.
start_client() {
  local before up=
  before=$(grep -c 'waiting for a VMM' "$WORK/client.log" 2>/dev/null); before=${before:-0}
  # A killed client leaves its socket file, which the new one unlinks
  # before it binds (after it logs): gone first, the file means bound.
  rm -f "$SOCK"
  RUST_LOG=${RUST_LOG:-info} "$CLIENT" "${CLIENT_ARGS[@]}" >> "$WORK/client.log" 2>&1 &
  CPID=$!; echo "$CPID" > "$WORK/client.pid"
  listening() { [ -S "$SOCK" ] && [ "$(grep -c 'waiting for a VMM' "$WORK/client.log")" -gt "$before" ]; }
  # Up to 30 s: a restart under load must not fail on a slow start.
  for _ in $(seq 600); do listening && { up=1; break; }; sleep 0.05; done
  [ -n "$up" ] || { echo "vrio-client did not start on $SOCK:"; cat "$WORK/client.log"; echo "RESULT: FAIL"; return 1; }
  [ "$before" != 0 ] || head -n1 "$WORK/client.log"
}

# Waits (up to 300 s) for MARK in the guest's serial log; false if it never
# came (or QEMU ended first).
wait_serial() {  # MARK
  for _ in $(seq 3000); do
    grep -aq "$1" "$SERIAL" 2>/dev/null && return 0
    [ -e "$WORK/qemu.done" ] && break
    sleep 0.1
  done
  grep -aq "$1" "$SERIAL" 2>/dev/null
}

# KILLS, MOVES: tells the guest's loop (reconnect.sh) the host's events
# are over: a line in the disk's last 4 KiB, which it reads with O_DIRECT
# through the back-end every iteration.
host_done() {
  printf 'VRIO HOST DONE\n' | dd of="$DISK" bs=4096 seek=$((DISKMB * 256 - 1)) conv=notrunc 2>/dev/null
  echo "host: told the guest its I/O loop may end ($(el) s)"
}

# Distinct vrings the newest vrio-client attached (its part of client.log
# starts at its banner; tracing colours stripped).
attached() {
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/client.log" 2>/dev/null | awk '
    /vrio-client: vhost-user-blk on /{split("", s); n=0}
    /queue attached/ && match($0, /queue=[0-9]+/) {q=substr($0, RSTART, RLENGTH); if (!(q in s)) {s[q]=1; n++}}
    END{print n+0}'
}

# Waits (up to 60 s) until the newest client attached all NQ vrings: the
# guest's I/O (on every CPU, so every queue) attaches them; the tests count
# each client's attach of each vring, and a move hands over attached ones.
wait_attached() {  # WHAT
  for _ in $(seq 600); do
    [ "$(attached)" -ge "$NQ" ] && return 0
    [ -e "$WORK/qemu.done" ] && break
    sleep 0.1
  done
  echo "host: vrio-client attached $(attached) of $NQ vring(s) before $1 (waited 60 s)"
  return 1
}

# Waits (up to 30 s) until the guest is inside an iteration's dds: its
# serial ends in an unfinished "RC it=N" line (reconnect.sh ends it after
# them); under a frozen back-end they cannot complete, so it stays there.
wait_in_dd() {
  local last
  for _ in $(seq 300); do
    last=$(tail -c 300 "$SERIAL" 2>/dev/null | tr -d '\r'; echo .)
    last=${last%.}; last=${last##*$'\n'}
    case $last in "RC it="*) return 0 ;; esac
    [ -e "$WORK/qemu.done" ] && break
    sleep 0.1
  done
  echo "host: the guest did not enter its dds within 30 s of the freeze"
  return 1
}

# KILLS: kills and restarts the client under the running guest; exits with
# the last client's status (96: no restart happened).
restarts() {
  local n=0 t0 k at hang pid tk frozen
  wait_serial "RECONNECT IO START" || { echo "host: the guest never started its I/O loop: no restart"; host_done; exit 96; }
  t0=$(date +%s.%N)
  for k in $KILLS; do
    at=${k%%[+*]*}; hang=; frozen=client
    case $k in *+*) hang=${k#*+} ;; *"*"*) hang=${k#*"*"}; frozen=server ;; esac
    sleep "$(awk -v t="$t0" -v k="$at" -v n="$(date +%s.%N)" 'BEGIN{d=t+k-n; printf "%.2f", (d>0)?d:0}')"
    [ -e "$WORK/qemu.done" ] && break
    # Every client serves every vring before it dies.
    wait_attached "the kill at +$at s"
    pid=$(cat "$WORK/client.pid")
    if [ -n "$hang" ] && [ "$frozen" = server ]; then
      [ -n "$SPID" ] || { echo "host: no I/O server to freeze"; host_done; exit 93; }
      kill -STOP "$SPID" || { host_done; exit 93; }
      echo "host: SIGSTOP vrio-server (pid $SPID) at +$at s of guest I/O"
    elif [ -n "$hang" ]; then
      kill -STOP "$pid" || { echo "host: vrio-client $pid was not running"; host_done; exit 94; }
      echo "host: SIGSTOP vrio-client (pid $pid) at +$at s of guest I/O"
    fi
    # Requests surely in flight: the guest is inside its dds, H s more.
    if [ -n "$hang" ]; then wait_in_dd; sleep "$hang"; fi
    tk=$(date +%s.%N)
    kill -KILL "$pid" || { echo "host: vrio-client $pid was not running"; host_done; exit 94; }
    echo "host: SIGKILL vrio-client (pid $pid) at +$k s of guest I/O"
    if [ "$frozen" = server ] && [ -n "$hang" ]; then kill -CONT "$SPID"; echo "host: SIGCONT vrio-server"; fi
    sleep "$RESTART_DELAY"
    start_client || { host_done; exit 95; }
    n=$((n + 1))
    echo "host: vrio-client restarted (pid $CPID), listening $(awk -v a="$(date +%s.%N)" -v b="$tk" 'BEGIN{printf "%.2f", a-b}') s after the kill"
  done
  echo "host: $n restart(s) of vrio-client"
  # The last client too serves every vring before the guest may stop.
  [ "$n" -gt 0 ] && wait_attached "the end of the guest's loop"
  host_done
  [ "$n" -gt 0 ] || exit 96
  wait "$CPID"
}
if [ "$BACKEND" = qsd ]; then
  new_disk
  qemu-storage-daemon --blockdev driver=file,node-name=file0,filename="$DISK",cache.direct=off \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --export type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path="$SOCK",writable=on,num-queues="$NQ" \
    > "$WORK/client.log" 2>&1 &
  CPID=$!
  for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
  [ -S "$SOCK" ] || { echo "qemu-storage-daemon did not create $SOCK:"; cat "$WORK/client.log"; echo "RESULT: FAIL"; exit 1; }
  echo "host: qemu-storage-daemon on $SOCK (baseline)"
elif [ "$BACKEND" = controlled ]; then
BIN=$(dirname "$SERVER")
export VRIO_TOKEN=vhost-run-token
new_disk
# Credentials on: the controller signs them with the key both servers check.
"$BIN/vrio-ctl" key generate --out "$WORK/data.key" > /dev/null || { echo "RESULT: FAIL"; exit 1; }
"$BIN/vrio-controller" --listen 127.0.0.1:0 --memory --lease-ttl-ms 3000 --tick-ms 200 \
  --rebalance-secs 0 --data-key "$WORK/data.key" > "$WORK/controller.log" 2>&1 &
SPIDS+=($!)
for _ in $(seq 100); do grep -qE '^127\.0\.0\.1:[0-9]+$' "$WORK/controller.log" && break; sleep 0.1; done
CTL=$(grep -E '^127\.0\.0\.1:[0-9]+$' "$WORK/controller.log" | head -n1)
[ -n "$CTL" ] || { echo "vrio-controller did not start:"; cat "$WORK/controller.log"; echo "RESULT: FAIL"; exit 1; }
for id in io-a io-b; do
  "$SERVER" --fabric "$FABRIC" --listen "$(listen_addr "$id")" --disk file --file "$DISK" --size-mib "$DISKMB" \
    --key-file "$WORK/data.key" --sidecores 2 --stats-every 0 --controller "$CTL" --server-id "$id" \
    > "$WORK/server-$id.log" 2>&1 &
  SPIDS+=($!)
done
for _ in $(seq 200); do
  [ "$("$BIN/vrio-ctl" --addr "$CTL" servers --json 2>/dev/null | grep -o '"alive": *true' | wc -l)" = 2 ] && break
  sleep 0.1
done
echo "host: vrio-controller on $CTL, I/O servers:"; "$BIN/vrio-ctl" --addr "$CTL" servers
# The guest's disk is both servers' default volume (the backing file).
"$BIN/vrio-ctl" --addr "$CTL" volume create default --size-mib "$DISKMB" > /dev/null &&
  "$BIN/vrio-ctl" --addr "$CTL" volume grant default vub --mode rw > /dev/null ||
  { echo "host: could not grant the volume"; echo "RESULT: FAIL"; exit 1; }
CLIENT_ARGS=(vhost-user-blk --fabric "$FABRIC" --socket "$SOCK" --controller "$CTL" --device-name vub --queues "$NQ" $ONCE)
start_client || exit 1
# MOVES: every queue to the other server, at each time.
# Handovers the agent reported (a move hands over attached vrings only).
handovers() { grep -c "agent: moved: device vub" "$WORK/client.log"; }
movers() {
  local t0 at i=0 srv q n=0 want h0
  wait_serial "RECONNECT IO START" || echo "host: the guest never started its I/O loop"
  # Moves count handovers: every vring runs first.
  wait_attached "the first move"
  t0=$(date +%s.%N)
  for at in $MOVES; do
    sleep "$(awk -v t="$t0" -v k="$at" -v n="$(date +%s.%N)" 'BEGIN{d=t+k-n; printf "%.2f", (d>0)?d:0}')"
    [ -e "$WORK/qemu.done" ] && break
    srv=io-b; [ $((i % 2)) = 1 ] && srv=io-a; i=$((i + 1))
    # The vrings not on $srv yet, each one handover.
    want=$("$BIN/vrio-ctl" --addr "$CTL" assignments 2>> "$WORK/moves.log" | awk -v s="$srv" '$1 == "vub" && $3 != s' | wc -l)
    h0=$(handovers)
    for q in $(seq 0 $((NQ - 1))); do
      if "$BIN/vrio-ctl" --addr "$CTL" move vub "$q" "$srv" "$q" > /dev/null 2>> "$WORK/moves.log"; then n=$((n + 1)); fi
    done
    echo "host: moved the vrings to $srv at +$at s of guest I/O"
    # The agent finishes this round before the next one (or the guest's
    # end): up to 60 s.
    for _ in $(seq 600); do
      [ "$(handovers)" -ge $((h0 + want)) ] && break
      [ -e "$WORK/qemu.done" ] && break
      sleep 0.1
    done
    echo "host: the agent reported $(($(handovers) - h0)) of $want handover(s) to $srv"
  done
  echo "host: $n MoveQueue call(s) accepted"
  host_done
}
elif [ "$BACKEND" = local ]; then
new_disk
CLIENT_ARGS=(vhost-user-blk --socket "$SOCK" --local-file "$DISK" --queues "$NQ" $ONCE)
start_client || exit 1
else
# Credentials on, as in production: a data-plane key for the server, and a
# credential minted with it for device 0 (vrio-client's --device-id) on the
# default volume (the backing file).
BIN=$(dirname "$SERVER")
"$BIN/vrio-ctl" key generate --out "$WORK/data.key" > /dev/null || { echo "RESULT: FAIL"; exit 1; }
"$BIN/vrio-ctl" credential mint --key-file "$WORK/data.key" --device-id 0 --volume default --mode rw \
  > "$WORK/device0.cred" || { echo "RESULT: FAIL"; exit 1; }
# CRYPT_KEY: encryption at rest on the server, for the client's device.
POLICY=()
if [ -n "$CRYPT_KEY" ]; then
  (umask 077; printf '{"stages":[{"stage":"crypt","key":"%s"}]}\n' "$CRYPT_KEY" > "$WORK/crypt.json")
  POLICY=(--policy "$CRYPT_DEVICE=$WORK/crypt.json")
fi
"$SERVER" --fabric "$FABRIC" --listen "$(listen_addr io)" --disk file --file "$DISK" --size-mib "$DISKMB" \
  --key-file "$WORK/data.key" --sidecores 1 --stats-every 0 "${POLICY[@]}" > "$WORK/server.log" 2>&1 &
SPID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/server.log" && break; sleep 0.1; done
ADDR=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$WORK/server.log" | head -n1)
[ -n "$ADDR" ] || { echo "vrio-server did not start:"; cat "$WORK/server.log"; echo "RESULT: FAIL"; exit 1; }
echo "host: vrio-server on $ADDR (backing file $DISK, ${DISKMB} MiB)"

CLIENT_ARGS=(vhost-user-blk --fabric "$FABRIC" --socket "$SOCK" --server "$ADDR" --queues "$NQ"
  --credential "@$WORK/device0.cred" $ONCE)
start_client || exit 1
fi

CHR=; HOSTARG=
# The guest's loop waits for the host's events (host_done).
if [ -n "$KILLS" ] || [ -n "${MOVES:-}" ]; then HOSTARG=hostdone=1; fi
if [ -n "${MOVES:-}" ]; then
  [ "$BACKEND" = controlled ] || { echo "MOVES needs BACKEND=controlled"; echo "RESULT: FAIL"; exit 1; }
  movers & MPID=$!
fi
if [ -n "$KILLS" ]; then
  CPID0=$CPID
  restarts & KPID=$!
  CHR=",reconnect-ms=$RECONNECT_MS"
fi
# HOTPLUG: plugs a DIMM through the HMP monitor when the guest is ready.
HOTPLUG=${HOTPLUG:-}; MEMOPT="${MEM}M"; MON=none
if [ -n "$HOTPLUG" ]; then
  MEMOPT="${MEM}M,slots=2,maxmem=$((MEM + HOTPLUG))M"; MON="unix:$WORK/mon.sock,server=on,wait=off"
  hotplugger() {
    wait_serial "HOTPLUG READY" || { echo "host: the guest never got ready for the hot-plug"; exit 1; }
    python3 - "$WORK/mon.sock" \
      "object_add memory-backend-memfd,id=hpmem0,size=${HOTPLUG}M,share=on" \
      "device_add pc-dimm,id=dimm0,memdev=hpmem0" "info memory-devices" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def prompt():
    buf = b""
    while not buf.endswith(b"(qemu) "):
        chunk = s.recv(4096)
        if not chunk:
            sys.exit("host: the monitor closed")
        buf += chunk
    return buf.decode(errors="replace")
prompt()
for cmd in sys.argv[2:]:
    s.sendall(cmd.encode() + b"\n")
    out = prompt().replace("\r", "").replace("(qemu) ", "")
    lines = [l for l in out.splitlines() if l.strip() and cmd not in l and "\x1b" not in l]
    print("host: hmp: %s -> %s" % (cmd, " | ".join(lines) or "ok"))
    if any("rror" in l for l in lines):
        sys.exit(1)
PY
    local rc=$?
    [ "$rc" = 0 ] && echo "host: hot-plugged a ${HOTPLUG} MiB pc-dimm (memfd, share=on)" || echo "host: the hot-plug failed"
    return $rc
  }
fi
QRC=0
for boot in $(seq "$BOOTS"); do
echo "host: booting guest $boot of $BOOTS ($(el) s)"
rm -f "$SERIAL"
[ -n "$HOTPLUG" ] && { hotplugger & HPID=$!; }
timeout "$TMO" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$SMP" -m "$MEMOPT" \
  -object memory-backend-memfd,id=mem,size=${MEM}M,share=on -numa node,memdev=mem \
  -chardev socket,id=vub0,path="$SOCK"$CHR \
  -device vhost-user-blk-pci,chardev=vub0,num-queues="$NQ" \
  -kernel "/boot/vmlinuz-$KVER" -initrd "$WORK/initramfs.cpio.gz" \
  -append "console=ttyS0 loglevel=4 panic=-1 blkmb=$BLKMB patoff=$PATOFF fsmb=$FSMB $HOSTARG ${APPEND:-}" \
  -nic none -display none -monitor "$MON" -serial "file:$SERIAL" -no-reboot
rc=$?
touch "$WORK/qemu.done"
if [ -n "$HPID" ]; then wait "$HPID" || QRC=1; HPID=; fi
echo "host: qemu exit rc=$rc after $(el) s (124 = timeout)"
[ "$rc" = 0 ] || QRC=$rc
# The tail, and the guest's own log lines ("VRIO[") before it: a fast
# guest's loop prints more lines than the tail holds.
echo "---- guest $boot serial:"; tr -d '\r' < "$SERIAL" | grep -avE '^\s*$' \
  | awk -v n="${SERIAL_TAIL:-200}" '{l[NR] = $0} END{for (i = 1; i <= NR; i++) if (i > NR - n || index(l[i], "VRIO[")) print l[i]}'
if [ "$boot" -lt "$BOOTS" ]; then
  grep -aq "VRIO-GUEST-DONE rc=0" "$SERIAL" && echo "host: guest $boot OK" || { echo "host: guest $boot failed"; QRC=1; }
  # The next VMM finds the socket again once the client is back in accept.
  for _ in $(seq 300); do [ "$(grep -c 'waiting for a VMM' "$WORK/client.log")" -gt "$boot" ] && break; sleep 0.1; done
fi
done
if [ "$BACKEND" = qsd ]; then
  kill "$CPID"; wait "$CPID"; CPID=; CRC=0; SRC=0
else
if [ -n "$KPID" ]; then
# The last client (--once) exits when QEMU disconnects; restarts() reaps it.
LAST=$(cat "$WORK/client.pid")
for _ in $(seq 300); do kill -0 "$LAST" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$LAST" 2>/dev/null; then echo "host: vrio-client still running after the VMM left"; kill "$LAST"; fi
wait "$KPID"; CRC=$?; KPID=
wait "$CPID0" 2>/dev/null
elif [ -n "$ONCE" ]; then
# --once: the client exits when QEMU disconnects (it drains first: up to 30 s).
for _ in $(seq 300); do kill -0 "$CPID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$CPID" 2>/dev/null; then echo "host: vrio-client still running after the VMM left"; CRC=99; kill "$CPID"; wait "$CPID"; else wait "$CPID"; CRC=$?; fi
else
# Still serving, waiting for the next VMM.
if kill -0 "$CPID" 2>/dev/null; then echo "host: vrio-client alive after $BOOTS VMM session(s)"; CRC=0; kill "$CPID"; wait "$CPID"; else echo "host: vrio-client died"; wait "$CPID"; CRC=98; fi
fi
CPID=
echo "---- vrio-client (rc=$CRC):"; cat "$WORK/client.log"
SRC=0
[ -n "$MPID" ] && { wait "$MPID"; MPID=; }
if [ "$BACKEND" = controlled ]; then
  for p in "${SPIDS[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p"; done
  SPIDS=()
  for id in io-a io-b; do echo "---- vrio-server $id:"; cat "$WORK/server-$id.log"; done
  echo "---- vrio-ctl assignments at the end:"; cat "$WORK/moves.log" 2>/dev/null
fi
if [ -n "$SPID" ]; then
kill -TERM "$SPID"; wait "$SPID"; SRC=$?; SPID=
echo "---- vrio-server (rc=$SRC):"; cat "$WORK/server.log"
fi
fi

ok=1
G=$(tr -d '\r' < "$SERIAL")
grep -q "VRIO-GUEST-DONE rc=0" <<< "$G" || { echo "host: the guest script failed"; ok=0; }
# MARKER: the guest's plaintext in the backing file (none with CRYPT_KEY).
if [ -n "$MARKER" ]; then
  NM=$(LC_ALL=C grep -aoF -- "$MARKER" "$DISK" | wc -l)
  echo "HOST MARKER count=$NM ($MARKER in $DISK)"
  if [ -n "$CRYPT_KEY" ] && [ "$NM" != 0 ]; then echo "HOST MARKER FOUND: plaintext in the encrypted backing file"; ok=0; fi
fi
if [ "$CHECKS" = 1 ] && [ -n "$CRYPT_KEY" ]; then
# The backing file holds ciphertext: the guest checked its data (crypt.sh);
# the host sees no ext4 superblock (magic 0xef53 at byte 1080).
grep -q "BLK CHECKS OK" <<< "$G" || { echo "host: the guest checks did not pass"; ok=0; }
MAGIC=$(od -An -tx1 -j1080 -N2 "$DISK" | tr -d ' \n')
if [ "$MAGIC" = 53ef ]; then echo "HOST EXT4 SUPERBLOCK IN PLAINTEXT"; ok=0; else echo "HOST NO PLAINTEXT EXT4 SUPERBLOCK (bytes 1080-1081: $MAGIC)"; fi
echo "host: pattern md5, e2fsck -fn and debugfs skipped (CRYPT_KEY: ciphertext)"
elif [ "$CHECKS" = 1 ]; then
grep -q "BLK CHECKS OK" <<< "$G" || { echo "host: the guest checks did not pass"; ok=0; }
GP=$(sed -n 's/.*PATTERN md5=\([0-9a-f]*\).*/\1/p' <<< "$G" | head -n1)
HP=$(dd if="$DISK" bs=1M skip="$PATOFF" count="$BLKMB" 2>/dev/null | md5sum | cut -d' ' -f1)
if [ -n "$GP" ] && [ "$GP" = "$HP" ]; then echo "HOST PATTERN OK md5=$HP"; else echo "HOST PATTERN MISMATCH guest=${GP:-none} host=$HP"; ok=0; fi
if [ "$FSMB" = 0 ]; then echo "host: no ext4 checks (FSMB=0)"
elif e2fsck -fn "$DISK" > "$WORK/e2fsck.log" 2>&1; then echo "HOST E2FSCK OK"; else echo "HOST E2FSCK FAILED:"; cat "$WORK/e2fsck.log"; ok=0; fi
if [ "$FSMB" != 0 ]; then
GF=$(sed -n 's|.*FILE /big md5=\([0-9a-f]*\).*|\1|p' <<< "$G" | head -n1)
HF=$(debugfs -R "cat /big" "$DISK" 2>/dev/null | md5sum | cut -d' ' -f1)
if [ -n "$GF" ] && [ "$GF" = "$HF" ]; then echo "HOST FILE /big OK md5=$HF"; else echo "HOST FILE /big MISMATCH guest=${GF:-none} host=$HF"; ok=0; fi
fi
fi
[ "$QRC" = 0 ] || ok=0
[ "$CRC" = 0 ] || ok=0
[ "$SRC" = 0 ] || ok=0
echo "host: total $(el) s"
if [ $ok = 1 ]; then echo "RESULT: PASS"; exit 0; else echo "RESULT: FAIL (qemu $QRC, client $CRC, server $SRC)"; exit 1; fi
