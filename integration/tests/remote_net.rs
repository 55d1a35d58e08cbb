//! virtio-net served by remote sidecores, in one process: synthetic net
//! guests, one VM-host agent (and protection domain) per guest, and an I/O
//! server whose switch connects them, over the software fabric.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_core::blk::MemoryBackend;
use vrio_core::net::{DropReason, MacAddr};
use vrio_core::remote::{IoServer, IoServerConfig, NetServerConfig, NotifyMode};
use vrio_core::ring::Segment;
use vrio_rdma::{Backend, Domain};
use vrio_testkit::net::traffic::{run_receiver, run_sender, Link, RecvConfig, SendConfig};
use vrio_testkit::net::{
    attach_net_remote, run_net_remote, NetGuest, NetGuestConfig, NetGuestQueue, NetRunConfig,
};

fn soft() -> Arc<dyn Domain> {
    Arc::from(vrio_rdma::open(Backend::Soft, None).unwrap())
}

/// Two guests send `frames` verified frames each way through the server's
/// switch, with 512-byte RX buffers: a 1514-byte frame takes three of them.
fn exchange(mode: NotifyMode, frame_len: usize, frames: u64) {
    let rc = NetRunConfig {
        guests: 2,
        frame_len,
        frames,
        window: 128,
        rx_buf_len: 512,
        stall_timeout: Duration::from_secs(30),
        ..NetRunConfig::default()
    };
    let progress = Arc::new(AtomicU64::new(0));
    let (r, fig) = run_net_remote(mode, 1, Backend::Soft, &rc, &progress).unwrap();
    let f = &fig.fabric;
    println!(
        "{} {frame_len} B: sent {} received {} (merged {}), {:.0} pkt/s, \
         {:.2} fabric ops/req, {:.2} RTT/req over {} requests ({} batches), drops {:?}",
        r.model,
        r.sent.sent,
        r.recv.received,
        r.recv.merged,
        r.packets_per_sec(),
        f.ops_per_request(),
        f.rtts_per_request(),
        f.requests,
        f.batches,
        r.ports
            .iter()
            .map(|p| p.nonzero_drops())
            .collect::<Vec<_>>()
    );
    assert_eq!(r.sent.sent, 2 * frames, "every frame sent");
    assert_eq!(r.recv.received, 2 * frames, "every frame received");
    assert_eq!(r.recv.lost, 0, "lost frames");
    assert_eq!(r.recv.corrupt, 0, "corrupt frames");
    assert_eq!(r.recv.duplicate, 0, "duplicated frames");
    assert_eq!(r.failures(), 0, "failures: {:?} {:?}", r.sent, r.recv);
    assert_eq!(r.port_drops(), 0, "switch drops: {:?}", r.ports);
    if frame_len + 12 > 512 {
        assert_eq!(r.recv.merged, 2 * frames, "every frame spans buffers");
    }
    // Requests are TX chains plus RX frames, one each per frame sent.
    assert_eq!(f.requests, 4 * frames, "server requests");
    assert_eq!(f.bad_requests, 0);
    // TX: a READ wave and a reply wave; RX: one WRITE wave. Buffers and
    // requests are announced by doorbells, so nothing else is on the path.
    if mode == NotifyMode::Doorbell {
        assert!(
            f.rtts_per_request() <= 1.5 + 1e-9,
            "{:.3} RTT/req",
            f.rtts_per_request()
        );
        assert_eq!(f.fetches, 0, "doorbells carry every descriptor");
    }
    assert!(
        f.ops_per_request() < 6.0,
        "{:.2} ops/req",
        f.ops_per_request()
    );
}

#[test]
fn small_frames_are_exchanged_exactly_once() {
    exchange(NotifyMode::Doorbell, 64, 4000);
}

#[test]
fn full_frames_spread_over_mergeable_buffers_exactly_once() {
    exchange(NotifyMode::Doorbell, 1514, 3000);
}

#[test]
fn adaptive_and_remote_poll_modes_exchange_exactly_once() {
    exchange(NotifyMode::Adaptive, 1514, 2000);
    exchange(NotifyMode::RemotePoll, 64, 2000);
}

