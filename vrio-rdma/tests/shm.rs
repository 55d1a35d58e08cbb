//! What the `shm` back-end adds to the conformance suite: peers that die,
//! peers that scribble over the shared channels, and fencing on close.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::BorrowedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use vrio_rdma::conformance::{self, memory::MemfdMemory, InitiatorOptions};
use vrio_rdma::shm::ShmDomain;
use vrio_rdma::shm::ShmEndpoint;
use vrio_rdma::{
    Access, Completion, Domain, Endpoint, EndpointConfig, FabricError, MemoryRegion, Opcode,
    RecvRequest, SendRequest, Sge,
};

const BIN: &str = env!("CARGO_BIN_EXE_vrio-fabric-conformance");

fn sock_path(tag: &str) -> String {
    let p = std::env::temp_dir().join(format!("vrio-shm-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    format!("unix:{}", p.display())
}

/// Starts a conformance target in another process; returns it and its address.
fn spawn_target(tag: &str) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args([
            "--backend",
            "shm",
            "--role",
            "target",
            "--addr",
            &sock_path(tag),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    (child, addr)
}

/// Waits until `ep` reports its peer gone: `wait` fails, or an error
/// completion arrives. Returns how long that took.
fn time_to_failure(ep: &mut dyn Endpoint, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut done = [Completion::EMPTY; 64];
    while t0.elapsed() < limit {
        if ep.wait(Duration::from_millis(10)).is_err() {
            return Some(t0.elapsed());
        }
        let n = ep.poll(&mut done).unwrap();
        if done[..n].iter().any(|c| !c.status.is_ok()) {
            return Some(t0.elapsed());
        }
    }
    None
}

/// A pair of endpoints in this process, with local buffers for receives.
struct Pair {
    a: ShmEndpoint,
    b: Option<Box<dyn Endpoint>>,
    // Field order is drop order: regions before memory.
    b_mr: Box<dyn MemoryRegion>,
    a_mr: Box<dyn MemoryRegion>,
    b_mem: MemfdMemory,
    a_mem: MemfdMemory,
    _d: (ShmDomain, ShmDomain),
}

/// Bytes of each side's memory; only the middle is registered, the rest is
/// a canary that nothing may touch.
const MEM: usize = 64 << 10;
const REG_OFF: usize = 16 << 10;
const REG_LEN: usize = 32 << 10;

fn pair(tag: &str) -> Pair {
    let (da, db) = (ShmDomain::new(), ShmDomain::new());
    let a_mem = MemfdMemory::new("a", MEM).unwrap();
    let b_mem = MemfdMemory::new("b", MEM).unwrap();
    a_mem.write(0, &vec![0xA5; MEM]);
    b_mem.write(0, &vec![0x5A; MEM]);
    // SAFETY: the memories outlive the regions (field order of Pair) and
    // map their memfds from offset 0.
    let a_mr = unsafe {
        da.register_fd(
            a_mem.ptr().add(REG_OFF),
            REG_LEN,
            Access::GUEST_RAM,
            a_mem.fd(),
            REG_OFF as u64,
        )
    }
    .unwrap();
    // SAFETY: as above.
    let b_mr = unsafe {
        db.register_fd(
            b_mem.ptr().add(REG_OFF),
            REG_LEN,
            Access::GUEST_RAM,
            b_mem.fd(),
            REG_OFF as u64,
        )
    }
    .unwrap();
    let cfg = EndpointConfig::default();
    let mut l = db.listen(&sock_path(tag), cfg).unwrap();
    let addr = l.local_addr();
    let t = std::thread::spawn(move || l.accept());
    let a = da.connect_shm(&addr, cfg).unwrap();
    let b = Some(t.join().unwrap().unwrap());
    Pair {
        a,
        b,
        b_mr,
        a_mr,
        b_mem,
        a_mem,
        _d: (da, db),
    }
}

impl Pair {
    fn b(&mut self) -> &mut dyn Endpoint {
        self.b.as_deref_mut().expect("b is open")
    }

    fn b_recvs(&mut self, n: usize) {
        let wrs: Vec<RecvRequest> = (0..n)
            .map(|i| RecvRequest {
                wr_id: i as u64,
                local: Sge {
                    lkey: self.b_mr.lkey(),
                    addr: self.b_mr.addr() + (i * 512) as u64,
                    len: 512,
                },
            })
            .collect();
        self.b().post_recv(&wrs).unwrap();
    }

    fn a_write(&self, wr_id: u64, off: u64, len: u32) -> SendRequest {
        SendRequest {
            wr_id,
            opcode: Opcode::Write {
                remote_addr: self.b_mr.addr() + off,
                rkey: self.b_mr.rkey(),
            },
            local: Sge {
                lkey: self.a_mr.lkey(),
                addr: self.a_mr.addr(),
                len,
            },
            signaled: true,
        }
    }

    /// The canaries around both registrations are intact.
    fn canaries_intact(&self) -> bool {
        let ok = |m: &MemfdMemory, b: u8| {
            m.to_vec(0, REG_OFF).iter().all(|&x| x == b)
                && m.to_vec(REG_OFF + REG_LEN, MEM - REG_OFF - REG_LEN)
                    .iter()
                    .all(|&x| x == b)
        };
        ok(&self.a_mem, 0xA5) && ok(&self.b_mem, 0x5A)
    }
}

fn drain(ep: &mut dyn Endpoint) -> Result<Vec<Completion>, FabricError> {
    let mut out = Vec::new();
    let mut done = [Completion::EMPTY; 64];
    for _ in 0..50 {
        let _ = ep.wait(Duration::from_millis(2));
        let n = ep.poll(&mut done)?;
        out.extend_from_slice(&done[..n]);
    }
    Ok(out)
}

#[test]
fn a_target_process_that_dies_fails_the_endpoint_within_100ms() {
    let (mut child, addr) = spawn_target("die-t");
    let d = ShmDomain::new();
    let mem = MemfdMemory::new("ctl", 4096).unwrap();
    // SAFETY: `mem` outlives the region (dropped at the end of the test).
    let mr = unsafe { d.register(mem.ptr(), 4096, Access::LOCAL_ONLY) }.unwrap();
    let mut ep = d.connect(&addr, EndpointConfig::default()).unwrap();
    ep.post_recv(&[RecvRequest {
        wr_id: 1,
        local: Sge {
            lkey: mr.lkey(),
            addr: mr.addr(),
            len: 64,
        },
    }])
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let took = time_to_failure(ep.as_mut(), Duration::from_secs(5)).expect("endpoint never failed");
    assert!(took < Duration::from_millis(100), "took {took:?}");
    drop(ep);
    drop(mr);
}

#[test]
fn an_initiator_process_that_dies_fails_the_target_endpoint_within_100ms() {
    let d = ShmDomain::new();
    let mut l = d
        .listen(&sock_path("die-i"), EndpointConfig::default())
        .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--backend",
            "shm",
            "--role",
            "hold",
            "--addr",
            &l.local_addr(),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ep = l.accept().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    // The target sleeps on its notify fd, as a VM host's agent does.
    ep.arm().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t0 = Instant::now();
    let mut p = libc::pollfd {
        fd: ep.notify_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(n, 1, "notify fd never fired");
    let took = time_to_failure(ep.as_mut(), Duration::from_secs(5)).map(|t| t + t0.elapsed());
    let took = took.expect("endpoint never failed");
    assert!(took < Duration::from_millis(100), "took {took:?}");
}

#[test]
fn scribbled_channels_fail_the_endpoint_cleanly() {
    for seed in 1..=20u64 {
        let mut p = pair(&format!("scr{seed}"));
        p.b_recvs(8);
        // Normal traffic first.
        p.a.post_send(&[p.a_write(1, 0, 256)]).unwrap();
        assert!(drain(&mut p.a).unwrap().iter().all(|c| c.status.is_ok()));
        p.a.scribble_shared_memory(seed);
        // B must neither panic nor touch memory outside its registration.
        let _ = drain(p.b());
        let send = SendRequest {
            wr_id: 9,
            opcode: Opcode::Send,
            local: Sge {
                lkey: p.b_mr.lkey(),
                addr: p.b_mr.addr() + 4096,
                len: 100,
            },
            signaled: true,
        };
        let _ = p.b().post_send(&[send]);
        let _ = drain(p.b());
        assert!(
            p.canaries_intact(),
            "seed {seed}: memory outside the regions changed"
        );
    }
}

#[test]
fn forged_messages_are_refused_and_never_written_outside_the_receive() {
    for seed in 1..=50u64 {
        let mut p = pair(&format!("forge{seed}"));
        p.b_recvs(8);
        p.a.forge_messages(seed, 1 + seed % 40);
        let got = drain(p.b()).unwrap_or_default();
        // Every receive B completed is either an error or lies inside its
        // buffer (the canaries prove nothing spilled).
        for c in &got {
            assert!(c.byte_len <= 512 || !c.status.is_ok(), "seed {seed}: {c:?}");
        }
        assert!(
            p.canaries_intact(),
            "seed {seed}: memory outside the regions changed"
        );
    }
}

#[test]
fn a_closed_endpoint_fences_its_peer_out() {
    let mut p = pair("close");
    p.a.post_send(&[p.a_write(1, 0, 128)]).unwrap();
    assert!(drain(&mut p.a).unwrap().iter().all(|c| c.status.is_ok()));
    let before = p.b_mem.to_vec(REG_OFF, REG_LEN);
    // B closes: after the drop returns A can no longer write B's memory.
    drop(p.b.take());
    p.a_mem.write(REG_OFF, &[0x77; 128]);
    let _ = p.a.post_send(&[p.a_write(2, 0, 128)]);
    let got = drain(&mut p.a).unwrap_or_default();
    assert!(
        got.iter().all(|c| !c.status.is_ok()),
        "a WRITE after the peer closed succeeded: {got:?}"
    );
    assert_eq!(p.b_mem.to_vec(REG_OFF, REG_LEN), before);
}

#[test]
fn a_target_process_survives_a_scribbling_initiator_and_serves_the_suite_again() {
    let (mut child, addr) = spawn_target("scr-x");
    let d = ShmDomain::new();
    for seed in 1..=10u64 {
        let mut ep = d.connect_shm(&addr, EndpointConfig::default()).unwrap();
        if seed % 2 == 0 {
            ep.scribble_shared_memory(seed);
        } else {
            ep.forge_messages(seed, 1 + seed * 3);
        }
        std::thread::sleep(Duration::from_millis(20));
        drop(ep);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the target process died"
    );
    let mut out = Vec::new();
    let sum = conformance::run_initiator(&d, InitiatorOptions::new(&addr, true), &mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    assert_eq!(sum.failed, 0, "{text}");
    assert_eq!(sum.passed, common::CASES, "{text}");
    // The suite's last case killed the target.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let mut rest = String::new();
    let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut rest));
}

/// Waits up to `ms` on `epoll`; returns how many events it reported.
fn epoll_wait(epoll: &Epoll, ms: u16) -> usize {
    let mut ev = [EpollEvent::empty(); 4];
    epoll.wait(&mut ev, ms).unwrap()
}

/// A VM host's agent watches the notify fd edge-triggered and never reads
/// it (`set_edge_triggered`): every WRITE_WITH_IMM must wake it exactly
/// once, with its completion ready, and a signal already seen must not
/// wake it again.
#[test]
fn an_edge_triggered_watcher_wakes_once_per_signal_and_never_reads_the_fd() {
    let mut p = pair("edge");
    p.b_recvs(8);
    let epfd = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    // SAFETY: the endpoint owns its notify fd and outlives this borrow.
    let notify = unsafe { BorrowedFd::borrow_raw(p.b().notify_fd()) };
    let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLET;
    epfd.add(notify, EpollEvent::new(flags, 7)).unwrap();
    p.b().set_edge_triggered();
    p.b().arm().unwrap();
    // Whatever the fd held at registration is reported once.
    epoll_wait(&epfd, 0);
    let mut done = [Completion::EMPTY; 8];
    for i in 0..20u32 {
        assert_eq!(
            epoll_wait(&epfd, 20),
            0,
            "round {i}: woken with nothing new"
        );
        let mut w = p.a_write(100 + u64::from(i), 0, 64);
        let Opcode::Write { remote_addr, rkey } = w.opcode else {
            unreachable!()
        };
        w.opcode = Opcode::WriteWithImm {
            remote_addr,
            rkey,
            imm: i,
        };
        p.a.post_send(&[w]).unwrap();
        assert_eq!(
            epoll_wait(&epfd, 2000),
            1,
            "round {i}: the signal did not wake"
        );
        // What an agent does at each wake: poll, arm, poll again (for what
        // raced with arming).
        let n = p.b().poll(&mut done).unwrap();
        assert_eq!(n, 1, "round {i}");
        assert_eq!(done[0].imm, Some(i));
        p.b().arm().unwrap();
        assert_eq!(p.b().poll(&mut done[1..]).unwrap(), 0, "round {i}");
        let wr = RecvRequest {
            wr_id: done[0].wr_id,
            local: Sge {
                lkey: p.b_mr.lkey(),
                addr: p.b_mr.addr() + done[0].wr_id * 512,
                len: 512,
            },
        };
        p.b().post_recv(&[wr]).unwrap();
        let n = p.a.poll(&mut done).unwrap();
        assert!(done[..n].iter().all(|c| c.status.is_ok()));
    }
    assert!(p.canaries_intact());
}
