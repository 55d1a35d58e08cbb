#!/bin/bash
# Three vhost-user-blk back-ends, same guest, same fio runs (fio.sh),
# measured in the same invocation:
#   qsd    qemu-storage-daemon's vhost-user-blk export (the baseline),
#   local  vrio-client --local-file: a local sidecore on the VM host,
#   remote vrio-client -> soft fabric -> vrio-server (remote sidecore),
#   shm    the same over the shm fabric (vrio-server on a unix: address).
# Each back-end serves a raw file in the same temp dir. Prints a table of
# IOPS and MiB/s with each vrio back-end's ratio to qsd, and writes JSON.
# Under TCG every back-end is dominated by emulation: read the ratios, not
# the absolute numbers.
#
# Usage: compare.sh VRIO-SERVER VRIO-CLIENT [OUT.json]
# Env:   FIOTIME (seconds per workload, 5), NQ (1), MEM (1024 MiB)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SERVER=${1:?usage: compare.sh VRIO-SERVER VRIO-CLIENT [OUT.json]}
CLIENT=${2:?vrio-client missing}
OUT=${3:-vhost-compare.json}
# run.sh mints the remote runs' credential with the vrio-ctl beside the server.
[ -x "$(dirname "$SERVER")/vrio-ctl" ] || { echo "vrio-ctl missing beside $SERVER (cargo build --release -p vrio-examples)"; exit 1; }
command -v qemu-storage-daemon > /dev/null || { echo "qemu-storage-daemon missing (qemu-utils; run scripts/setup.sh)"; exit 1; }
command -v fio > /dev/null || { echo "fio missing on the host (run scripts/setup.sh)"; exit 1; }
command -v python3 > /dev/null || { echo "python3 missing (parses fio's JSON)"; exit 1; }
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/vrio-compare.XXXXXX")
trap 'rm -rf "$LOGS"' EXIT
for b in qsd local vrio shm; do
  echo "compare: $b ..."
  backend=$b fabric=soft; [ "$b" = shm ] && backend=vrio fabric=shm
  BACKEND=$backend FABRIC=$fabric CHECKS=0 FIO=1 SERIAL_TAIL=100000 NQ=${NQ:-1} MEM=${MEM:-1024} TMO=${TMO:-600} \
    APPEND="fiotime=${FIOTIME:-5}" "$HERE/run.sh" "$SERVER" "$CLIENT" "$HERE/fio.sh" > "$LOGS/$b.log" 2>&1
  grep -q "RESULT: PASS" "$LOGS/$b.log" || { tail -60 "$LOGS/$b.log"; echo "compare: the $b run failed"; exit 1; }
done
python3 - "$LOGS" "$OUT" <<'PY'
import json, sys
logs, out = sys.argv[1], sys.argv[2]
names = {"qsd": "qsd", "local": "vrio-local", "vrio": "vrio-remote", "shm": "vrio-remote-shm"}

def parse(path):
    """name -> (iops, MiB/s) from the FIO-BEGIN/END blocks of a serial log."""
    res, cur, buf = {}, None, []
    for line in open(path, errors="replace"):
        line = line.rstrip("\r\n")
        if line.startswith("FIO-BEGIN "):
            cur, buf = line.split()[1], []
        elif line.startswith("FIO-END ") and cur:
            text = "\n".join(buf)
            job = json.loads(text[text.index("{"):])["jobs"][0]
            side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
            res[cur] = (side["iops"], side["bw_bytes"] / (1 << 20))
            cur = None
        elif cur:
            buf.append(line)
    return res

r = {b: parse(f"{logs}/{b}.log") for b in names}
order = ["seq-read-1M", "seq-write-1M", "rand-read-4k-qd1", "rand-read-4k-qd32",
         "rand-write-4k-qd1", "rand-write-4k-qd32"]
missing = [(b, w) for b in names for w in order if w not in r[b]]
if missing:
    sys.exit(f"compare: no fio result for {missing}")
hdr = (f"{'workload':20} {'qsd IOPS':>10} {'qsd MiB/s':>10} {'local IOPS':>11} {'local/qsd':>10}"
       f" {'soft IOPS':>10} {'soft/qsd':>9} {'shm IOPS':>9} {'shm/qsd':>8}")
print(hdr)
rows = []
for w in order:
    q, l, v, m = r["qsd"][w], r["local"][w], r["vrio"][w], r["shm"][w]
    lr, vr, mr = (x[0] / q[0] if q[0] else 0.0 for x in (l, v, m))
    print(f"{w:20} {q[0]:10.0f} {q[1]:10.1f} {l[0]:11.0f} {lr:10.3f} {v[0]:10.0f} {vr:9.3f} {m[0]:9.0f} {mr:8.3f}")
    rows.append({"workload": w,
                 **{f"{names[b]}_iops": round(r[b][w][0], 1) for b in names},
                 **{f"{names[b]}_mib_s": round(r[b][w][1], 2) for b in names},
                 "local_ratio": round(lr, 3), "remote_ratio": round(vr, 3),
                 "remote_shm_ratio": round(mr, 3)})
json.dump({"baseline": "qsd", "ratio": "IOPS / qsd IOPS (same as MiB/s ratio)",
           "results": rows}, open(out, "w"), indent=1)
print(f"compare: wrote {out}")
PY
