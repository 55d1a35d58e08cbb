#!/bin/bash
# The same two stock guests (run-net.sh, guest script net.sh), measured in
# one invocation on two vhost-user-net back-ends:
#   testpmd  DPDK testpmd's vhost-user ports, io forwarding (the baseline),
#   vrio     vrio-client per guest -> soft fabric -> one vrio-server switch.
# Guest 1 pings guest 2 (PINGS echo requests) and sends NETMB MiB over TCP.
# Prints the TCP throughput and the average ping RTT of each, vrio's ratio
# to testpmd, and the frames each back-end forwarded per MiB; writes JSON.
# Under TCG the guests dominate both: read the ratios, not the numbers.
#
# Usage: compare-net.sh VRIO-SERVER VRIO-CLIENT [OUT.json]
# Env:   NETMB (32), PINGS (10), MEM (512)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:?usage: compare-net.sh VRIO-SERVER VRIO-CLIENT [OUT.json]}
CLIENT=${2:?vrio-client missing}
OUT=${3:-net-compare.json}
NETMB=${NETMB:-32}; PINGS=${PINGS:-10}
command -v dpdk-testpmd > /dev/null || { echo "dpdk-testpmd missing (run scripts/setup.sh)"; exit 1; }
command -v python3 > /dev/null || { echo "python3 missing"; exit 1; }
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/vrio-compare-net.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT
for b in testpmd vrio; do
  echo "compare-net: $b ($NETMB MiB, $PINGS pings) ..."
  FRONT=$b NETMB=$NETMB PINGS=$PINGS MEM=${MEM:-512} TMO=${TMO:-300} SERIAL_TAIL=100000 \
    "$HERE/run-net.sh" "$SERVER" "$CLIENT" "$HERE/net.sh" > "$LOGS/$b.log" 2>&1
  grep -q "RESULT: PASS" "$LOGS/$b.log" || { tail -60 "$LOGS/$b.log"; echo "compare-net: the $b run failed"; exit 1; }
done
python3 - "$LOGS" "$OUT" "$NETMB" "$PINGS" <<'PY'
import json, re, sys
logs, out, mib, pings = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def parse(b):
    text = open(f"{logs}/{b}.log", errors="replace").read()
    m = re.search(r"host: NET SENT (\d+) MiB in ([\d.]+) s: ([\d.]+) MiB/s", text)
    if not m:
        sys.exit(f"compare-net: no throughput line in the {b} run")
    # Guest 1's timed pings (busybox: round-trip min/avg/max = a/b/c ms).
    rtts = re.findall(r"round-trip min/avg/max = [\d.]+/([\d.]+)/[\d.]+ ms", text)
    if not rtts:
        sys.exit(f"compare-net: no ping summary in the {b} run")
    # Frames the back-end forwarded: testpmd's RX-packets of both ports,
    # vrio's frames from both guest ports.
    if b == "testpmd":
        frames = sum(int(x) for x in re.findall(r"RX-packets: (\d+)", text)[-2:])
    else:
        frames = sum(int(x) for x in re.findall(r"net port dev\d: from guest (\d+) frames", text))
    return {"mib_s": float(m.group(3)), "seconds": float(m.group(2)),
            "rtt_ms": float(rtts[0]), "frames": frames}

r = {b: parse(b) for b in ("testpmd", "vrio")}
t, v = r["testpmd"], r["vrio"]
ratio = lambda a, b: round(a / b, 3) if b else 0.0
rows = [
    ("TCP MiB/s", t["mib_s"], v["mib_s"], ratio(v["mib_s"], t["mib_s"])),
    ("ping avg RTT ms", t["rtt_ms"], v["rtt_ms"], ratio(v["rtt_ms"], t["rtt_ms"])),
    ("frames forwarded / MiB", t["frames"] / mib, v["frames"] / mib,
     ratio(v["frames"], t["frames"])),
]
print(f"{'metric':24} {'testpmd':>10} {'vrio':>10} {'vrio/testpmd':>13}")
for name, a, b, q in rows:
    print(f"{name:24} {a:10.2f} {b:10.2f} {q:13.3f}")
json.dump({"baseline": "testpmd", "netmb": mib, "pings": pings,
           "results": {k: r[k] for k in r},
           "ratios": {"throughput": rows[0][3], "rtt": rows[1][3], "frames": rows[2][3]}},
          open(out, "w"), indent=1)
print(f"compare-net: wrote {out}")
PY
