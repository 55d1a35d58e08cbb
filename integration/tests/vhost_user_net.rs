//! Two unmodified guests talking through a remote vrio I/O server: each
//! QEMU (TCG, stock Debian kernel, virtio_net on `-netdev vhost-user`) is
//! served by its own `vrio-client vhost-user-net` (two VM hosts), whose RX
//! and TX queues attach over the software fabric to one `vrio-server`;
//! its switch joins the two ports. The server learns each port's MAC from
//! the agent's declaration, with no static configuration.
//!
//! Guest 1 (10.0.0.1) and guest 2 (10.0.0.2) ping each other, then guest 1
//! sends 64 MiB of random data over TCP (busybox nc) to guest 2; both print
//! the md5 and the host compares them. Everything runs from
//! `integration/vhost/run-net.sh` (guest script `net.sh`).
//!
//! The uplink test puts each guest on its own I/O server, whose switch has
//! a TAP uplink; a network namespace bridges the two TAPs, so the guests
//! reach each other only through the uplinks, and the namespace (the
//! host's side of the servers' gateway) pings both guests and sends them
//! data over TCP.

use vrio_integration::vhost::{require_tools, run_script, vrio_binaries};

/// Runs `run-net.sh` with `env`; checks what every topology shares (both
/// agents served, the guests pinged each other, the data guest 1 sent of
/// `mib` MiB is what guest 2 stored) and returns the log.
fn run_net(env: &[(&str, &str)], mib: u64) -> String {
    // QEMU, the kernel and busybox: scripts/setup.sh installs them when
    // missing; a host where that fails must fail here, loudly.
    require_tools("the vhost-user-net guests", &[]);
    let netmb = mib.to_string();
    let mut all = vec![("NETMB", netmb.as_str()), ("TMO", "240")];
    all.extend_from_slice(env);
    let (log, ok) = run_script("run-net.sh", "net.sh", &vrio_binaries(), &all);
    let has = |s: &str| log.contains(s);
    for i in 1..=2 {
        assert!(
            has(&format!("device {i}, mac 52:54:00:00:00:0{i}")),
            "vrio-client {i} did not serve its socket"
        );
    }
    // Both directions, each guest's own ping.
    assert!(has("PING 10.0.0.2 rc=0"), "guest 1 could not ping guest 2");
    assert!(has("PING 10.0.0.1 rc=0"), "guest 2 could not ping guest 1");
    assert!(has("HOST PING OK"));
    // The data: what guest 1 sent is what guest 2 stored.
    let sent = md5_after(&log, "NET SEND md5=");
    let received = md5_after(&log, "NET RECV md5=");
    assert_eq!(sent.len(), 32, "md5 {sent:?}");
    assert_eq!(sent, received, "the {mib} MiB arrived changed");
    assert!(has(&format!("bytes={}", mib << 20)), "not {mib} MiB");
    assert!(has(&format!("HOST MD5 OK md5={sent}")));
    // The guests negotiated CSUM and left their TCP checksums to the
    // server's TX path (a wrong one would have stalled the stream).
    let completed: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split(" bytes (").nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        completed.iter().any(|&n| n > 1000),
        "the server completed no guest checksums: {completed:?}"
    );
    // Throughput, printed for the record (TCG guests: no assertion).
    if let Some(l) = log.lines().find(|l| l.contains("host: NET SENT")) {
        println!("{l}");
    }
    assert!(has("RESULT: PASS"), "run-net.sh result");
    assert!(ok, "run-net.sh failed");
    log
}

fn md5_after(log: &str, tag: &str) -> String {
    log.lines()
        .find_map(|l| l.split(tag).nth(1))
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no {tag:?} line"))
}

/// The first number after `tag` on each line that has it.
fn numbers_after(log: &str, tag: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split(tag).nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn two_stock_guests_ping_and_move_64_mib_over_tcp_through_the_io_server() {
    let log = run_net(&[], 64);
    // The server switched it: its net queues served requests.
    let net_requests = numbers_after(&log, "vrio-server: net: ");
    assert!(
        net_requests.iter().any(|&n| n > 10_000),
        "the server's net queues served only {net_requests:?} requests"
    );
}

#[test]
fn guests_on_two_io_servers_talk_through_tap_uplinks_and_a_namespace_reaches_them() {
    let log = run_net(&[("UPLINK", "1"), ("HOSTMB", "8")], 32);
    let has = |s: &str| log.contains(s);
    assert!(has("host: vrio-server 1 on"), "a second I/O server");
    assert_eq!(
        log.matches("joined to the switch as port").count(),
        2,
        "each server joined its TAP to its switch"
    );
    // The host's side of the gateway reached both guests through a TAP.
    assert!(has("HOST NS PING 10.0.0.1 OK"), "namespace -> guest 1");
    assert!(has("HOST NS PING 10.0.0.2 OK"), "namespace -> guest 2");
    let host_sent = md5_after(&log, "HOST NS SENT 8 MiB to 10.0.0.2:5001 md5=");
    let guest_got = md5_after(&log, "NET HOSTRECV md5=");
    assert_eq!(
        host_sent, guest_got,
        "the namespace's 8 MiB arrived changed"
    );
    assert!(has(&format!("HOST NS MD5 OK md5={host_sent}")));
    // Guest 1's 32 MiB went out of server 0's TAP and in through server
    // 1's: each uplink carried it (the frames' bytes, headers included).
    let to_tap = numbers_after(&log, "to the TAP ");
    let from_tap = numbers_after(&log, "from the TAP ");
    assert_eq!(
        (to_tap.len(), from_tap.len()),
        (2, 2),
        "two uplinks' final counters"
    );
    let big = |v: &[u64]| v.iter().filter(|&&frames| frames > 20_000).count();
    assert_eq!(
        big(&to_tap),
        1,
        "one uplink sent the stream out: {to_tap:?}"
    );
    assert_eq!(big(&from_tap), 1, "one uplink took it in: {from_tap:?}");
    // Nothing the guests or the namespace sent was malformed, spoofed or
    // looped back (a full backlog may drop a TCP segment: TCP resends it).
    for bad in [
        "short=",
        "oversized=",
        "bad_header=",
        "multicast_source=",
        "spoofed=",
        "bad_chain=",
        "rx_too_large=",
        "loopback=",
        "uplink_error=",
    ] {
        assert!(!has(bad), "frames dropped as {bad}");
    }
}
