#!/bin/sh
# Guest script for run-2guests.sh: the conformance suite over verbs between
# two guests. ROLE, IP and PEER come from /init.
PORT=7471
if [ "$ROLE" = target ]; then
  # serves until the initiator sends QUIT; the time limit covers a lost peer
  timeout 400 vrio-fabric-conformance --backend verbs --role target --addr "$IP:$PORT"
  exit $?
fi
# The target guest may still be booting: retry while nobody listens.
n=0
while :; do
  vrio-fabric-conformance --backend verbs --role initiator --addr "$PEER:$PORT" > /tmp/init.log 2>&1; rc=$?
  n=$((n + 1))
  # A refused connect still prints "0 passed, 1 failed": only that case
  # is retried.
  if ! grep -q "FAIL connect" /tmp/init.log || [ $n -ge 40 ]; then
    break
  fi
  # Prefixed, so the host's parser does not count the refused attempt's
  # FAIL line and summary as the run's.
  echo "attempt $n: rc=$rc, target not ready yet"; tail -n 2 /tmp/init.log | sed 's/^/  retried: /'
  sleep 3
done
cat /tmp/init.log
exit $rc
