//! An unmodified guest on a remote disk: QEMU (TCG) boots the stock Debian
//! kernel, whose virtio_blk driver talks to `vhost-user-blk-pci`, served by
//! `vrio-client vhost-user-blk` (the VM-host agent), which attaches the
//! queues over the software fabric to `vrio-server --disk file`.
//!
//! The guest writes a 64 MiB pattern with O_DIRECT and reads it back with
//! O_DIRECT and buffered, then builds ext4 (mkfs, files, sync, remount,
//! md5 check, e2fsck -n). The host then checks the server's backing file:
//! the pattern's md5, `e2fsck -fn`, and a file read out with debugfs.
//! Two guests boot one after the other against the same vrio-client, which
//! must detach when the first VMM leaves and serve the second.
//!
//! The second test runs the local model (`--local-file`: a sidecore in
//! vrio-client serves the vrings over the shared guest memory, no I/O
//! server), with the pattern part only, to stay short.
//!
//! The reconnect tests kill vrio-client twice under a guest doing
//! continuous O_DIRECT write/read-back (`reconnect.sh`) and start it again
//! on the same socket; QEMU's chardev reconnects and resumes every vring at
//! its used index. The guest's loop runs on every CPU (so every vring) and
//! until run.sh says its kills are over, whatever the machine's speed; each
//! kill waits until the client serves every vring. The second kill first
//! freezes the client (SIGSTOP) while the guest is inside its dds, so
//! requests are surely in flight when it dies. The guest must see every
//! md5 match, no failed dd and no I/O error in its kernel log; the host
//! checks the backing file holds the last pattern. Once against the remote
//! I/O server (its first kill comes while the I/O server is frozen, so the
//! requests the client recorded are still in flight), once against the
//! local sidecore. QEMU must negotiate inflight I/O tracking, hand the
//! region back to every restarted client, and each resumed vring logs how
//! many requests it resubmitted from it.
//!
//! The hot-plug tests plug a pc-dimm into a running guest; the client must
//! re-attach its vrings with the new memory table before the guest's
//! O_DIRECT buffers, larger than its boot memory, reach the device.
//! Everything runs from `integration/vhost/run.sh`.

use vrio_integration::vhost::{require_tools, run_script, vrio_binaries};

/// Runs `integration/vhost/run.sh` with `env` and the guest script
/// `guest` (in `integration/vhost/`); returns its whole output and whether
/// it exited successfully.
fn run_guests(env: &[(&str, &str)], guest: &str) -> (String, bool) {
    require_tools(
        "the vhost-user-blk guest",
        &["mke2fs", "e2fsck", "debugfs", "md5sum", "qemu-img"],
    );
    run_script("run.sh", guest, &vrio_binaries(), env)
}

/// The end of a guest loop run by `script` (its lines start with SCRIPT):
/// no failure reported (the guest's "FAIL ..."), a clean kernel log, and
/// the pattern verdict of [`assert_guest_verdict`].
fn assert_clean_run(log: &str, ok: bool, script: &str) {
    let fail = log.lines().find(|l| l.contains("FAIL "));
    assert!(
        fail.is_none(),
        "the guest reported a failure: {}",
        fail.unwrap_or_default()
    );
    assert!(
        log.contains(&format!("{script} DMESG CLEAN")),
        "I/O errors in the guest's kernel log"
    );
    assert_guest_verdict(log, ok);
}

/// The remote I/O server served the socket and refused nothing.
fn assert_served_remotely(log: &str) {
    assert!(
        log.contains("(fabric soft, 2 queue(s)"),
        "vrio-client did not serve the socket remotely"
    );
    assert!(
        log.contains(" requests (0 refused)"),
        "the server refused requests"
    );
}

/// vrio-client served the socket with its local sidecore.
fn assert_served_locally(log: &str) {
    assert!(
        log.contains("served by a local sidecore (file "),
        "vrio-client did not serve the socket locally"
    );
}

