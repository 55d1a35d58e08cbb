//! The TAP uplink against the host's own network stack: a network namespace
//! the test makes holds the TAP's host end, pings a switch port through it
//! (ARP request out, ARP reply in, ICMP both ways), and what the switch
//! must refuse from the TAP is dropped and counted.
//!
//! Needs root (CAP_NET_ADMIN) and /dev/net/tun, as the suite's machines
//! give; without them this test fails, saying why.

use std::process::Command;
use std::time::{Duration, Instant};

use vrio_core::net::{DropReason, FrameSource, MacAddr, Switch, SwitchConfig, TapUplink};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x7a, 0x00, 0x02];
const GUEST_IP: [u8; 4] = [10, 66, 0, 2];
const HOST_IP: &str = "10.66.0.1";

fn ip(args: &[&str]) -> std::process::Output {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run ip {args:?}: {e} (iproute2 is in scripts/setup.sh)")
    });
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A namespace removed when the test ends, however it ends.
struct Netns(String);
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn wait_frame(port: &vrio_core::net::Port, what: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        while let Some(f) = port.pop() {
            if what(&f) {
                return f;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the expected frame never reached the switch port");
}

fn is_arp_request_for_guest(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == GUEST_IP
}

fn is_echo_request_to_guest(f: &[u8]) -> bool {
    f.len() >= 42
        && f[0..6] == GUEST_MAC
        && f[12..14] == [0x08, 0x00]
        && f[23] == 1
        && f[30..34] == GUEST_IP
        && f[14 + usize::from(f[14] & 0xf) * 4] == 8
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn arp_reply(req: &[u8]) -> Vec<u8> {
    let mut r = req[..42].to_vec();
    r[0..6].copy_from_slice(&req[6..12]);
    r[6..12].copy_from_slice(&GUEST_MAC);
    r[20..22].copy_from_slice(&[0, 2]);
    r[22..28].copy_from_slice(&GUEST_MAC);
    r[28..32].copy_from_slice(&GUEST_IP);
    r[32..42].copy_from_slice(&req[22..32]);
    r
}

fn echo_reply(req: &[u8]) -> Vec<u8> {
    let mut r = req.to_vec();
    r[0..6].copy_from_slice(&req[6..12]);
    r[6..12].copy_from_slice(&GUEST_MAC);
    // Swapping the addresses leaves the IP header checksum as it is.
    r[26..30].copy_from_slice(&req[30..34]);
    r[30..34].copy_from_slice(&req[26..30]);
    let ihl = usize::from(req[14] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([req[16], req[17]]));
    let icmp = 14 + ihl..14 + total;
    r[icmp.start] = 0;
    r[icmp.start + 2..icmp.start + 4].copy_from_slice(&[0, 0]);
    let c = checksum(&r[icmp.clone()]);
    r[icmp.start + 2..icmp.start + 4].copy_from_slice(&c.to_be_bytes());
    r
}

#[test]
fn a_namespace_pings_a_switch_port_through_the_tap_uplink() {
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "no /dev/net/tun: this test needs the tun module (modprobe tun)"
    );
    assert!(
        Command::new("ping").arg("-V").output().is_ok(),
        "no ping on this machine: scripts/setup.sh installs iputils-ping"
    );
    let pid = std::process::id();
    let (tap_name, ns) = (format!("vrtap{}", pid % 100_000), format!("vrio-tap-{pid}"));
    let switch = Switch::new(SwitchConfig::default());
    let guest = switch.add_guest_port("guest", MacAddr(GUEST_MAC));
    let uplink = TapUplink::start(&switch, &tap_name)
        .unwrap_or_else(|e| panic!("{e} (this test must run as root)"));
    ip(&["netns", "add", &ns]);
    let _ns = Netns(ns.clone());
    // The TAP's descriptor keeps working after its link moves.
    ip(&["link", "set", &tap_name, "netns", &ns]);
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{HOST_IP}/24"),
        "dev",
        &tap_name,
    ]);
    ip(&["-n", &ns, "link", "set", &tap_name, "up"]);

    let ping = std::thread::spawn({
        let ns = ns.clone();
        move || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "ping",
                    "-c",
                    "1",
                    "-W",
                    "10",
                    "10.66.0.2",
                ])
                .output()
                .expect("ping")
        }
    });
    let req = wait_frame(&guest, is_arp_request_for_guest);
    assert_eq!(req[0..6], [0xff; 6], "an ARP request is broadcast");
    let host_mac = req[6..12].to_vec();
    assert!(
        !matches!(
            switch.forward(&guest, arp_reply(&req)),
            vrio_core::net::Forwarded::Dropped(_)
        ),
        "the switch dropped the ARP reply"
    );
    // The kernel took the reply: it sends the echo request to our MAC.
    let echo = wait_frame(&guest, is_echo_request_to_guest);
    assert_eq!(echo[6..12], host_mac[..], "from the TAP's address");
    assert_eq!(
        switch.forward(&guest, echo_reply(&echo)),
        vrio_core::net::Forwarded::Unicast(uplink.port().id()),
        "the host's address was learned on the uplink"
    );
    let out = ping.join().unwrap();
    assert!(
        out.status.success(),
        "ping through the TAP failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let up = uplink.port().stats().snapshot();
    assert!(
        up.rx_packets >= 2 && up.tx_packets >= 2,
        "uplink counters {up:?}"
    );

    // A jumbo frame from the host exceeds the switch's MTU: dropped, counted.
    ip(&["-n", &ns, "link", "set", &tap_name, "mtu", "9000"]);
    let before = uplink
        .port()
        .stats()
        .snapshot()
        .drops(DropReason::Oversized);
    let big = Command::new("ip")
        .args([
            "netns", "exec", &ns, "ping", "-c", "1", "-W", "1", "-M", "dont",
        ])
        .args(["-s", "8000", "10.66.0.2"])
        .output()
        .expect("ping");
    assert!(!big.status.success(), "an 8000-byte ping got an answer");
    // The pump thread reads and drops the frame on its own time: ping's 1 s
    // is no bound for it on a loaded machine, so wait for the count.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = uplink
            .port()
            .stats()
            .snapshot()
            .drops(DropReason::Oversized);
        if after > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "oversized frames from the TAP were not counted within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // (The namespace's IPv6 chatter may reach the port: it is multicast.)
    while let Some(f) = guest.pop() {
        assert!(
            f.len() <= 1518,
            "a {}-byte frame reached the guest port",
            f.len()
        );
    }
    drop(uplink);
    assert_eq!(
        switch.ports().len(),
        1,
        "the uplink port stays after the uplink is dropped"
    );
}
