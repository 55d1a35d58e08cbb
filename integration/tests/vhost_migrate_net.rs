//! Live migration of a guest whose NIC vrio serves, while it receives a TCP
//! stream through the I/O server's switch (issue 16, "Net").
//!
//! Two stock guests (QEMU TCG, the Debian kernel's virtio_net on
//! `-netdev vhost-user`), one `vrio-server` whose switch joins their ports.
//! Guest 1 (the sender) has its own `vrio-client vhost-user-net`. Guest 2
//! (the receiver) is served on side a by one `vrio-client` and on side b by
//! another, for the same device (id, MAC, credential) on its own socket;
//! neither has `--once`, so each serves the next QEMU on its side.
//!
//! Guest 1 streams random data (1 MiB chunks from /dev/urandom) to guest 2
//! with busybox nc; guest 2 reads it slowly, so its socket always holds
//! data the guest took in (TCP checksums verified) but has not read, in RX
//! buffers the server wrote with one-sided writes. While it streams, the
//! host migrates guest 2 twice, a->b->a, from QEMU's HMP monitor
//! (`migrate -d` to a QEMU started with `-incoming`, `info migrate` until
//! completed); the old QEMU quits. Those RX buffers reach the destination
//! only through the dirty log the source's agent keeps while QEMU migrates.
//! After the last migration the host tells the sender to stop; the md5 of
//! what the receiver stored (on the last destination) must be the md5 of
//! what the sender sent.
//!
//! Everything runs from `integration/vhost/migrate-net.sh` (guest script
//! `migrate-net-guest.sh`); this prints QEMU's figures (total time and
//! downtime of each migration).

use vrio_integration::vhost::{require_tools, run_script, vrio_binaries};

const MIGRATIONS: usize = 2;

/// `key=value` of a line, the value up to the next blank.
fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn md5_after(log: &str, tag: &str) -> (String, u64) {
    let line = log
        .lines()
        .find(|l| l.contains(tag))
        .unwrap_or_else(|| panic!("no {tag:?} line"));
    let md5 = line
        .split(tag)
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    let bytes = value(line, "bytes")
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| panic!("no bytes= in {line:?}"));
    (md5, bytes)
}

#[test]
fn a_guest_receiving_tcp_through_the_io_server_migrates_back_and_forth_and_the_md5_matches() {
    require_tools(
        "the vhost-user-net migration guests",
        &["md5sum", "python3", "ss"],
    );
    let migrations = MIGRATIONS.to_string();
    let (log, ok) = run_script(
        "migrate-net.sh",
        "migrate-net-guest.sh",
        &vrio_binaries(),
        &[("MIGRATIONS", migrations.as_str()), ("RUST_LOG", "info")],
    );
    let has = |s: &str| log.contains(s);

    // The agents: the sender's, and two for the receiver's device.
    assert!(
        has("device 1, mac 52:54:00:00:00:01"),
        "vrio-client 1 did not serve its socket"
    );
    assert_eq!(
        log.matches("device 2, mac 52:54:00:00:00:02").count(),
        2,
        "vrio-clients a and b serve device 2"
    );

    // Each migration completed, the other way each time, while the sender
    // was still streaming; the receiver then went on from the new side.
    let migs: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("NET MIGRATION "))
        .collect();
    assert_eq!(
        migs.len(),
        MIGRATIONS,
        "{MIGRATIONS} migrations tried: {migs:#?}"
    );
    let mut figures = Vec::new();
    for (i, l) in migs.iter().enumerate() {
        let n = i + 1;
        let dir = if n % 2 == 1 { "a->b" } else { "b->a" };
        assert!(
            l.starts_with(&format!("NET MIGRATION {n} {dir} ")),
            "migration {n} goes {dir}: {l}"
        );
        assert_eq!(
            value(l, "status"),
            Some("completed"),
            "migration {n} did not complete: {l}"
        );
        assert_eq!(
            value(l, "streaming"),
            Some("yes"),
            "the stream had ended before migration {n} completed: {l}"
        );
        let ms = |k: &str| -> u64 {
            value(l, k)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {k} in {l}"))
        };
        figures.push((n, dir, ms("total_ms"), ms("downtime_ms"), ms("rxq_before")));
    }
    // The receiver reads slowly: data it took in (TCP checksums verified)
    // sat unread in RX buffers the server wrote while QEMU migrated it,
    // and only the dirty log carries those to the destination.
    assert!(
        figures.iter().any(|f| f.4 > 0),
        "the receiver's socket held no data before any migration: {figures:?}"
    );
    for side in ["b", "a"].iter().cycle().take(MIGRATIONS) {
        assert!(
            has(&format!("the receiver runs on side {side}")),
            "the receiver received nothing on side {side} after its migration"
        );
    }
    // The sources' agents logged: QEMU gave each its dirty log and turned
    // logging on.
    assert!(
        log.matches("dirty log from the VMM (SET_LOG_BASE)").count() >= MIGRATIONS,
        "every source's agent got the VMM's dirty log"
    );
    assert!(
        log.matches("switched dirty logging (live migration) logging=true")
            .count()
            >= MIGRATIONS,
        "every source's agent logged the server's writes"
    );

    // The data: what guest 1 sent is what guest 2 stored, across both moves.
    let (sent, sent_bytes) = md5_after(&log, "NET SEND md5=");
    let (received, received_bytes) = md5_after(&log, "NET RECV md5=");
    assert_eq!(sent.len(), 32, "md5 {sent:?}");
    assert!(sent_bytes >= 16 << 20, "only {sent_bytes} bytes streamed");
    assert_eq!(
        (received.as_str(), received_bytes),
        (sent.as_str(), sent_bytes),
        "the stream arrived changed"
    );
    assert!(has(&format!("HOST MD5 OK md5={sent}")));

    // Nothing failed anywhere: the host's checks, the guests' scripts.
    let fails: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("FAIL ") && !l.starts_with("RESULT:"))
        .collect();
    assert!(fails.is_empty(), "failures: {fails:#?}");
    for s in ["a", "b"] {
        assert!(
            has(&format!("vrio-client {s} alive after")),
            "vrio-client {s} did not survive its VMMs"
        );
    }

    println!(
        "---- figures (QEMU's info migrate; the receiver migrated while a TCP stream arrived):"
    );
    for (n, dir, total, down, rxq) in &figures {
        println!(
            "  migration {n} {dir}: total {total} ms, downtime {down} ms ({rxq} bytes unread in the receiver's socket just before)"
        );
    }
    if let Some(l) = log.lines().find(|l| l.contains("host: guest 1: NET SENT")) {
        println!("{l}");
    }
    assert!(has("RESULT: PASS"), "migrate-net.sh result");
    assert!(ok, "migrate-net.sh failed");
}