/// Posts one chain and waits for the device to use it; its used length.
fn post_and_reap(
    q: &mut NetGuestQueue,
    mem: &vrio_core::memory::LocalMemory,
    readable: &[Segment],
    writable: &[Segment],
) -> u32 {
    let head = q.driver.add(mem, readable, writable, false).unwrap();
    q.driver.publish(mem).unwrap();
    q.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some((h, len)) = q.driver.pop_used(mem).unwrap() {
            assert_eq!(h, head);
            return len;
        }
        assert!(Instant::now() < deadline, "hostile chain never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Guests 0 and 1 exchanging verified frames on their own threads.
struct Exchange {
    senders: Vec<std::thread::JoinHandle<vrio_testkit::net::traffic::SendReport>>,
    receivers: Vec<std::thread::JoinHandle<vrio_testkit::net::traffic::RecvReport>>,
    /// Frames each way; 0: until [`Exchange::stop`].
    frames: u64,
    links: [Arc<Link>; 2],
    stop: Arc<AtomicBool>,
}

impl Exchange {
    fn start(guests: Vec<NetGuest>, frames: u64, frame_len: usize) -> Self {
        let macs: Vec<MacAddr> = guests.iter().map(|g| g.cfg.mac).collect();
        let links = [Arc::new(Link::default()), Arc::new(Link::default())];
        let stop = Arc::new(AtomicBool::new(false));
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for (i, g) in guests.into_iter().enumerate() {
            let (me, peer) = (macs[i], macs[i ^ 1]);
            let (mem, mut rxq, mut txq) = g.into_parts();
            let (out, inn) = (links[i].clone(), links[i ^ 1].clone());
            let (m2, st) = (mem.clone(), stop.clone());
            let scfg = SendConfig {
                dst: peer,
                frames,
                duration: None,
                frame_len,
                window: 64,
                stall_timeout: Duration::from_secs(30),
            };
            senders.push(std::thread::spawn(move || {
                run_sender(&mut txq, &mem, me, &scfg, &out, &st)
            }));
            let rcfg = RecvConfig {
                peer,
                stall_timeout: Duration::from_secs(30),
            };
            receivers.push(std::thread::spawn(move || {
                run_receiver(&mut rxq, &m2, me, &rcfg, &inn, &AtomicU64::new(0))
            }));
        }
        Self {
            senders,
            receivers,
            frames,
            links,
            stop,
        }
    }

    /// Frames received in the slower direction so far.
    fn received(&self) -> u64 {
        self.links
            .iter()
            .map(|l| l.received.load(Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Ends an open-ended exchange: the senders stop, the receivers drain.
    fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    /// Waits for both directions and checks every frame arrived once.
    fn finish(self) {
        let mut sent = 0;
        for t in self.senders {
            let s = t.join().unwrap();
            assert!(!s.stalled && s.protocol_errors == 0, "{s:?}");
            sent += s.sent;
        }
        let mut received = 0;
        for t in self.receivers {
            let r = t.join().unwrap();
            println!("receiver: {r:?}");
            assert_eq!(r.failures(), 0, "lost, corrupt or duplicated: {r:?}");
            assert_eq!(r.duplicate + r.unexpected, 0, "{r:?}");
            received += r.received;
        }
        if self.frames > 0 {
            assert_eq!(sent, 2 * self.frames);
        }
        assert_eq!(received, sent, "traffic complete");
    }
}

fn net_server(sidecores: usize, macs: &[MacAddr]) -> IoServer {
    IoServer::start(
        soft(),
        Arc::new(MemoryBackend::new(1 << 20)),
        IoServerConfig {
            sidecores,
            net: NetServerConfig {
                devices: macs
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (i as u64, *m))
                    .collect(),
                ..NetServerConfig::default()
            },
            ..IoServerConfig::default()
        },
    )
    .unwrap()
}

/// Guest `i` of `macs` (device `i`), attached to `server` by its own agent.
fn net_guests(
    server: &IoServer,
    macs: &[MacAddr],
    rx_buf_len: u32,
) -> (Vec<NetGuest>, Vec<vrio_core::remote::AttachedDevice>) {
    let mut guests = Vec::new();
    let mut agents = Vec::new();
    for (i, mac) in macs.iter().enumerate() {
        let g = NetGuest::new(NetGuestConfig {
            mac: *mac,
            rx_buf_len,
            ..NetGuestConfig::new(i as u32)
        })
        .unwrap();
        agents.push(
            attach_net_remote(
                &g,
                i as u64,
                server.addr(),
                NotifyMode::Doorbell,
                Backend::Soft,
            )
            .unwrap(),
        );
        guests.push(g);
    }
    (guests, agents)
}

#[test]
fn net_queues_move_between_sidecores_under_traffic() {
    let macs = [MacAddr::local(1), MacAddr::local(2)];
    let server = net_server(2, &macs);
    let (guests, mut agents) = net_guests(&server, &macs, 512);
    // Open-ended traffic, so that the moves happen under it however fast
    // the machine: at least 4000 frames each way and every queue moved.
    let x = Exchange::start(guests, 0, 1514);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut k = 0usize;
    while (x.received() < 4000 || server.sidecore_moves() < 8) && Instant::now() < deadline {
        // RX and TX of both devices hop between the two sidecores, with
        // held buffers and waves in flight.
        let q = format!("dev{}.q{}", k % 2, (k / 2) % 2);
        server.move_queue(&q, (k / 4) % 2).unwrap();
        k += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    let under_traffic = server.sidecore_moves();
    x.stop();
    x.finish();
    println!("{under_traffic} sidecore moves under traffic");
    assert!(under_traffic >= 8, "only {under_traffic} queue moves");
    for a in agents.iter_mut() {
        a.detach();
    }
    server.stop();
}

#[test]
fn spoofed_frames_and_hostile_chains_hurt_no_other_guest() {
    let macs = [MacAddr::local(1), MacAddr::local(2), MacAddr::local(3)];
    let server = net_server(1, &macs);
    let (mut guests, mut agents) = net_guests(&server, &macs, 1024);
    let hostile = guests.pop().unwrap();
    // Guests 0 and 1 exchange verified traffic the whole time.
    let x = Exchange::start(guests, 3000, 700);
    let stop = AtomicBool::new(false);

    // The hostile guest: frames claiming guest 0's address, to guest 1.
    let (hmem, mut hrx, mut htx) = hostile.into_parts();
    let spoofed = 50;
    let r = run_sender(
        &mut htx,
        &hmem,
        macs[0],
        &SendConfig {
            dst: macs[1],
            frames: spoofed,
            duration: None,
            frame_len: 100,
            window: 1000,
            stall_timeout: Duration::from_secs(20),
        },
        &Link::default(),
        &stop,
    );
    assert_eq!(r.sent, spoofed);
    assert!(!r.stalled && r.protocol_errors == 0, "{r:?}");
    let bad_before = server.net_stats().snapshot().bad_requests;
    // A TX chain pointing outside its memory: refused, used length 0.
    let outside = [Segment {
        addr: 1 << 40,
        len: 128,
    }];
    assert_eq!(post_and_reap(&mut htx, &hmem, &outside, &[]), 0);
    // An RX "buffer" the device could only read: refused, used length 0.
    let slot = [Segment {
        addr: hrx.slot(0),
        len: 256,
    }];
    assert_eq!(post_and_reap(&mut hrx, &hmem, &slot, &[]), 0);
    // An RX buffer outside its memory: refused too.
    assert_eq!(post_and_reap(&mut hrx, &hmem, &[], &outside), 0);

    x.finish();

    let ports = server.net().port_stats();
    println!("ports: {ports:?}");
    let hostile_port = &ports[2].1;
    assert_eq!(ports[2].0, 2);
    assert_eq!(
        hostile_port.drops(DropReason::Spoofed),
        spoofed,
        "every spoofed frame dropped and counted"
    );
    assert_eq!(hostile_port.drops(DropReason::BadChain), 2, "bad RX chains");
    for (id, p) in &ports[..2] {
        assert_eq!(p.drops(DropReason::Spoofed), 0, "device {id}");
        assert_eq!(p.drops(DropReason::BadChain), 0, "device {id}");
    }
    let fab = server.net_stats().snapshot();
    assert_eq!(
        fab.bad_requests - bad_before,
        3,
        "each hostile chain refused"
    );
    // The server serves on: all six queues are still attached.
    assert_eq!(server.queues().len(), 6, "{:?}", server.queues());
    for a in agents.iter_mut() {
        a.detach();
    }
    server.stop();
}

fn net_policy(json: &str) -> vrio_core::interpose::PolicySpec {
    vrio_core::interpose::PolicySpec::parse(json).unwrap()
}

#[test]
fn a_net_acl_drops_and_counts_what_it_does_not_allow_next_to_clean_traffic() {
    let macs = [MacAddr::local(1), MacAddr::local(2), MacAddr::local(3)];
    let server = net_server(1, &macs);
    // Device 2 may only send from guest 0's address, which the switch
    // would not let it use anyway: everything it sends is refused, by the
    // ACL before the switch sees it.
    let acl = format!(
        r#"{{"stages":[{{"stage":"net_acl","allow_macs":["{}"]}}]}}"#,
        macs[0]
    );
    server.policies().set(2, &net_policy(&acl)).unwrap();
    let (mut guests, mut agents) = net_guests(&server, &macs, 1024);
    let filtered = guests.pop().unwrap();
    let x = Exchange::start(guests, 2000, 700);
    let (mem, _rx, mut tx) = filtered.into_parts();
    let n = 40;
    let r = run_sender(
        &mut tx,
        &mem,
        macs[2],
        &SendConfig {
            dst: macs[1],
            frames: n,
            duration: None,
            frame_len: 100,
            window: 1000,
            stall_timeout: Duration::from_secs(20),
        },
        &Link::default(),
        &AtomicBool::new(false),
    );
    assert_eq!(r.sent, n, "every refused frame completes: {r:?}");
    x.finish();
    let ports = server.net().port_stats();
    assert_eq!(ports[2].1.drops(DropReason::Policy), n);
    assert_eq!(ports[2].1.rx_packets, 0, "nothing reached the switch");
    for (id, p) in &ports[..2] {
        assert_eq!(p.drops(DropReason::Policy), 0, "device {id}");
    }
    let reports = server.policies().reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].0, 2);
    assert_eq!(reports[0].1[0].counter("drops", "acl_mac"), n);
    for a in agents.iter_mut() {
        a.detach();
    }
    server.stop();
}

#[test]
fn a_net_rate_limit_holds_a_sender_to_its_rate_without_losing_frames() {
    let macs = [MacAddr::local(1), MacAddr::local(2)];
    let server = net_server(1, &macs);
    server
        .policies()
        .set(
            0,
            &net_policy(r#"{"stages":[{"stage":"net_rate","frames_per_sec":1000}]}"#),
        )
        .unwrap();
    let (guests, mut agents) = net_guests(&server, &macs, 1024);
    let x = Exchange::start(guests, 0, 200);
    // Past the first burst, count guest 0's frames over 3 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while x.links[0].received.load(Relaxed) < 200 {
        assert!(Instant::now() < deadline, "no traffic");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (a, b) = (
        x.links[0].received.load(Relaxed),
        x.links[1].received.load(Relaxed),
    );
    std::thread::sleep(Duration::from_secs(3));
    let limited = (x.links[0].received.load(Relaxed) - a) as f64 / 3.0;
    let free = (x.links[1].received.load(Relaxed) - b) as f64 / 3.0;
    x.stop();
    x.finish();
    println!("limited sender {limited:.0} frames/s, unlimited {free:.0} frames/s");
    assert!(
        (900.0..=1100.0).contains(&limited),
        "{limited:.0} frames/s against 1000"
    );
    let reports = server.policies().reports();
    assert!(reports[0].1[0].counter("waits", "") > 0);
    for a in agents.iter_mut() {
        a.detach();
    }
    server.stop();
}
