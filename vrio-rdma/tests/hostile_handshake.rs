//! Hostile peers at connection setup, on the soft fabric (TCP and Unix) and
//! on shm: none of them blocks or delays another connection's accept, a
//! peer that is not a vrio peer is refused, and a silent or trickling peer
//! is cut off at the handshake deadline.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, MsgFlags};
use vrio_rdma::shm::ShmDomain;
use vrio_rdma::soft::wire::{Header, Kind, HEADER_LEN};
use vrio_rdma::soft::SoftDomain;
use vrio_rdma::{AcceptLimits, Domain, EndpointConfig, Listener};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fabric {
    /// soft over TCP
    Tcp,
    /// soft over a Unix stream socket
    Unix,
    /// shm (Unix seqpacket)
    Shm,
}

fn sock_path(f: Fabric, tag: &str) -> String {
    let p = std::env::temp_dir().join(format!(
        "vrio-hostile-{f:?}-{tag}-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&p);
    format!("unix:{}", p.display())
}

fn listen(f: Fabric, tag: &str, limits: AcceptLimits) -> (Box<dyn Listener>, String) {
    let cfg = EndpointConfig::default();
    let l: Box<dyn Listener> = match f {
        Fabric::Tcp => Box::new(
            SoftDomain::new()
                .listen_with("127.0.0.1:0", cfg, limits)
                .unwrap(),
        ),
        Fabric::Unix => Box::new(
            SoftDomain::new()
                .listen_with(&sock_path(f, tag), cfg, limits)
                .unwrap(),
        ),
        Fabric::Shm => Box::new(
            ShmDomain::new()
                .listen_with(&sock_path(f, tag), cfg, limits)
                .unwrap(),
        ),
    };
    let addr = l.local_addr();
    (l, addr)
}

fn client(f: Fabric) -> Box<dyn Domain> {
    match f {
        Fabric::Tcp | Fabric::Unix => Box::new(SoftDomain::new()),
        Fabric::Shm => Box::new(ShmDomain::new()),
    }
}

/// A hand-written peer on a raw socket.
struct Raw {
    fd: OwnedFd,
    f: Fabric,
}

impl Raw {
    fn connect(f: Fabric, addr: &str) -> Self {
        let fd = match f {
            Fabric::Tcp => OwnedFd::from(std::net::TcpStream::connect(addr).unwrap()),
            Fabric::Unix => OwnedFd::from(
                std::os::unix::net::UnixStream::connect(addr.strip_prefix("unix:").unwrap())
                    .unwrap(),
            ),
            Fabric::Shm => {
                let s = socket::socket(
                    socket::AddressFamily::Unix,
                    socket::SockType::SeqPacket,
                    socket::SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .unwrap();
                let ua = socket::UnixAddr::new(addr.strip_prefix("unix:").unwrap()).unwrap();
                socket::connect(s.as_raw_fd(), &ua).unwrap();
                s
            }
        };
        Self { fd, f }
    }

    fn send(&self, b: &[u8]) -> nix::Result<()> {
        let n = socket::send(self.fd.as_raw_fd(), b, MsgFlags::MSG_NOSIGNAL)?;
        assert_eq!(n, b.len(), "short send");
        Ok(())
    }

    /// One read of up to `buf.len()` bytes, waiting at most `limit`:
    /// `Some(0)` at EOF (or reset), `None` if nothing came.
    fn recv(&self, buf: &mut [u8], limit: Duration) -> Option<usize> {
        let tv =
            nix::sys::time::TimeVal::new(limit.as_secs() as _, limit.subsec_micros().max(1) as _);
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).unwrap();
        // Descriptors a shm listener passes in its HELLO are discarded by
        // the kernel (no control buffer), so none leak into us.
        match socket::recv(self.fd.as_raw_fd(), buf, MsgFlags::empty()) {
            Ok(n) => Some(n),
            Err(Errno::ECONNRESET) => Some(0),
            Err(Errno::EAGAIN) => None,
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Reads the listener's HELLO: proof that our handshake has started.
    fn read_hello(&self) {
        let mut buf = [0u8; 128];
        let want = if self.f == Fabric::Shm {
            64
        } else {
            HEADER_LEN
        };
        let mut got = 0;
        while got < want {
            match self.recv(&mut buf[got..want], Duration::from_secs(20)) {
                Some(0) | None => panic!("no HELLO from the listener ({got} bytes)"),
                Some(n) => got += n,
            }
        }
        if self.f != Fabric::Shm {
            assert_eq!(
                Header::decode(&buf[..HEADER_LEN].try_into().unwrap()),
                Ok(Header::hello())
            );
        }
    }

    /// Whether the listener has closed us, without waiting.
    fn is_closed(&self) -> bool {
        let mut b = [0u8; 1];
        match socket::recv(self.fd.as_raw_fd(), &mut b, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(Errno::ECONNRESET) => true,
            Ok(_) => panic!("unexpected data from the listener"),
            Err(Errno::EAGAIN) => false,
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Waits up to `limit` for the listener to close us (any data it sends
    /// first is dropped); returns when it did, or None.
    fn wait_closed(&self, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 128];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if self.recv(&mut buf, left) == Some(0) {
                return Some(Instant::now());
            }
        }
    }
}

/// The soft HELLO, which tricklers send a byte at a time.
fn hello_bytes() -> [u8; HEADER_LEN] {
    Header::hello().encode()
}

/// Peers that hold a handshake open: on soft they send their HELLO one
/// byte per second; on shm (one message per HELLO, nothing to trickle)
/// they stay silent.
struct Tricklers {
    peers: Vec<Arc<Raw>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Tricklers {
    fn start(f: Fabric, addr: &str, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut peers = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n {
            let p = Arc::new(Raw::connect(f, addr));
            // The listener has started our handshake once it said HELLO.
            p.read_hello();
            if f != Fabric::Shm {
                let (p2, stop2) = (Arc::clone(&p), Arc::clone(&stop));
                threads.push(std::thread::spawn(move || {
                    for b in hello_bytes().iter().take(HEADER_LEN - 1) {
                        if p2.send(std::slice::from_ref(b)).is_err() {
                            return;
                        }
                        for _ in 0..20 {
                            if stop2.load(Ordering::SeqCst) {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }));
            }
            peers.push(p);
        }
        Self {
            peers,
            stop,
            threads,
        }
    }

    fn all_open(&self) -> bool {
        self.peers.iter().all(|p| !p.is_closed())
    }

    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

/// With peers holding their handshakes open, a legitimate client's connect
/// and its accept finish within 100 ms (best of 3, for a loaded machine;
/// before concurrent handshakes it waited for the trickler's 10 s timeout).
fn hostile_peers_do_not_delay_a_legitimate_accept(f: Fabric) {
    let (mut l, addr) = listen(f, "delay", AcceptLimits::default());
    let hostile = Tricklers::start(f, &addr, 4);
    let dom = client(f);
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let c = dom.connect(&addr, EndpointConfig::default()).unwrap();
        let s = l.accept().unwrap();
        times.push(t0.elapsed());
        drop((c, s));
    }
    // The hostile peers were in their handshakes all along.
    assert!(hostile.all_open(), "a hostile peer was cut early");
    let best = times.iter().min().copied().unwrap();
    assert!(
        best < Duration::from_millis(100),
        "{f:?}: connect + accept took {times:?} with hostile peers in their handshakes"
    );
    // Dropping the listener ends their handshakes at once.
    let t0 = Instant::now();
    drop(l);
    for p in &hostile.peers {
        assert!(
            p.wait_closed(Duration::from_secs(5)).is_some(),
            "not closed when the listener was dropped"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    hostile.stop();
}

#[test]
fn tcp_tricklers_do_not_delay_a_legitimate_accept() {
    hostile_peers_do_not_delay_a_legitimate_accept(Fabric::Tcp);
}

#[test]
fn unix_tricklers_do_not_delay_a_legitimate_accept() {
    hostile_peers_do_not_delay_a_legitimate_accept(Fabric::Unix);
}

#[test]
fn shm_silent_peers_do_not_delay_a_legitimate_accept() {
    hostile_peers_do_not_delay_a_legitimate_accept(Fabric::Shm);
}

/// A well-formed first frame that is not a HELLO: a READ request on soft,
/// a CLOSE control message on shm.
fn not_a_hello(f: Fabric) -> Vec<u8> {
    match f {
        Fabric::Tcp | Fabric::Unix => Header::request(Kind::Read, 0, 0x1000, 7, 64)
            .encode()
            .to_vec(),
        Fabric::Shm => {
            let mut m = vec![0u8; 64];
            m[0..4].copy_from_slice(b"VSHM");
            m[4..6].copy_from_slice(&1u16.to_le_bytes());
            m[6..8].copy_from_slice(&4u16.to_le_bytes());
            m
        }
    }
}

/// The listener refuses a peer whose first frame is well-formed but not a
/// HELLO: it closes it at once (well before the 10 s deadline), and
/// accept goes on to the next peer.
fn non_hello_is_refused(f: Fabric) {
    let (mut l, addr) = listen(f, "nonhello", AcceptLimits::default());
    let bad = Raw::connect(f, &addr);
    let t0 = Instant::now();
    bad.send(&not_a_hello(f)).unwrap();
    let closed = bad.wait_closed(Duration::from_secs(8));
    assert!(closed.is_some(), "{f:?}: a non-HELLO peer was not refused");
    assert!(t0.elapsed() < Duration::from_secs(8));
    let dom = client(f);
    let c = dom.connect(&addr, EndpointConfig::default()).unwrap();
    let s = l.accept().unwrap();
    drop((c, s));
}

#[test]
fn tcp_non_hello_is_refused() {
    non_hello_is_refused(Fabric::Tcp);
}

#[test]
fn unix_non_hello_is_refused() {
    non_hello_is_refused(Fabric::Unix);
}

#[test]
fn shm_non_hello_is_refused() {
    non_hello_is_refused(Fabric::Shm);
}

/// A client refuses a listener whose answer is not a HELLO, and says why.
#[test]
fn connect_refuses_a_listener_that_answers_without_hello() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let h = Header::request(Kind::Send, 8, 0, 0, 0).encode();
        std::io::Write::write_all(&mut s, &h).unwrap();
        let mut b = [0u8; HEADER_LEN];
        let _ = std::io::Read::read_exact(&mut s, &mut b);
    });
    let e = match SoftDomain::new().connect(&addr, EndpointConfig::default()) {
        Ok(_) => panic!("connected to a listener that sent no HELLO"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("expected a HELLO frame, got Send"), "{e}");
    fake.join().unwrap();
}

const DEADLINE: Duration = Duration::from_millis(1000);

fn short_deadline() -> AcceptLimits {
    AcceptLimits {
        handshake_deadline: DEADLINE,
        ..AcceptLimits::default()
    }
}

/// A peer that connects and sends nothing is closed at the deadline: not
/// before (it has the whole deadline), and not much after.
fn silent_peer_is_cut_at_the_deadline(f: Fabric) {
    let (_l, addr) = listen(f, "silent", short_deadline());
    let t0 = Instant::now();
    let p = Raw::connect(f, &addr);
    p.read_hello();
    let closed = p
        .wait_closed(DEADLINE + Duration::from_secs(10))
        .expect("a silent peer was never cut off");
    let took = closed - t0;
    assert!(took >= DEADLINE, "{f:?}: cut after {took:?}");
    assert!(
        took < DEADLINE + Duration::from_secs(4),
        "{f:?}: cut after {took:?}"
    );
}

#[test]
fn tcp_silent_peer_is_cut_at_the_deadline() {
    silent_peer_is_cut_at_the_deadline(Fabric::Tcp);
}

#[test]
fn unix_silent_peer_is_cut_at_the_deadline() {
    silent_peer_is_cut_at_the_deadline(Fabric::Unix);
}

#[test]
fn shm_silent_peer_is_cut_at_the_deadline() {
    silent_peer_is_cut_at_the_deadline(Fabric::Shm);
}

/// A peer that keeps sending a byte every 200 ms (which would renew any
/// per-read timeout) is cut at the deadline all the same.
fn trickler_is_cut_at_the_deadline(f: Fabric) {
    let (_l, addr) = listen(f, "trickle", short_deadline());
    let t0 = Instant::now();
    let p = Arc::new(Raw::connect(f, &addr));
    p.read_hello();
    let p2 = Arc::clone(&p);
    let trickle = std::thread::spawn(move || {
        let mut sent = 0;
        for b in hello_bytes().iter().take(HEADER_LEN - 1) {
            if p2.send(std::slice::from_ref(b)).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        sent
    });
    let closed = p
        .wait_closed(DEADLINE + Duration::from_secs(10))
        .expect("a trickling peer was never cut off");
    let took = closed - t0;
    assert!(took >= DEADLINE, "{f:?}: cut after {took:?}");
    assert!(
        took < DEADLINE + Duration::from_secs(4),
        "{f:?}: cut after {took:?}"
    );
    // It was still trickling when it was cut (23 bytes take 4.6 s).
    assert!(trickle.join().unwrap() < HEADER_LEN - 1);
}

#[test]
fn tcp_trickler_is_cut_at_the_deadline() {
    trickler_is_cut_at_the_deadline(Fabric::Tcp);
}

#[test]
fn unix_trickler_is_cut_at_the_deadline() {
    trickler_is_cut_at_the_deadline(Fabric::Unix);
}

/// Beyond `max_pending` connections in setup, new ones are closed at once
/// (without a HELLO); once the setups end, connections are taken again.
fn connections_beyond_the_cap_are_closed_at_once(f: Fabric) {
    let limits = AcceptLimits {
        max_pending: 2,
        ..AcceptLimits::default()
    };
    let (mut l, addr) = listen(f, "cap", limits);
    let hold: Vec<Raw> = (0..2)
        .map(|_| {
            let p = Raw::connect(f, &addr);
            p.read_hello();
            p
        })
        .collect();
    let over = Raw::connect(f, &addr);
    let t0 = Instant::now();
    let mut b = [0u8; 64];
    // Closed before the listener says anything.
    assert_eq!(over.recv(&mut b, Duration::from_secs(8)), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(8));
    assert!(hold.iter().all(|p| !p.is_closed()));
    // The held peers leave; their handshakes fail, which frees the slots.
    drop(hold);
    let dom = client(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    let c = loop {
        match dom.connect(&addr, EndpointConfig::default()) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{f:?}: no slot came free: {e}"),
        }
    };
    let s = l.accept().unwrap();
    drop((c, s));
}

#[test]
fn tcp_connections_beyond_the_cap_are_closed_at_once() {
    connections_beyond_the_cap_are_closed_at_once(Fabric::Tcp);
}

#[test]
fn shm_connections_beyond_the_cap_are_closed_at_once() {
    connections_beyond_the_cap_are_closed_at_once(Fabric::Shm);
}
