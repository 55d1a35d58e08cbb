#!/bin/sh
# Guest script: vrio-server and vrio-client over real verbs (rxe0) in this
# guest, with verified synthetic guests in doorbell and remote-poll modes.
PORT=7480
vrio-server --fabric verbs --listen "$IP:$PORT" --sidecores 1 --size-mib 64 --stats-every 0 > /tmp/server.log 2>&1 &
S=$!
n=0
while ! grep -q "listening on" /tmp/server.log 2>/dev/null && [ $n -lt 150 ]; do
  kill -0 $S 2>/dev/null || break
  sleep 0.2; n=$((n+1))
done
vrio-client synthetic --fabric verbs --server "$IP:$PORT" --guests 2 --queues 1 --requests 300 --depth 4 --blocks 64; C1=$?
vrio-client synthetic --fabric verbs --server "$IP:$PORT" --guests 1 --queues 2 --requests 150 --depth 4 --blocks 64 --first-block 4096 --mode remote-poll; C2=$?
kill -INT $S 2>/dev/null
wait $S; SR=$?
echo "--- server (rc=$SR):"; cat /tmp/server.log
echo "client rc=$C1 $C2 server rc=$SR"
[ $C1 -eq 0 ] && [ $C2 -eq 0 ] && [ $SR -eq 0 ]
