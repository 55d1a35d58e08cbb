#!/bin/sh
# Guest script: the verbs smoke example between two processes.
verbs_smoke target "$IP:7470" > /tmp/target.log 2>&1 &
T=$!
sleep 1
verbs_smoke initiator "$IP:7470"; I=$?
wait $T; TR=$?
echo "--- target (rc=$TR):"; cat /tmp/target.log
[ $I -eq 0 ] && [ $TR -eq 0 ]
