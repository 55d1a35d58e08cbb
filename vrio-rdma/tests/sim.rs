//! The simulated fabric (`vrio_rdma::sim`): the conformance checks that
//! make sense in one thread, the fault injection, and determinism.

use std::time::Duration;

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use vrio_rdma::conformance::memory::{pattern_vec, MemfdMemory};
use vrio_rdma::sim::{SimDomain, SimEndpoint, SimEvent, SimNet, SimOp};
use vrio_rdma::{
    Access, Completion, Domain, Endpoint, EndpointConfig, FabricError, MemoryRegion, Opcode,
    RecvRequest, SendRequest, Sge, WcOpcode, WcStatus,
};

const MEM: usize = 1 << 16;

/// Registered memory of one side. Field order is drop order: the region
/// before its memory.
struct Mem {
    mr: Box<dyn MemoryRegion>,
    mem: MemfdMemory,
}

impl Mem {
    fn new(d: &SimDomain, len: usize, access: Access) -> Self {
        let mem = MemfdMemory::new("vrio-sim-test", len).unwrap();
        // SAFETY: `mem` outlives `mr` (field order).
        let mr = unsafe { d.register(mem.ptr(), len, access) }.unwrap();
        Self { mr, mem }
    }

    fn sge(&self, off: usize, len: usize) -> Sge {
        Sge {
            lkey: self.mr.lkey(),
            addr: self.mr.addr() + off as u64,
            len: len as u32,
        }
    }

    fn at(&self, off: usize) -> u64 {
        self.mr.addr() + off as u64
    }
}

/// Two hosts, each with one guest-RAM-like region, and a connected pair.
/// Field order is drop order: endpoints, then regions, then domains.
struct Pair {
    a: SimEndpoint,
    b: SimEndpoint,
    ma: Mem,
    mb: Mem,
    da: SimDomain,
    db: SimDomain,
    net: SimNet,
}

fn pair_with(cfg_a: EndpointConfig, cfg_b: EndpointConfig) -> Pair {
    let net = SimNet::new();
    let (da, db) = (net.domain().unwrap(), net.domain().unwrap());
    let ma = Mem::new(&da, MEM, Access::GUEST_RAM);
    let mb = Mem::new(&db, MEM, Access::GUEST_RAM);
    let (a, b) = net.pair(&da, &db, cfg_a, cfg_b).unwrap();
    Pair {
        a,
        b,
        ma,
        mb,
        da,
        db,
        net,
    }
}

fn pair() -> Pair {
    pair_with(EndpointConfig::default(), EndpointConfig::default())
}

fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

fn wr(wr_id: u64, opcode: Opcode, local: Sge) -> SendRequest {
    SendRequest {
        wr_id,
        opcode,
        local,
        signaled: true,
    }
}

fn write(wr_id: u64, local: Sge, remote_addr: u64, rkey: u32) -> SendRequest {
    wr(wr_id, Opcode::Write { remote_addr, rkey }, local)
}

fn read(wr_id: u64, local: Sge, remote_addr: u64, rkey: u32) -> SendRequest {
    wr(wr_id, Opcode::Read { remote_addr, rkey }, local)
}

fn send(wr_id: u64, local: Sge) -> SendRequest {
    wr(wr_id, Opcode::Send, local)
}

fn recv(wr_id: u64, local: Sge) -> RecvRequest {
    RecvRequest { wr_id, local }
}

