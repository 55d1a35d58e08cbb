#!/usr/bin/env python3
"""hmp.py SOCK CMD...               run HMP commands: "host: hmp: CMD -> output"
   hmp.py SOCK --raw CMD            CMD's output only
   hmp.py SOCK --migrate URI TMO [CANCEL_AFTER]
       migrate -d URI, then info migrate every 0.2 s until completed,
       failed or cancelled (TMO s: migrate_cancel; with CANCEL_AFTER:
       migrate_cancel after that many s of "active"); prints
       QEMU's last report and one line
       MIGSTAT status=... total_ms=... downtime_ms=... setup_ms=... ...
       (status=refused error=... when QEMU refuses to start it)."""
import re, socket, sys, time

def connect(path, tries=300):
    for _ in range(tries):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.settimeout(60)
            return s
        except OSError:
            s.close()
            time.sleep(0.1)
    sys.exit("host: hmp: cannot connect to %s" % path)

class Mon:
    def __init__(self, path):
        self.s = connect(path)
        self.prompt()
    def prompt(self):
        buf = b""
        while not buf.endswith(b"(qemu) "):
            c = self.s.recv(65536)
            if not c:
                return None
            buf += c
        return buf.decode(errors="replace")
    def cmd(self, c):
        self.s.sendall(c.encode() + b"\n")
        out = self.prompt()
        if out is None:
            return None
        lines = out.replace("\r", "").split("\n")
        # The first line echoes the command, the last is the prompt.
        return [l for l in lines[1:-1] if l.strip() and "\x1b" not in l]

def field(lines, name):
    for l in lines:
        l = l.strip()
        if l.lower().startswith(name.lower() + ":"):
            return l.split(":", 1)[1].strip()
    return ""

def ms(v):
    m = re.match(r"(\d+)", v)
    return m.group(1) if m else "-"

def main():
    path, args = sys.argv[1], sys.argv[2:]
    m = Mon(path)
    if args[0] == "--raw":
        print("\n".join(m.cmd(args[1]) or []))
        return 0
    if args[0] != "--migrate":
        rc = 0
        for c in args:
            out = m.cmd(c)
            if out is None:
                print("host: hmp: %s -> (monitor closed)" % c)
                break
            print("host: hmp: %s -> %s" % (c, " | ".join(out) or "ok"))
            if any(l.startswith("Error") or "rror:" in l for l in out):
                rc = 1
        return rc
    uri, tmo = args[1], float(args[2])
    cancel = float(args[3]) if len(args) > 3 else None
    out = m.cmd("migrate -d " + uri)
    if out:
        err = " ".join(out)
        print("host: hmp: migrate -d %s -> %s" % (uri, err))
        print("MIGSTAT status=refused total_ms=- downtime_ms=- setup_ms=- error=%s" % err)
        return 1
    t0 = time.time()
    status, last, cancelled = "", [], False
    while time.time() - t0 < tmo:
        last = m.cmd("info migrate") or []
        status = field(last, "Migration status") or field(last, "Status")
        if status in ("completed", "failed", "cancelled"):
            break
        if cancel is not None and not cancelled and status == "active" and time.time() - t0 >= cancel:
            print("host: hmp: migrate_cancel after %.1f s (status %s, transferred %s) -> %s" % (
                time.time() - t0, status, field(last, "transferred ram"),
                " | ".join(m.cmd("migrate_cancel") or []) or "ok"))
            cancelled = True
        time.sleep(0.2)
    else:
        print("host: hmp: no end of the migration after %.0f s: status %s; migrate_cancel -> %s" % (
            tmo, status, " | ".join(m.cmd("migrate_cancel") or []) or "ok"))
        status = "timeout"
    for l in last:
        print("  info migrate: " + l)
    err = field(last, "Error") or field(last, "error description")
    def any_field(*names):
        for n in names:
            v = field(last, n)
            if v:
                return v
        return ""
    print("MIGSTAT status=%s total_ms=%s downtime_ms=%s setup_ms=%s transferred_kb=%s dirty_syncs=%s wall_s=%.1f%s" % (
        status, ms(any_field("total time", "Time (ms)")), ms(any_field("downtime", "Downtime")),
        ms(any_field("setup", "Setup")), ms(any_field("transferred ram", "Transferred")),
        any_field("dirty sync count", "Dirty sync count") or "-",
        time.time() - t0, (" error=" + err) if err else ""))
    return 0 if status in ("completed", "cancelled") else 1

sys.exit(main())
