#!/bin/sh
# Guest script: the fabric conformance suite over verbs (rxe0) between two
# processes in this guest. Result lines come from the initiator.
PORT=7471
vrio-fabric-conformance --backend verbs --role target --addr "$IP:$PORT" > /tmp/target.log 2>&1 &
T=$!
# wait until the target listens (it prints "listening on")
n=0
while ! grep -q "listening on" /tmp/target.log 2>/dev/null && [ $n -lt 100 ]; do
  kill -0 $T 2>/dev/null || break
  sleep 0.2; n=$((n+1))
done
vrio-fabric-conformance --backend verbs --role initiator --addr "$IP:$PORT"; I=$?
# the target serves until the initiator is done; give it a moment, then stop it
n=0
while kill -0 $T 2>/dev/null && [ $n -lt 50 ]; do sleep 0.2; n=$((n+1)); done
kill $T 2>/dev/null
wait $T; TR=$?
echo "--- target (rc=$TR):"; cat /tmp/target.log
echo "initiator rc=$I"
# Also the smoke example (async wait on notify_fd) when the image has it.
S=0
if command -v verbs_smoke >/dev/null; then
  verbs_smoke target "$IP:7470" > /tmp/smoke-target.log 2>&1 &
  ST=$!
  sleep 1
  verbs_smoke initiator "$IP:7470" > /tmp/smoke-init.log 2>&1; SI=$?
  wait $ST; STR=$?
  cat /tmp/smoke-init.log /tmp/smoke-target.log | sed 's/^/smoke: /'
  echo "smoke initiator rc=$SI target rc=$STR"
  [ $SI -eq 0 ] && [ $STR -eq 0 ] || S=1
fi
[ $I -eq 0 ] && [ $S -eq 0 ]