/// The numbers after `key` on the log lines that contain `line`.
fn numbers(log: &str, line: &str, key: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(line))
        .filter_map(|l| l.split(key).nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The end of a pattern run: the pattern read back identical, the guest's
/// checks and script passed, the host's file holds the pattern, and
/// run.sh passed.
fn assert_guest_verdict(log: &str, ok: bool) {
    let has = |s: &str| log.contains(s);
    let p = assert_pattern(log);
    assert!(has("BLK CHECKS OK"), "the guest checks failed");
    assert!(has("VRIO-GUEST-DONE rc=0"), "guest script failed");
    assert!(
        has(&format!("HOST PATTERN OK md5={p}")),
        "the backing file does not hold the last pattern"
    );
    assert!(has("RESULT: PASS"), "run.sh result");
    assert!(ok, "run.sh failed");
}

/// The guest wrote its pattern and read it back identical with O_DIRECT
/// and buffered; returns the pattern's md5.
fn assert_pattern(log: &str) -> String {
    let pattern = log
        .lines()
        .rev()
        .find_map(|l| l.split("PATTERN md5=").nth(1))
        .unwrap_or_else(|| panic!("no pattern line from the guest"));
    let mut f = pattern.split_whitespace();
    let (p, d, b) = (f.next(), f.next(), f.next());
    let p = p.unwrap_or_default();
    assert_eq!(p.len(), 32, "pattern md5 {p:?}");
    assert_eq!(
        d,
        Some(format!("direct={p}").as_str()),
        "O_DIRECT read-back"
    );
    assert_eq!(
        b,
        Some(format!("buffered={p}").as_str()),
        "buffered read-back"
    );
    p.to_string()
}

#[test]
fn stock_guest_runs_ext4_on_a_remote_disk_through_vhost_user_blk() {
    ext4_on_a_remote_disk("soft", 2);
}

/// The same guest with the I/O server on this host over the `shm` fabric:
/// the server maps the guest's RAM (QEMU's memfd, passed on by vrio-client)
/// and its READs and WRITEs are copies.
#[test]
fn stock_guest_runs_ext4_on_a_remote_disk_over_the_shm_fabric() {
    ext4_on_a_remote_disk("shm", 2);
}

/// Boots `boots` guests, one after another, against one vrio-client whose
/// I/O server it reaches over `fabric`; each runs blk.sh (pattern, ext4).
fn ext4_on_a_remote_disk(fabric: &str, boots: u32) {
    let boots_s = boots.to_string();
    let (log, ok) = run_guests(
        &[
            ("NQ", "2"),
            ("BOOTS", &boots_s),
            ("TMO", "400"),
            ("FABRIC", fabric),
        ],
        "blk.sh",
    );
    let has = |s: &str| log.contains(s);
    assert!(
        has(&format!("(fabric {fabric}, 2 queue(s)")),
        "vrio-client did not serve the socket over {fabric}"
    );
    assert!(
        has("2 queue(s), features"),
        "the guest driver did not get two queues"
    );
    // The guest's own checks.
    let p = assert_pattern(&log);
    assert!(has("BLK CHECKS OK"), "ext4 checks in the guest failed");
    assert!(has("VRIO-GUEST-DONE rc=0"), "guest script failed");
    // The host's checks of the server's backing file.
    assert!(
        has(&format!("HOST PATTERN OK md5={p}")),
        "the server's backing file does not hold the pattern"
    );
    assert!(has("HOST E2FSCK OK"), "host e2fsck of the backing file");
    assert!(has("HOST FILE /big OK"), "file read from the backing file");
    // The I/O server served it all, refusing nothing.
    let served: u64 = log
        .lines()
        .find_map(|l| l.split("vrio-server: final: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(served > 1000, "server served only {served} requests");
    assert!(has(" requests (0 refused)"), "the server refused requests");
    // Each VMM left, the client detached and served the next.
    assert!(has("host: guest 1 OK"), "first guest failed");
    if boots > 1 {
        assert!(
            has(&format!("booting guest {boots} of {boots}")),
            "not every guest booted"
        );
    }
    assert!(
        has(&format!(
            "host: vrio-client alive after {boots} VMM session(s)"
        )),
        "vrio-client did not survive the VMM disconnects"
    );
    assert_eq!(
        log.matches("BLK CHECKS OK").count(),
        boots as usize,
        "every guest's checks"
    );
    assert!(has("RESULT: PASS"), "run.sh result");
    assert!(ok, "run.sh failed");
}

#[test]
fn stock_guest_checks_a_pattern_on_a_local_sidecore_through_vhost_user_blk() {
    // Two short boots: the second VMM proves the disconnect of the first
    // left the sidecore and the socket ready.
    let (log, ok) = run_guests(
        &[
            ("BACKEND", "local"),
            ("NQ", "2"),
            ("BOOTS", "2"),
            ("BLKMB", "16"),
            ("FSMB", "0"),
            ("TMO", "300"),
        ],
        "blk.sh",
    );
    let has = |s: &str| log.contains(s);
    assert_served_locally(&log);
    assert!(
        !has("vrio-server"),
        "the local mode must not use an I/O server"
    );
    // The stock driver negotiated two queues and EVENT_IDX (feature bit 29,
    // printed by sysfs as a bit string, bit 0 first).
    let features = log
        .lines()
        .find_map(|l| l.split("2 queue(s), features ").nth(1))
        .unwrap_or_else(|| panic!("the guest driver did not get two queues"));
    assert_eq!(
        features.as_bytes().get(29),
        Some(&b'1'),
        "EVENT_IDX not negotiated: {features}"
    );
    let p = assert_pattern(&log);
    assert_eq!(
        log.matches("BLK CHECKS OK").count(),
        2,
        "both guests' checks"
    );
    assert!(
        has(&format!("HOST PATTERN OK md5={p}")),
        "the image file does not hold the pattern"
    );
    // Both vrings went to the sidecore, and left it when each VMM stopped.
    for q in ["queue=0", "queue=1"] {
        let attached = log
            .lines()
            .filter(|l| l.contains("queue attached") && l.contains(q))
            .count();
        assert!(
            attached >= 2,
            "{q} attached {attached} times, not once per VMM"
        );
    }
    assert!(
        has("queue removed from the local sidecore"),
        "no vring left the sidecore"
    );
    assert!(has("host: guest 1 OK"), "first guest failed");
    assert!(
        has("host: vrio-client alive after 2 VMM session(s)"),
        "vrio-client did not survive the VMM disconnect"
    );
    assert!(has("RESULT: PASS"), "run.sh result");
    assert!(ok, "run.sh failed");
}

/// Outstanding requests of every vring resumed after a restart, from the
/// client log's "resuming the vring" lines.
fn resumed_outstanding(log: &str) -> Vec<u64> {
    numbers(log, "resuming the vring at the VMM's base", "outstanding=")
}

/// Requests resubmitted from the inflight region at each vring attach,
/// from the client log's "resubmitting requests from the inflight region"
/// lines.
fn resubmitted(log: &str) -> Vec<u64> {
    numbers(
        log,
        "resubmitting requests from the inflight region",
        "resubmitted=",
    )
}

/// The guest's write/read-back loop (`reconnect.sh`) on `backend`, at least
/// `secs` s and until run.sh's `event` (KILLS or MOVES, with its value) are
/// over (hostdone), however fast the guest is; the last `tail` serial lines
/// printed. Checks the loop started; returns the log and run.sh's verdict.
fn run_io_loop(backend: &str, event: (&str, &str), secs: u32, tail: &str) -> (String, bool) {
    let append = format!("rcsecs={secs}");
    let (log, ok) = run_guests(
        &[
            ("BACKEND", backend),
            ("NQ", "2"),
            ("BOOTS", "1"),
            ("BLKMB", "8"),
            ("FSMB", "0"),
            event,
            ("APPEND", &append),
            ("SERIAL_TAIL", tail),
            ("TMO", "300"),
        ],
        "reconnect.sh",
    );
    assert!(
        log.contains("RECONNECT IO START"),
        "the guest never started its I/O"
    );
    (log, ok)
}

/// The guest's I/O loop under two restarts of vrio-client; checks what
/// both back-ends share and returns the log.
fn run_reconnect(backend: &str, kills: &str) -> String {
    let (log, ok) = run_io_loop(backend, ("KILLS", kills), 20, "150");
    let has = |s: &str| log.contains(s);
    // The restarts happened while the guest's loop ran.
    assert_eq!(
        log.matches("host: SIGKILL vrio-client").count(),
        2,
        "two kills"
    );
    assert!(has("host: SIGSTOP vrio-client"), "no frozen client");
    assert!(has("host: 2 restart(s) of vrio-client"), "two restarts");
    // Three clients (the first and two restarts) listened on the socket,
    // each once (--once).
    assert_eq!(
        log.matches("host: vrio-client restarted (pid").count(),
        2,
        "two restarted clients"
    );
    assert_eq!(
        log.matches("waiting for a VMM").count(),
        3,
        "three clients listening"
    );
    // QEMU came back to each new client and resumed rings mid-stream; the
    // frozen client surely left requests in flight, served again.
    let outstanding = resumed_outstanding(&log);
    assert!(
        outstanding.len() >= 2,
        "QEMU did not resume the vrings on the restarted clients: {outstanding:?}"
    );
    assert!(
        outstanding.iter().any(|&n| n > 0),
        "no request was in flight at a kill: {outstanding:?}"
    );
    // Inflight I/O tracking: QEMU negotiated it, got the region once from
    // the first client and passed it back to each client it connected to
    // (the first and both restarted ones); the restarted clients resumed
    // from it, and the frozen one surely had requests recorded in flight.
    // The client log, one part per client (each prints its banner).
    let clients: Vec<&str> = log
        .split("vrio-client: vhost-user-blk on ")
        .skip(1)
        .filter(|c| c.contains("waiting for a VMM"))
        .collect();
    assert_eq!(clients.len(), 3, "three client logs");
    for (i, c) in clients.iter().enumerate() {
        assert!(
            c.lines()
                .any(|l| l.contains("the VMM acked the protocol features")
                    && l.contains("inflight=true")),
            "client {i}: QEMU did not ack INFLIGHT_SHMFD"
        );
        assert!(
            c.contains("inflight region from the VMM (SET_INFLIGHT_FD)"),
            "client {i}: QEMU did not pass the inflight region"
        );
        let r = resubmitted(c);
        assert!(
            r.len() >= 2,
            "client {i}: not both vrings resumed from the region: {r:?}"
        );
    }
    // QEMU made the region with the first client (again when the guest
    // driver reset the device) and only passed it back to the others.
    assert!(clients[0].contains("inflight region created for the VMM (GET_INFLIGHT_FD)"));
    for c in &clients[1..] {
        assert!(
            !c.contains("GET_INFLIGHT_FD"),
            "a restarted client was asked for a new region"
        );
    }
    let resubmits = resubmitted(&log);
    // The guest's verdict: every read-back matched, no dd failed, a clean
    // kernel log.
    assert_clean_run(&log, ok, "RECONNECT");
    let stats = log
        .lines()
        .find_map(|l| l.split("RECONNECT STATS ").nth(1))
        .unwrap_or_else(|| panic!("no stats from the guest loop"));
    let iterations: u32 = stats
        .split_whitespace()
        .find_map(|f| f.strip_prefix("iterations="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(iterations >= 4, "only {iterations} write/read iterations");
    println!(
        "reconnect ({backend}): {stats}; outstanding requests at each resumed vring: {outstanding:?}; resubmitted from the inflight region at each attach: {resubmits:?}"
    );
    log
}

#[test]
fn a_guest_keeps_its_data_while_the_remote_agent_is_killed_and_restarted() {
    // The first kill comes while the I/O server is frozen: the client saw
    // the guest's requests, recorded them and forwarded them, and they
    // cannot complete, so the next client resubmits them from the region.
    let log = run_reconnect("vrio", "4*1.5 10+1.5");
    assert!(
        log.contains("host: SIGSTOP vrio-server"),
        "no frozen server"
    );
    let resubmits = resubmitted(&log);
    assert!(
        resubmits.iter().any(|&n| n > 0),
        "no request was resubmitted from the inflight region: {resubmits:?}"
    );
    assert_served_remotely(&log);
}

#[test]
fn a_guest_keeps_its_data_while_the_local_sidecore_client_is_killed_and_restarted() {
    // The sidecore lives in the client: a kill only leaves requests in the
    // region when it lands between a kick and its completion, so the count
    // may be zero here; the region still has to come back and be read.
    let log = run_reconnect("local", "4 10+1.5");
    println!(
        "local: resubmitted from the inflight region at each attach: {:?}",
        resubmitted(&log)
    );
    assert_served_locally(&log);
}

/// A stock Linux guest keeps verifying its data while a controller moves
/// its vrings between two I/O servers three times (live handovers under
/// the real virtio_blk driver: quiesce, hand over the ring index, resume).
#[test]
fn a_guest_keeps_its_data_while_the_controller_moves_its_vrings_between_io_servers() {
    // Each round once every vring runs, and after the agent's handovers of
    // the last one; the guest's loop (at least 16 s) runs until then.
    let (log, ok) = run_io_loop("controlled", ("MOVES", "4 8 12"), 16, "80");
    let has = |s: &str| log.contains(s);
    assert_eq!(
        log.matches("host: moved the vrings to").count(),
        3,
        "three rounds of moves"
    );
    let handovers = log.matches("agent: moved: device vub").count();
    assert!(
        handovers >= 4,
        "only {handovers} live handovers between servers"
    );
    assert!(!has("agent: failover:"), "a live move must not fail over");
    assert_clean_run(&log, ok, "RECONNECT");
    println!("controller moves under a real guest: {handovers} handovers between servers");
}

/// Memory hot-plug under running vrings: the guest boots with 256 MiB, the
/// host plugs a 1 GiB pc-dimm (memfd, share=on) through QEMU's monitor,
/// QEMU sends the new memory table, and vrio-client re-attaches every
/// attached vring with it (remote: the agent registers the new region
/// with the fabric). The guest then moves a 160 MiB pattern in single
/// O_DIRECT blocks (288 MiB), buffers larger than its boot memory, so the device
/// reads and writes the new memory; md5s must match and the kernel log
/// stay clean. Returns the log.
fn run_hotplug(backend: &str) -> String {
    let (log, ok) = run_guests(
        &[
            ("BACKEND", backend),
            ("NQ", "2"),
            ("BOOTS", "1"),
            ("MEM", "256"),
            ("HOTPLUG", "1024"),
            ("BLKMB", "288"),
            ("PATOFF", "0"),
            ("FSMB", "0"),
            ("DISKMB", "320"),
            ("APPEND", "memhp_default_state=online hpmb=288"),
            ("SERIAL_TAIL", "60"),
            ("TMO", "400"),
        ],
        "hotplug.sh",
    );
    let has = |s: &str| log.contains(s);
    assert!(has("HOTPLUG READY"), "the guest never got ready");
    assert!(
        has("host: hot-plugged a 1024 MiB pc-dimm"),
        "the host did not plug the DIMM"
    );
    assert!(has("HOTPLUG SEEN"), "the guest did not see the new memory");
    // The client got the new table and re-attached its running vrings
    // with it: 1 GiB more, 0x40000000 bytes.
    let reattached: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("vring re-attached with the new memory table"))
        .collect();
    assert!(
        !reattached.is_empty(),
        "no vring was re-attached after the hot-plug"
    );
    assert!(
        reattached.iter().all(|l| l.contains("+0x40000000")),
        "a re-attach without the plugged region: {reattached:?}"
    );
    assert!(
        !has("cannot attach the queue"),
        "a vring stayed unserved after the hot-plug"
    );
    assert_clean_run(&log, ok, "HOTPLUG");
    println!(
        "hot-plug ({backend}): {} vring re-attach(es) with the new table",
        reattached.len()
    );
    log
}

#[test]
fn a_guest_does_direct_io_into_hot_plugged_memory_on_a_remote_disk() {
    let log = run_hotplug("vrio");
    assert_served_remotely(&log);
}

#[test]
fn a_guest_does_direct_io_into_hot_plugged_memory_on_a_local_sidecore() {
    let log = run_hotplug("local");
    assert_served_locally(&log);
}
