//! Dropping a soft or shm listener stops all of its threads (the acceptor
//! and every handshake in progress) and closes all of its descriptors.
//!
//! One test in a binary of its own: it counts the process's threads and
//! descriptors, which other tests running alongside would change.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, MsgFlags};
use vrio_rdma::shm::ShmDomain;
use vrio_rdma::soft::SoftDomain;
use vrio_rdma::{Domain, EndpointConfig, Listener};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn threads() -> usize {
    count("/proc/self/task")
}

fn fds() -> usize {
    count("/proc/self/fd")
}

/// Waits (up to 5 s) for the thread count to drop to `want`: a joined
/// thread may linger in /proc for a moment after its join returns.
fn settle(want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = threads();
        if n <= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn raw_peer(addr: &str, shm: bool) -> OwnedFd {
    let path = addr.strip_prefix("unix:");
    let fd = match (path, shm) {
        (None, _) => OwnedFd::from(std::net::TcpStream::connect(addr).unwrap()),
        (Some(p), false) => OwnedFd::from(std::os::unix::net::UnixStream::connect(p).unwrap()),
        (Some(p), true) => {
            let s = socket::socket(
                socket::AddressFamily::Unix,
                socket::SockType::SeqPacket,
                socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .unwrap();
            socket::connect(s.as_raw_fd(), &socket::UnixAddr::new(p).unwrap()).unwrap();
            s
        }
    };
    // Wait for the listener's HELLO: its handshake thread is running.
    let mut b = [0u8; 64];
    let n = socket::recv(fd.as_raw_fd(), &mut b, MsgFlags::empty()).unwrap();
    assert!(n > 0, "no HELLO from {addr}");
    fd
}

/// Runs one listener through a legitimate connection and two silent peers
/// still in their handshakes, drops it, and checks that every thread and
/// descriptor it had is gone.
fn check(tag: &str, dom: &dyn Domain, addr: &str, shm: bool) {
    let (t0, f0) = (threads(), fds());
    let mut l: Box<dyn Listener> = dom.listen(addr, EndpointConfig::default()).unwrap();
    let addr = l.local_addr();
    let c = dom.connect(&addr, EndpointConfig::default()).unwrap();
    let s = l.accept().unwrap();
    drop((c, s));
    let silent = [raw_peer(&addr, shm), raw_peer(&addr, shm)];
    // The acceptor and the two handshakes are running.
    assert!(
        threads() >= t0 + 3,
        "{tag}: {} threads, {t0} before",
        threads()
    );
    drop(l);
    let after = settle(t0);
    drop(silent);
    assert_eq!(after, t0, "{tag}: threads left behind by the listener");
    assert_eq!(fds(), f0, "{tag}: descriptors left behind");
}

#[test]
fn dropping_a_listener_stops_its_threads_and_closes_its_descriptors() {
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let soft = SoftDomain::new();
    check("soft tcp", &soft, "127.0.0.1:0", false);
    let p = dir.join(format!("vrio-threads-soft-{pid}.sock"));
    let _ = std::fs::remove_file(&p);
    check("soft unix", &soft, &format!("unix:{}", p.display()), false);
    assert!(!p.exists(), "socket file left behind");
    let shm = ShmDomain::new();
    let p = dir.join(format!("vrio-threads-shm-{pid}.sock"));
    let _ = std::fs::remove_file(&p);
    check("shm", &shm, &format!("unix:{}", p.display()), true);
    assert!(!p.exists(), "socket file left behind");
}