fn drain(ep: &mut dyn Endpoint) -> Vec<Completion> {
    let mut out = Vec::new();
    let mut buf = [Completion::EMPTY; 16];
    loop {
        let n = ep.poll(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn statuses(cs: &[Completion]) -> Vec<(u64, WcStatus)> {
    cs.iter().map(|c| (c.wr_id, c.status)).collect()
}

#[test]
fn one_sided_data_lands() {
    let mut p = pair();
    let sizes = [1usize, 7, 64, 4096];
    let mut wrs = Vec::new();
    let (mut src, mut dst) = (3usize, 20_003usize);
    for (i, &n) in sizes.iter().enumerate() {
        p.mb.mem.write(src, &pattern_vec(i as u64, 0, n));
        wrs.push(write(
            i as u64,
            p.mb.sge(src, n),
            p.ma.at(dst),
            p.ma.mr.rkey(),
        ));
        // Read it back into another place, behind the WRITE (RC order).
        let back = src + 40_000;
        wrs.push(read(
            100 + i as u64,
            p.mb.sge(back, n),
            p.ma.at(dst),
            p.ma.mr.rkey(),
        ));
        src += n + 5;
        dst += n + 9;
    }
    // A zero-length WRITE skips the rkey check, as in verbs.
    wrs.push(write(999, p.mb.sge(0, 0), 0, 0xdead));
    p.b.post_send(&wrs).unwrap();
    assert_eq!(p.net.run(&mut rng(1), 10_000), 2 * wrs.len());
    let cs = drain(&mut p.b);
    let want: Vec<u64> = wrs.iter().map(|w| w.wr_id).collect();
    assert_eq!(cs.iter().map(|c| c.wr_id).collect::<Vec<_>>(), want);
    assert!(cs.iter().all(|c| c.status == WcStatus::Success), "{cs:?}");
    assert_eq!(cs[0].byte_len, 1);
    assert_eq!(cs[1].opcode, WcOpcode::Read);
    let (mut src, mut dst) = (3usize, 20_003usize);
    for (i, &n) in sizes.iter().enumerate() {
        let want = pattern_vec(i as u64, 0, n);
        assert_eq!(p.ma.mem.to_vec(dst, n), want, "WRITE {i}");
        assert_eq!(p.mb.mem.to_vec(src + 40_000, n), want, "READ {i}");
        src += n + 5;
        dst += n + 9;
    }
    let st = p.net.stats();
    assert_eq!((st.writes, st.reads, st.faults), (5, 4, 0));
    assert_eq!(st.retired, 9);
    assert!(drain(&mut p.a).is_empty());
}

#[test]
fn write_with_imm_data_is_in_place_before_the_immediate() {
    for seed in 0..20 {
        let mut p = pair();
        p.a.post_recv(&[recv(7, p.ma.sge(0, 0))]).unwrap();
        p.mb.mem.write(0, b"first");
        p.mb.mem.write(100, b"second");
        let mut w = write(1, p.mb.sge(0, 5), p.ma.at(1000), p.ma.mr.rkey());
        w.signaled = false;
        let imm = wr(
            2,
            Opcode::WriteWithImm {
                remote_addr: p.ma.at(2000),
                rkey: p.ma.mr.rkey(),
                imm: 42,
            },
            p.mb.sge(100, 6),
        );
        p.b.post_send(&[w, imm]).unwrap();
        let mut r = rng(seed);
        let mut seen = None;
        while p.net.step(&mut r) {
            let cs = drain(&mut p.a);
            if let Some(c) = cs.first() {
                // Both WRITEs' data are there when the immediate shows.
                assert_eq!(p.ma.mem.to_vec(1000, 5), b"first");
                assert_eq!(p.ma.mem.to_vec(2000, 6), b"second");
                seen = Some(*c);
            }
        }
        let c = seen.expect("the receive completed");
        assert_eq!(
            (c.wr_id, c.status, c.opcode, c.byte_len, c.imm),
            (7, WcStatus::Success, WcOpcode::RecvWithImm, 6, Some(42))
        );
        // Only the signalled WRITE_WITH_IMM completes at the sender.
        let cs = drain(&mut p.b);
        assert_eq!(statuses(&cs), vec![(2, WcStatus::Success)]);
        assert_eq!(cs[0].opcode, WcOpcode::Write);
        assert_eq!(p.net.stats().write_imms, 1);
    }
}

#[test]
fn sends_consume_receives_in_order() {
    let mut p = pair();
    let recvs: Vec<RecvRequest> = (0..4)
        .map(|i| recv(10 + i, p.ma.sge(i as usize * 64, 64)))
        .collect();
    p.a.post_recv(&recvs).unwrap();
    let msgs: [&[u8]; 4] = [b"one", b"", b"three!", &[9u8; 64]];
    let mut off = 0;
    let mut wrs = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        p.mb.mem.write(off, m);
        wrs.push(send(i as u64, p.mb.sge(off, m.len())));
        off += 100;
    }
    p.b.post_send(&wrs).unwrap();
    p.net.run(&mut rng(3), 1000);
    let cs = drain(&mut p.a);
    assert_eq!(cs.len(), 4);
    for (i, (c, m)) in cs.iter().zip(msgs).enumerate() {
        assert_eq!(
            (c.wr_id, c.status, c.opcode),
            (10 + i as u64, WcStatus::Success, WcOpcode::Recv)
        );
        assert_eq!(c.byte_len as usize, m.len());
        assert_eq!(p.ma.mem.to_vec(i * 64, m.len()), m);
    }
    let cs = drain(&mut p.b);
    assert_eq!(
        statuses(&cs),
        (0..4).map(|i| (i, WcStatus::Success)).collect::<Vec<_>>()
    );
    assert_eq!(p.net.stats().sends, 4);
}

/// Posts `[good READ, bad, good READ, good READ]` on b with two receives
/// posted at a, runs, and checks RC's error state on both sides.
/// `make_bad` may return memory to keep registered for the run.
fn remote_fault(name: &str, make_bad: impl Fn(&Pair) -> (SendRequest, Option<Mem>)) {
    let mut p = pair();
    p.a.post_recv(&[recv(50, p.ma.sge(0, 64)), recv(51, p.ma.sge(64, 64))])
        .unwrap();
    let good = |id| read(id, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.rkey());
    let (bad, _keep) = make_bad(&p);
    p.b.post_send(&[good(1), bad, good(3), good(4)]).unwrap();
    p.net.run(&mut rng(5), 1000);
    assert!(p.net.is_idle());
    let cs = drain(&mut p.b);
    assert_eq!(
        statuses(&cs),
        vec![
            (1, WcStatus::Success),
            (2, WcStatus::RemoteAccessError),
            (3, WcStatus::Flushed),
            (4, WcStatus::Flushed)
        ],
        "{name}"
    );
    // The responder entered the error state: its receives flushed.
    assert_eq!(
        statuses(&drain(&mut p.a)),
        vec![(50, WcStatus::Flushed), (51, WcStatus::Flushed)],
        "{name}"
    );
    // Later posts on either side complete Flushed; nothing moves.
    p.b.post_send(&[good(5)]).unwrap();
    p.a.post_recv(&[recv(52, p.ma.sge(0, 8))]).unwrap();
    assert!(p.net.is_idle(), "{name}");
    assert_eq!(statuses(&drain(&mut p.b)), vec![(5, WcStatus::Flushed)]);
    assert_eq!(statuses(&drain(&mut p.a)), vec![(52, WcStatus::Flushed)]);
    assert!(matches!(
        p.b.wait(Duration::from_secs(9)),
        Err(FabricError::EndpointDead)
    ));
    assert_eq!(p.net.stats().faults, 1, "{name}");
}

#[test]
fn bad_rkey_breaks_the_connection() {
    remote_fault("bad rkey", |p| {
        (
            read(2, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.rkey() ^ 0x40),
            None,
        )
    });
}

#[test]
fn lkey_is_not_an_rkey() {
    remote_fault("lkey as rkey", |p| {
        (read(2, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.lkey()), None)
    });
}

#[test]
fn another_domains_rkey_is_refused() {
    // The same memory registered in b's domain: its rkey means nothing at a.
    remote_fault("foreign rkey", |p| {
        (write(2, p.mb.sge(0, 8), p.mb.at(0), p.mb.mr.rkey()), None)
    });
}

#[test]
fn out_of_bounds_is_refused() {
    remote_fault("out of bounds", |p| {
        (
            write(2, p.mb.sge(0, 8), p.ma.at(MEM - 4), p.ma.mr.rkey()),
            None,
        )
    });
    remote_fault("wrapping", |p| {
        (write(2, p.mb.sge(0, 8), u64::MAX - 3, p.ma.mr.rkey()), None)
    });
}

#[test]
fn missing_remote_access_is_refused() {
    // WRITE into a region without remote_write.
    remote_fault("write read-only", |p| {
        let ro = Mem::new(&p.da, 4096, Access::REMOTE_READ_ONLY);
        (write(2, p.mb.sge(0, 8), ro.at(0), ro.mr.rkey()), Some(ro))
    });
    // READ from a region without remote_read.
    remote_fault("read local-only", |p| {
        let lo = Mem::new(&p.da, 4096, Access::LOCAL_ONLY);
        (read(2, p.mb.sge(0, 8), lo.at(0), lo.mr.rkey()), Some(lo))
    });
}

#[test]
fn deregistered_region_is_refused() {
    remote_fault("deregistered", |p| {
        let gone = Mem::new(&p.da, 4096, Access::GUEST_RAM);
        let (addr, rkey) = (gone.at(0), gone.mr.rkey());
        drop(gone);
        (write(2, p.mb.sge(0, 8), addr, rkey), None)
    });
}

#[test]
fn local_faults_fail_the_request_and_the_peer_notices() {
    type Case = fn(&Pair) -> (SendRequest, Option<Mem>);
    let cases: [(&str, Case); 3] = [
        ("bad lkey", |p| {
            let mut s = p.mb.sge(0, 8);
            s.lkey ^= 0x40;
            (write(2, s, p.ma.at(0), p.ma.mr.rkey()), None)
        }),
        ("local range", |p| {
            (
                write(2, p.mb.sge(MEM - 4, 8), p.ma.at(0), p.ma.mr.rkey()),
                None,
            )
        }),
        ("READ into a region without local_write", |p| {
            let ro = Mem::new(
                &p.db,
                4096,
                Access {
                    local_write: false,
                    remote_read: true,
                    remote_write: false,
                },
            );
            (read(2, ro.sge(0, 8), p.ma.at(0), p.ma.mr.rkey()), Some(ro))
        }),
    ];
    for (name, bad) in cases {
        let mut p = pair();
        // a is slow: its own WRITE stays pending until b has failed.
        p.net.pause(p.a.id()).unwrap();
        p.a.post_send(&[write(70, p.ma.sge(0, 8), p.mb.at(0), p.mb.mr.rkey())])
            .unwrap();
        p.a.post_recv(&[recv(71, p.ma.sge(0, 8))]).unwrap();
        let ok = write(1, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.rkey());
        let ok3 = write(3, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.rkey());
        let (bad, _keep) = bad(&p);
        p.b.post_send(&[ok, bad, ok3]).unwrap();
        p.net.run(&mut rng(9), 1000);
        assert_eq!(
            statuses(&drain(&mut p.b)),
            vec![
                (1, WcStatus::Success),
                (2, WcStatus::LocalProtectionError),
                (3, WcStatus::Flushed)
            ],
            "{name}"
        );
        assert!(drain(&mut p.a).is_empty(), "{name}: a is paused");
        p.net.resume(p.a.id()).unwrap();
        p.net.run(&mut rng(9), 1000);
        // As soft: a sees the connection close.
        assert_eq!(
            statuses(&drain(&mut p.a)),
            vec![(70, WcStatus::RetryExceeded), (71, WcStatus::Flushed)],
            "{name}"
        );
        assert!(p.net.trace().contains(&SimEvent::PeerLost { ep: p.a.id() }));
    }
}

#[test]
fn send_larger_than_the_receive_or_into_a_bad_receive() {
    for (name, short) in [("too large", true), ("bad receive sge", false)] {
        let mut p = pair();
        let mut first = p.ma.sge(0, 16);
        if !short {
            first.len = 100;
            first.lkey ^= 0x40;
        }
        p.a.post_recv(&[recv(20, first), recv(21, p.ma.sge(1000, 100))])
            .unwrap();
        p.b.post_send(&[send(1, p.mb.sge(0, 32))]).unwrap();
        p.net.run(&mut rng(11), 1000);
        assert_eq!(
            statuses(&drain(&mut p.b)),
            vec![(1, WcStatus::RemoteOperationError)],
            "{name}"
        );
        let want = if short {
            WcStatus::Other(1)
        } else {
            WcStatus::LocalProtectionError
        };
        assert_eq!(
            statuses(&drain(&mut p.a)),
            vec![(20, want), (21, WcStatus::Flushed)],
            "{name}"
        );
    }
}

#[test]
fn rnr_retries_then_fails() {
    let mut p = pair();
    p.net.set_rnr_retries(3);
    p.b.post_send(&[send(1, p.mb.sge(0, 8)), send(2, p.mb.sge(0, 8))])
        .unwrap();
    p.net.run(&mut rng(13), 1000);
    assert_eq!(
        statuses(&drain(&mut p.b)),
        vec![(1, WcStatus::RnrRetryExceeded), (2, WcStatus::Flushed)]
    );
    assert_eq!(p.net.stats().rnr_naks, 3);
    // The responder is in the error state too.
    p.a.post_recv(&[recv(9, p.ma.sge(0, 8))]).unwrap();
    assert_eq!(statuses(&drain(&mut p.a)), vec![(9, WcStatus::Flushed)]);
}

#[test]
fn a_receive_posted_during_rnr_retries_is_used() {
    let mut p = pair();
    p.net.set_rnr_retries(1000);
    let imm = Opcode::WriteWithImm {
        remote_addr: p.ma.at(0),
        rkey: p.ma.mr.rkey(),
        imm: 5,
    };
    p.b.post_send(&[wr(1, imm, p.mb.sge(0, 8))]).unwrap();
    let mut r = rng(17);
    assert_eq!(p.net.run(&mut r, 10), 10);
    assert!(p
        .net
        .trace()
        .iter()
        .all(|e| matches!(e, SimEvent::RnrNak { wr_id: 1, .. })));
    p.a.post_recv(&[recv(30, p.ma.sge(0, 0))]).unwrap();
    p.net.run(&mut r, 1000);
    assert!(p.net.is_idle());
    assert_eq!(statuses(&drain(&mut p.b)), vec![(1, WcStatus::Success)]);
    let cs = drain(&mut p.a);
    assert_eq!((cs[0].wr_id, cs[0].imm), (30, Some(5)));
}

#[test]
fn full_queues_refuse_the_whole_batch() {
    let cfg = EndpointConfig {
        send_depth: 4,
        recv_depth: 2,
        ..EndpointConfig::default()
    };
    let mut p = pair_with(cfg, cfg);
    let w = |id, signaled| SendRequest {
        signaled,
        ..write(id, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.rkey())
    };
    p.b.post_send(&[w(1, true), w(2, false), w(3, true)])
        .unwrap();
    assert!(matches!(
        p.b.post_send(&[w(4, true), w(5, true)]),
        Err(FabricError::QueueFull(4))
    ));
    p.b.post_send(&[w(6, true)]).unwrap();
    assert!(matches!(
        p.b.post_send(&[w(7, true)]),
        Err(FabricError::QueueFull(4))
    ));
    // Executed but not retired still holds the slot: the first step can
    // only execute w1.
    assert!(p.net.step(&mut rng(19)));
    assert_eq!(p.net.stats().writes, 1);
    assert!(matches!(
        p.b.post_send(&[w(8, true)]),
        Err(FabricError::QueueFull(4))
    ));
    p.net.run(&mut rng(19), 1000);
    assert_eq!(
        statuses(&drain(&mut p.b)),
        vec![
            (1, WcStatus::Success),
            (3, WcStatus::Success),
            (6, WcStatus::Success)
        ]
    );
    p.b.post_send(&[w(9, true), w(10, true), w(11, true), w(12, true)])
        .unwrap();
    assert!(matches!(
        p.a.post_recv(&[recv(1, p.ma.sge(0, 8)); 3]),
        Err(FabricError::QueueFull(2))
    ));
    p.a.post_recv(&[recv(1, p.ma.sge(0, 8)); 2]).unwrap();
    // A request over the message limit is misuse, as in soft.
    let mut huge = w(13, true);
    huge.local.len = u32::MAX;
    assert!(matches!(
        p.a.post_send(&[huge]),
        Err(FabricError::InvalidRequest(_))
    ));
}

#[test]
fn disconnect_flushes_both_sides() {
    let mut p = pair();
    p.a.post_recv(&[recv(100, p.ma.sge(0, 8)), recv(101, p.ma.sge(8, 8))])
        .unwrap();
    p.b.post_recv(&[recv(200, p.mb.sge(0, 8))]).unwrap();
    let wa: Vec<SendRequest> = (0..6)
        .map(|i| write(i, p.ma.sge(0, 8), p.mb.at(64), p.mb.mr.rkey()))
        .collect();
    let wb: Vec<SendRequest> = (10..16)
        .map(|i| read(i, p.mb.sge(128, 8), p.ma.at(64), p.ma.mr.rkey()))
        .collect();
    p.a.post_send(&wa).unwrap();
    p.b.post_send(&wb).unwrap();
    p.net.run(&mut rng(23), 7);
    p.net.disconnect(p.b.id()).unwrap();
    assert!(p.net.is_idle());
    for (ep, posted, recvs) in [
        (&mut p.a, 0..6u64, vec![100u64, 101]),
        (&mut p.b, 10..16, vec![200]),
    ] {
        let cs = drain(&mut *ep);
        let sends: Vec<&Completion> = cs.iter().filter(|c| c.opcode != WcOpcode::Recv).collect();
        // Every request completes exactly once, in order.
        assert_eq!(
            sends.iter().map(|c| c.wr_id).collect::<Vec<_>>(),
            posted.collect::<Vec<_>>()
        );
        let first_err = sends.iter().position(|c| !c.status.is_ok()).unwrap();
        assert_eq!(sends[first_err].status, WcStatus::RetryExceeded);
        assert!(sends[first_err + 1..]
            .iter()
            .all(|c| c.status == WcStatus::Flushed));
        let rs: Vec<(u64, WcStatus)> = cs
            .iter()
            .filter(|c| c.opcode == WcOpcode::Recv)
            .map(|c| (c.wr_id, c.status))
            .collect();
        assert_eq!(
            rs,
            recvs
                .iter()
                .map(|&r| (r, WcStatus::Flushed))
                .collect::<Vec<_>>()
        );
        ep.post_send(&[read(
            99,
            Sge {
                lkey: 0,
                addr: 0,
                len: 0,
            },
            0,
            0,
        )])
        .unwrap();
        assert_eq!(statuses(&drain(&mut *ep)), vec![(99, WcStatus::Flushed)]);
        assert!(matches!(
            ep.wait(Duration::ZERO),
            Err(FabricError::EndpointDead)
        ));
    }
    assert!(p
        .net
        .trace()
        .contains(&SimEvent::Disconnect { ep: p.b.id() }));
    assert_eq!(p.net.stats().disconnects, 1);
}

#[test]
fn a_dropped_peer_is_noticed_at_a_step() {
    let Pair {
        a,
        mut b,
        ma,
        mb,
        net,
        ..
    } = pair();
    b.post_send(&[write(1, mb.sge(0, 8), ma.at(0), ma.mr.rkey())])
        .unwrap();
    let a_id = a.id();
    drop(a);
    assert!(drain(&mut b).is_empty(), "nothing happens before a step");
    assert_eq!(net.run(&mut rng(29), 100), 1);
    assert_eq!(statuses(&drain(&mut b)), vec![(1, WcStatus::RetryExceeded)]);
    assert_eq!(net.trace(), vec![SimEvent::PeerLost { ep: b.id() }]);
    assert!(net.disconnect(a_id).is_err(), "a is gone");
}

#[test]
fn pause_holds_one_side_only() {
    let mut p = pair();
    p.net.pause(p.b.id()).unwrap();
    p.b.post_send(&[write(1, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.rkey())])
        .unwrap();
    p.a.post_send(&[write(2, p.ma.sge(0, 8), p.mb.at(0), p.mb.mr.rkey())])
        .unwrap();
    // a's WRITE into the paused b still runs: b's NIC serves it.
    assert_eq!(p.net.run(&mut rng(31), 100), 2);
    assert!(p.net.is_idle());
    assert_eq!(statuses(&drain(&mut p.a)), vec![(2, WcStatus::Success)]);
    assert!(drain(&mut p.b).is_empty());
    p.net.resume(p.b.id()).unwrap();
    assert_eq!(p.net.run(&mut rng(31), 100), 2);
    assert_eq!(statuses(&drain(&mut p.b)), vec![(1, WcStatus::Success)]);
}

#[test]
fn notify_fd_fires_when_completions_arrive_after_arm() {
    let mut p = pair();
    let readable = |fd| {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    };
    let fd = p.b.notify_fd();
    p.b.arm().unwrap();
    assert!(!readable(fd));
    p.b.post_send(&[write(1, p.mb.sge(0, 8), p.ma.at(0), p.ma.mr.rkey())])
        .unwrap();
    assert!(p.net.step(&mut rng(0)));
    assert!(!readable(fd), "executed, not retired");
    assert!(p.net.step(&mut rng(0)));
    assert!(readable(fd));
    assert_eq!(drain(&mut p.b).len(), 1);
    p.b.arm().unwrap();
    assert!(!readable(fd));
    // The wait never blocks.
    p.b.wait(Duration::from_secs(3600)).unwrap();
}

#[test]
fn listen_and_connect_by_name() {
    let net = SimNet::new();
    let (da, db) = (net.domain().unwrap(), net.domain().unwrap());
    let cfg = EndpointConfig::default();
    let mut l = db.listen("server", cfg).unwrap();
    assert_eq!(l.local_addr(), "server");
    assert!(db.listen("server", cfg).is_err(), "in use");
    assert!(da.connect("nobody", cfg).is_err());
    assert!(l.accept().is_err(), "never blocks");
    let mut a = da.connect("server", cfg).unwrap();
    let mut b = l.accept().unwrap();
    let ma = Mem::new(&da, 4096, Access::GUEST_RAM);
    let mb = Mem::new(&db, 4096, Access::GUEST_RAM);
    b.post_recv(&[recv(1, mb.sge(0, 16))]).unwrap();
    ma.mem.write(0, b"hello");
    a.post_send(&[send(2, ma.sge(0, 5))]).unwrap();
    net.run(&mut rng(37), 100);
    assert_eq!(statuses(&drain(b.as_mut())), vec![(1, WcStatus::Success)]);
    assert_eq!(mb.mem.to_vec(0, 5), b"hello");
    assert!(a.peer().starts_with("sim ep"));
    // Connections never accepted are closed with the listener.
    let mut c = da.connect("server", cfg).unwrap();
    drop(l);
    c.post_send(&[send(3, ma.sge(0, 5))]).unwrap();
    net.run(&mut rng(37), 100);
    assert_eq!(
        statuses(&drain(c.as_mut())),
        vec![(3, WcStatus::RetryExceeded)]
    );
}

#[test]
fn domains_of_another_network_are_refused() {
    let (n1, n2) = (SimNet::new(), SimNet::new());
    let (d1, d2) = (n1.domain().unwrap(), n2.domain().unwrap());
    let cfg = EndpointConfig::default();
    assert!(matches!(
        n1.pair(&d1, &d2, cfg, cfg),
        Err(FabricError::InvalidRequest(_))
    ));
}

/// Concurrent traffic on both sides: WRITEs, READs and SENDs each way.
fn busy_run(seed: u64) -> (Vec<SimEvent>, Vec<Completion>, Vec<Completion>) {
    let mut p = pair();
    let ra: Vec<RecvRequest> = (0..5)
        .map(|i| recv(500 + i, p.ma.sge(4096 + i as usize * 64, 64)))
        .collect();
    let rb: Vec<RecvRequest> = (0..5)
        .map(|i| recv(600 + i, p.mb.sge(4096 + i as usize * 64, 64)))
        .collect();
    p.a.post_recv(&ra).unwrap();
    p.b.post_recv(&rb).unwrap();
    let mut wa = Vec::new();
    let mut wb = Vec::new();
    for i in 0..20u64 {
        let off = (i as usize % 8) * 8;
        wa.push(write(i, p.ma.sge(off, 8), p.mb.at(off), p.mb.mr.rkey()));
        wb.push(read(
            100 + i,
            p.mb.sge(2048 + off, 8),
            p.ma.at(off),
            p.ma.mr.rkey(),
        ));
        if i % 4 == 0 {
            wa.push(send(200 + i, p.ma.sge(0, 16)));
            wb.push(send(300 + i, p.mb.sge(0, 16)));
        }
    }
    p.a.post_send(&wa).unwrap();
    p.b.post_send(&wb).unwrap();
    p.net.run(&mut rng(seed), 100_000);
    assert!(p.net.is_idle());
    (p.net.trace(), drain(&mut p.a), drain(&mut p.b))
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let one = busy_run(42);
    assert_eq!(one, busy_run(42));
    assert!(one.1.iter().chain(&one.2).all(|c| c.status.is_ok()));
    // 50 requests and 10 receives complete in all.
    assert_eq!(one.1.len() + one.2.len(), 60);
    let other = busy_run(43);
    assert_ne!(one.0, other.0, "different seeds interleave differently");
    // Yet each side's requests completed in post order both times.
    let order = |cs: &[Completion]| -> Vec<u64> {
        cs.iter()
            .filter(|c| c.opcode != WcOpcode::Recv)
            .map(|c| c.wr_id)
            .collect()
    };
    assert_eq!(order(&one.1), order(&other.1));
    assert_eq!(order(&one.2), order(&other.2));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// RC order under any interleaving: a READ posted after unsignalled
    /// WRITEs to one place sees the last of them, while the peer hammers
    /// the same endpoint pair with its own WRITEs; completions come in
    /// post order and only the signalled ones.
    #[test]
    fn rc_order_holds_under_random_interleavings(seed: u64, n in 1usize..40, m in 0usize..40) {
        let mut p = pair();
        let mut wrs = Vec::new();
        for i in 0..n {
            p.mb.mem.write(8 * i, &(i as u64).to_le_bytes());
            let mut w = write(i as u64, p.mb.sge(8 * i, 8), p.ma.at(0), p.ma.mr.rkey());
            w.signaled = false;
            wrs.push(w);
        }
        wrs.push(read(1000, p.mb.sge(4000, 8), p.ma.at(0), p.ma.mr.rkey()));
        let theirs: Vec<SendRequest> = (0..m)
            .map(|i| write(2000 + i as u64, p.ma.sge(100, 8), p.mb.at(8000 + 8 * i), p.mb.mr.rkey()))
            .collect();
        p.a.post_send(&theirs).unwrap();
        p.b.post_send(&wrs).unwrap();
        let steps = p.net.run(&mut rng(seed), 100_000);
        prop_assert_eq!(steps, 2 * (n + 1 + m));
        prop_assert_eq!(statuses(&drain(&mut p.b)), vec![(1000, WcStatus::Success)]);
        prop_assert_eq!(p.mb.mem.to_vec(4000, 8), ((n - 1) as u64).to_le_bytes().to_vec());
        let got: Vec<u64> = drain(&mut p.a).iter().map(|c| c.wr_id).collect();
        prop_assert_eq!(got, (0..m as u64).map(|i| 2000 + i).collect::<Vec<_>>());
        let execs = p.net.trace().iter().filter(|e| matches!(e, SimEvent::Execute { op: SimOp::Write, .. })).count();
        prop_assert_eq!(execs, n + m);
    }
}
