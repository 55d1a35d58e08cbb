//! Live migration of a guest whose disk vrio serves (issue 16, "Block"):
//! QEMU (TCG) boots the stock Debian kernel on `vhost-user-blk-pci`; a
//! destination QEMU (`-incoming`) starts on the same machine with its own
//! `vrio-client vhost-user-blk` on its own socket (another `--vm-host`,
//! the same `--device-name`), and both clients sit in front of the same
//! `vrio-server`, placed by a `vrio-controller`, which must record after
//! each migration that the device runs on the destination's host.
//!
//! The guest (`migrate-guest.sh`) builds ext4 with files, fills a raw
//! region with crc32c blocks, and runs fio randwrite 4 KiB with
//! `--verify=crc32c --verify_backlog --verify_fatal` in the background
//! while it writes files (md5s recorded) and reads every file back from the
//! disk in a loop. The host first starts a migration capped at 1 MiB/s
//! and cancels it (the source must go on), then migrates the guest three
//! times, a->b->a->b, each from QEMU's HMP monitor (`migrate -d`,
//! `info migrate`); the old QEMU quits and its client waits for the next
//! one. At the end, on the last destination: fio stopped with no verify
//! error, every fio block read back with its crc32c, every file's md5 after
//! a remount, e2fsck -fn in the guest and on the host, a kernel log without
//! I/O errors.
//!
//! The server holds every read for 20 ms (a `fault` stage), so requests
//! are in flight whenever QEMU stops the guest, and a second fio job only
//! reads and verifies crc32c blocks into buffers nothing else writes: a
//! read the dirty log misses reaches the destination as the buffer's old
//! block. The second test proves it: without logging the server's data
//! writes (`--test-unlogged-writes`) the same run fails on verification.
//!
//! Everything runs from `integration/vhost/migrate.sh` (`CANCEL=1`,
//! `MIGRATIONS=3`); this prints QEMU's figures (total time and downtime of
//! each migration).

use vrio_integration::vhost::{require_tools, run_script, vrio_binaries};

const MIGRATIONS: usize = 3;

/// The two tests boot guests one at a time (2 cores, TCG).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `integration/vhost/migrate.sh` with `env`; returns its whole
/// output and whether it exited successfully.
fn run_migrations(env: &[(&str, &str)]) -> (String, bool) {
    require_tools(
        "the vhost-user-blk migration guest",
        &[
            "mke2fs", "e2fsck", "md5sum", "qemu-img", "fio", "python3", "ss",
        ],
    );
    run_script("migrate.sh", "migrate-guest.sh", &vrio_binaries(), env)
}

