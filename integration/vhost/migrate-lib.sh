# Shared by migrate.sh and migrate-net.sh (sourced): QEMU processes by
# number (QPIDS[N], logs in WORK/qemu-N.log), the ports they listen on, and
# the start of each migration. Needs WORK, QPIDS, say(), and for
# next_destination also QSIDE, CUR and start_qemu().

qemu_alive() { [ -n "${QPIDS[$1]:-}" ] && kill -0 "${QPIDS[$1]}" 2>/dev/null; }
# Waits up to S s for QEMU N to end, then kills it; prints its log.
reap_qemu() {  # N S
  local n=$1
  [ -n "${QPIDS[$n]:-}" ] || return 0
  for _ in $(seq $(($2 * 10))); do qemu_alive "$n" || break; sleep 0.1; done
  qemu_alive "$n" && { say "QEMU $n still running: killed"; kill "${QPIDS[$n]}"; }
  wait "${QPIDS[$n]}" 2>/dev/null; local rc=$?
  unset "QPIDS[$n]"
  say "QEMU $n exited rc=$rc"
  [ -s "$WORK/qemu-$n.log" ] && sed "s/^/  qemu $n: /" "$WORK/qemu-$n.log"
  return 0
}
# A free TCP port, and QEMU N listening on it (-incoming).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
listening() {  # N PORT
  for _ in $(seq 600); do
    ss -Hltn "sport = :$2" 2>/dev/null | grep -q . && return 0
    qemu_alive "$1" || break
    sleep 0.1
  done
  echo "FAIL host: QEMU $1 does not listen on port $2 (alive: $(qemu_alive "$1" && echo yes || echo no))"
  [ -s "$WORK/qemu-$1.log" ] && sed "s/^/  qemu $1: /" "$WORK/qemu-$1.log"
  return 1
}
other() { [ "$1" = a ] && echo b || echo a; }
# Migration I of the guest in QEMU $CUR (named WHAT in messages): starts the
# destination QEMU on the other side, listening on a free port. Sets src,
# dst, port and d (the destination's number); false (reported) on failure.
next_destination() {  # I WHAT
  src=${QSIDE[$CUR]}; dst=$(other "$src"); port=$(free_port)
  qemu_alive "$CUR" || { echo "FAIL host: QEMU $CUR ($2) is gone before migration $1"; return 1; }
  start_qemu "$dst" "tcp:127.0.0.1:$port" || return 1
  d=$QN
  listening "$d" "$port"
}