/// The value after `key=` on `line`.
fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn a_guest_doing_verified_io_migrates_back_and_forth_between_two_vrio_clients_of_one_server() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let migrations = MIGRATIONS.to_string();
    let (log, ok) = run_migrations(&[
        ("CANCEL", "1"),
        ("MIGRATIONS", &migrations),
        ("NQ", "2"),
        ("SMP", "2"),
        ("MEM", "512"),
        ("GAP", "5"),
    ]);
    let has = |s: &str| log.contains(s);
    if let Some(e) = log
        .lines()
        .find_map(|l| l.strip_prefix("QEMU REFUSED MIGRATION: "))
    {
        panic!("QEMU refused to migrate the guest: {e}");
    }
    let fail = log.lines().find(|l| l.contains("FAIL "));
    assert!(
        fail.is_none(),
        "a failure was reported: {}",
        fail.unwrap_or_default()
    );
    assert!(
        has("(fabric soft, 2 queue(s)"),
        "vrio-client did not serve the socket remotely"
    );
    assert!(
        has("2 queue(s), migrate guest noio=0"),
        "the guest driver did not get two queues"
    );
    assert!(
        has("MIGRATE GUEST READY io=1"),
        "the guest did not start its I/O"
    );
    assert!(
        has("MIGRATION CANCELLED OK"),
        "the cancelled migration, and the source going on"
    );

    // Each migration completed, alternating sides; QEMU's figures.
    let figures: Vec<(usize, String, u64, u64)> = log
        .lines()
        .filter(|l| l.starts_with("MIGRATION ") && !l.starts_with("MIGRATION CANCELLED"))
        .map(|l| {
            let mut w = l.split_whitespace().skip(1);
            let i: usize = w.next().and_then(|s| s.parse().ok()).expect(l);
            let dir = w.next().expect(l).to_string();
            assert_eq!(
                value(l, "status"),
                Some("completed"),
                "migration {i} did not complete: {l}"
            );
            let total = value(l, "total_ms").and_then(|s| s.parse().ok());
            let down = value(l, "downtime_ms").and_then(|s| s.parse().ok());
            (
                i,
                dir,
                total.unwrap_or_else(|| panic!("no total time: {l}")),
                down.unwrap_or_else(|| panic!("no downtime: {l}")),
            )
        })
        .collect();
    assert_eq!(
        figures.len(),
        MIGRATIONS,
        "migrations reported: {figures:?}"
    );
    for (k, (i, dir, _, _)) in figures.iter().enumerate() {
        assert_eq!(*i, k + 1, "migration order");
        let want = if k % 2 == 0 { "a->b" } else { "b->a" };
        assert_eq!(dir, want, "migration {i} went {dir}");
    }

    // The guest's verdict on the last destination.
    for (mark, what) in [
        ("FIO FILL OK", "fio's crc32c fill before the migrations"),
        ("FIO RUN OK", "fio's randwrite with verify_backlog"),
        (
            "FIO READER OK",
            "the reader's crc32c blocks, read across every migration",
        ),
        (
            "FIO VERIFY-ONLY OK",
            "fio's read-back of every crc32c block",
        ),
        (
            "FILES OK",
            "the md5s of the files written before and during",
        ),
        ("GUEST E2FSCK OK", "e2fsck -fn in the guest"),
        (
            "MIGRATE DMESG CLEAN",
            "I/O errors in the guest's kernel log",
        ),
        ("MIGRATE GUEST OK", "the guest's checks"),
        ("VRIO-GUEST-DONE rc=0", "the guest script"),
        ("HOST E2FSCK OK", "e2fsck -fn of the backing file"),
    ] {
        assert!(has(mark), "{what}: no \"{mark}\"");
    }
    // The control plane followed the device to each destination's host.
    for (i, dir, _, _) in &figures {
        let to = &dir[dir.len() - 1..];
        assert!(
            has(&format!(
                "CONTROL PLANE vub on host-{to} after migration {i}"
            )),
            "the controller did not learn that migration {i} moved the device to host-{to}"
        );
    }
    assert!(has("RESULT: PASS"), "migrate.sh result");
    assert!(ok, "migrate.sh failed");

    println!("migration figures (QEMU's info migrate, TCG, 512 MiB, guest I/O running):");
    for (i, dir, total, down) in &figures {
        println!("  migration {i} {dir}: total {total} ms, downtime {down} ms");
    }
}

/// The negative proof: the same guest, with both clients started with
/// `--test-unlogged-writes` (they leave the data the I/O server writes out
/// of QEMU's dirty log; the used rings are still logged). Reads the server
/// completes while the vrings drain, after QEMU's last copy of their
/// buffers began, then reach the destination with the buffers' old
/// contents: the guest's reader finds another block's header where it
/// read (fio: "bad header offset"), and the run fails.
#[test]
fn without_the_dirty_log_of_server_writes_the_migrated_guest_reads_stale_data() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let migrations = MIGRATIONS.to_string();
    let (log, ok) = run_migrations(&[
        ("UNLOGGED", "1"),
        ("MIGRATIONS", &migrations),
        ("NQ", "2"),
        ("SMP", "2"),
        ("MEM", "512"),
        ("GAP", "5"),
    ]);
    assert!(
        log.lines()
            .any(|l| l.starts_with("MIGRATION 1 a->b") && l.contains("status=completed")),
        "the first migration must complete (the data, not the migration, is what fails)"
    );
    let stale = log
        .lines()
        .find(|l| l.contains("verify: bad header") || l.contains("verify: bad magic"));
    assert!(
        stale.is_some(),
        "without logging the server's writes, a migrated guest must find stale data"
    );
    println!("the guest's verify error: {}", stale.unwrap_or_default());
    assert!(
        log.contains("RESULT: FAIL") && !ok,
        "migrate.sh must fail without the dirty log"
    );
}
