//! Both sides of a queue together: a guest driver, the VM-host side
//! ([`HostQueue`]) and the I/O server's side ([`RequestQueue`]) over an
//! in-memory model of an RC queue pair, driven by a seeded scheduler and a
//! fake clock.
//!
//! The model keeps RC's rules: one direction's operations execute in the
//! order they were posted; a SEND or WRITE_WITH_IMM consumes the peer's
//! next posted receive (it waits while there is none); one-sided
//! operations are checked against the registered region and its rkey.
//! What the scheduler picks next (which direction moves, when the server
//! or the guest runs, when the queue moves or its server dies, how the
//! clock advances) comes from the seed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vm_memory::GuestMemoryBackend;
use vrio_rdma::{Completion, Opcode, RecvRequest, RemoteRegion, SendRequest, WcOpcode, WcStatus};

use crate::proto::agent::{
    Action, AgentError, AgentStats, HostQueue, HostQueueConfig, LinkState, QueueTarget,
};
use crate::proto::config::RemoteQueueConfig;
use crate::proto::queue_error::RemoteQueueError;
use crate::proto::server::RequestQueue;
use crate::proto::stats::RemoteStats;
use crate::proto::wire::{Attach, Message, NotifyMode, WireRegion, ANY_SIDECORE};
use crate::virtio::device::{DeviceModel, RequestError};
use crate::virtio::memory::{anonymous_memory, GuestMemory, LocalMemory, MemoryMap};
use crate::virtio::ring::{DescriptorChain, DriverQueue, RingFeatures, RingLayout, Segment};

const SIZE: u16 = 16;
const MEM: usize = 0x10000;
const RING: u64 = 0x1000;
/// Request buffers: 16 bytes per head, the readable tag then the writable
/// answer.
const BUF: u64 = 0x8000;
const RKEY: u32 = 7;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A device that answers each request with the 4-byte tag it carries, so
/// the guest can check that its own request was served.
struct Echo;

impl DeviceModel for Echo {
    fn process<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        let (Some(r), Some(w)) = (chain.readable.first(), chain.writable.first()) else {
            return Ok(0);
        };
        let mut tag = [0u8; 4];
        mem.read(r.addr, &mut tag)?;
        mem.write(w.addr, &tag)?;
        Ok(4)
    }

    /// Requests are 4 bytes: none is too large to stage, so this only
    /// marks the status byte, in case.
    fn fail_request<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        status: &DescriptorChain,
    ) -> Result<u32, RequestError> {
        if let Some(s) = status.writable.first() {
            mem.write(s.addr, &[0xee])?;
        }
        Ok(1)
    }
}

/// One server's link: the queue's server side and what is in flight
/// between it and the VM host.
struct Link {
    server: RequestQueue<Echo>,
    /// Work requests the server posted, not yet executed.
    to_host: VecDeque<SendRequest>,
    /// Messages the VM host sent, not yet delivered.
    to_server: VecDeque<Vec<u8>>,
    /// Receives the server posted, not yet consumed.
    recvs: VecDeque<RecvRequest>,
    /// Completions the server has not polled yet.
    cq: Vec<Completion>,
}

/// What the scheduler can do next.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Execute the server's next work request.
    ToHost,
    /// Deliver the VM host's next message.
    ToServer,
    /// The server's sidecore visits the queue.
    Serve,
    /// The guest posts requests and kicks.
    Post,
    /// The guest takes what completed.
    Reap,
    /// The queue moves to another server.
    Move,
    /// The server dies.
    Kill,
    /// Time passes.
    Tick,
}

struct Pair {
    rng: SmallRng,
    mem: LocalMemory,
    host_base: u64,
    layout: RingLayout,
    driver: DriverQueue,
    hq: HostQueue,
    link: Option<Link>,
    cfg: RemoteQueueConfig,
    mode: NotifyMode,
    stats: Arc<RemoteStats>,
    now: Instant,
    next_server: u32,
    /// Per head: the tag in flight and whether the request is malformed.
    inflight: Vec<Option<(u32, bool)>>,
    next_tag: u32,
    posted: u64,
    completed: u64,
    /// Malformed requests completed (with length 0, as they must be).
    refused: u64,
    /// One-sided operations outside the registered region.
    violations: u64,
    moves: u64,
    kills: u64,
}

impl Pair {
    fn new(seed: u64, mode: NotifyMode, cfg: RemoteQueueConfig) -> Self {
        let mem = anonymous_memory(MEM).unwrap();
        let host_base = mem.iter().next().unwrap().as_ptr() as u64;
        let (layout, _) = RingLayout::packed(SIZE, RING).unwrap();
        let features = RingFeatures::default();
        let driver = DriverQueue::new(layout, features, None);
        driver.init(&mem).unwrap();
        let map = MemoryMap::of(&mem).unwrap();
        let now = Instant::now();
        let host_cfg = HostQueueConfig {
            mode,
            chain_copy: 8,
            timeout: TIMEOUT,
        };
        let stats = Arc::new(AgentStats::default());
        let mut hq =
            HostQueue::new(0, layout, features, &map, 0, target(0), host_cfg, stats).unwrap();
        hq.start(&mem);
        let mut p = Self {
            rng: SmallRng::seed_from_u64(seed),
            mem,
            host_base,
            layout,
            driver,
            hq,
            link: None,
            cfg,
            mode,
            stats: Arc::new(RemoteStats::default()),
            now,
            next_server: 1,
            inflight: vec![None; usize::from(SIZE)],
            next_tag: 1,
            posted: 0,
            completed: 0,
            refused: 0,
            violations: 0,
            moves: 0,
            kills: 0,
        };
        p.link = Some(p.open_link(0));
        p
    }

    /// A fresh server side for the queue, resuming at `start`.
    fn open_link(&mut self, start: u16) -> Link {
        let attach = Attach {
            device_id: 1,
            queue: 0,
            layout: self.layout,
            features: RingFeatures::default(),
            mode: self.mode,
            start,
            sidecore: ANY_SIDECORE,
            regions: vec![WireRegion {
                gpa: 0,
                remote: RemoteRegion {
                    addr: self.host_base,
                    len: MEM as u64,
                    rkey: RKEY,
                },
            }],
        };
        let mut server =
            RequestQueue::new(&attach, Echo, self.cfg, self.stats.clone(), self.now).unwrap();
        server.ring().start(1, 2);
        let mut link = Link {
            server,
            to_host: VecDeque::new(),
            to_server: VecDeque::new(),
            recvs: VecDeque::new(),
            cq: Vec::new(),
        };
        Self::collect(&mut link);
        link
    }

    /// Moves the server's outbox onto the wire.
    fn collect(link: &mut Link) {
        let ring = link.server.ring();
        let (sends, recvs) = ring.outbox();
        link.to_host.extend(sends.iter().cloned());
        link.recvs.extend(recvs.iter().cloned());
        ring.clear_outbox();
    }

    /// The guest address behind a remote address, if the operation stays
    /// inside the registered region under its rkey.
    fn remote(&mut self, addr: u64, rkey: u32, len: u32) -> Option<u64> {
        let off = addr.checked_sub(self.host_base)?;
        let ok = rkey == RKEY && off.checked_add(u64::from(len))? <= MEM as u64;
        if !ok {
            self.violations += 1;
        }
        ok.then_some(off)
    }

    /// Executes the server's next work request.
    fn deliver_to_host(&mut self) {
        let Some(wr) = self.link.as_mut().and_then(|l| l.to_host.pop_front()) else {
            return;
        };
        let len = wr.local.len as usize;
        // The staging buffer is the server's own memory (an mmap it owns),
        // addressed by the local sge's address.
        let local = wr.local.addr as *mut u8;
        let mut buf = vec![0u8; len];
        let mut to_agent = None;
        let opcode = match wr.opcode {
            Opcode::Read { remote_addr, rkey } => {
                if let Some(gpa) = self.remote(remote_addr, rkey, wr.local.len) {
                    self.mem.read(gpa, &mut buf).unwrap();
                    // SAFETY: `local..local+len` lies in the server's
                    // staging buffer (the ring built the sge from it), which
                    // lives as long as the link; nothing else references it
                    // during the copy.
                    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), local, len) };
                }
                WcOpcode::Read
            }
            Opcode::Write { remote_addr, rkey }
            | Opcode::WriteWithImm {
                remote_addr, rkey, ..
            } => {
                // SAFETY: as above, reading the staging buffer.
                unsafe { std::ptr::copy_nonoverlapping(local, buf.as_mut_ptr(), len) };
                if let Some(gpa) = self.remote(remote_addr, rkey, wr.local.len) {
                    self.mem.write(gpa, &buf).unwrap();
                }
                if let Opcode::WriteWithImm { imm, .. } = wr.opcode {
                    to_agent = Some(Err(imm as u16));
                }
                WcOpcode::Write
            }
            Opcode::Send => {
                // SAFETY: as above, reading the staging buffer.
                unsafe { std::ptr::copy_nonoverlapping(local, buf.as_mut_ptr(), len) };
                to_agent = Some(Ok(Message::decode(&buf).unwrap()));
                WcOpcode::Send
            }
        };
        if let Some(link) = self.link.as_mut().filter(|_| wr.signaled) {
            link.cq.push(Completion {
                wr_id: wr.wr_id,
                status: WcStatus::Success,
                opcode,
                byte_len: wr.local.len,
                imm: None,
            });
        }
        match to_agent {
            Some(Ok(m)) => self.hq.on_message(&self.mem, m, self.now),
            Some(Err(idx)) => self.hq.on_used(&self.mem, idx, self.now),
            None => {}
        }
        self.act();
    }

    /// Delivers the VM host's next message into the server's next receive.
    fn deliver_to_server(&mut self) {
        let Some(link) = &mut self.link else { return };
        if link.to_server.is_empty() || link.recvs.is_empty() {
            // RC: the sender waits for a receive (RNR retries).
            return;
        }
        let (Some(m), Some(r)) = (link.to_server.pop_front(), link.recvs.pop_front()) else {
            return;
        };
        assert!(m.len() <= r.local.len as usize);
        // SAFETY: the receive buffer is the server's own memory (its
        // ring's receive area), `r.local.len` long, alive with the link.
        unsafe { std::ptr::copy_nonoverlapping(m.as_ptr(), r.local.addr as *mut u8, m.len()) };
        link.cq.push(Completion {
            wr_id: r.wr_id,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: m.len() as u32,
            imm: None,
        });
    }

    /// The server's sidecore visits the queue, as `remote::RemoteQueue`
    /// does: completions in, serve, outbox out. A failed queue is dropped,
    /// which the VM host sees as a lost link.
    fn serve(&mut self) {
        let Some(link) = &mut self.link else { return };
        let ring = link.server.ring();
        ring.set_now(self.now);
        let cq = std::mem::take(&mut link.cq);
        let r = ring
            .on_completions(&cq)
            .and_then(|_| link.server.serve(usize::from(SIZE)));
        Self::collect(link);
        match r {
            Ok(_) => {}
            // Handed back: the VM host already closes this link.
            Err(RemoteQueueError::HandedBack { .. }) => {}
            Err(e) => {
                self.link = None;
                self.hq.on_link_error(
                    AgentError::Completion {
                        status: WcStatus::RetryExceeded,
                        wr_id: 0,
                    },
                    self.now,
                );
                let _ = e;
                self.act();
            }
        }
    }

    /// Carries out the VM host's actions, as `remote::agent` does.
    fn act(&mut self) {
        while let Some(a) = self.hq.poll_action() {
            match a {
                Action::Send(m) => {
                    let mut b = Vec::new();
                    m.encode(&mut b).unwrap();
                    match &mut self.link {
                        Some(l) => l.to_server.push_back(b),
                        None => self.hq.on_link_error(AgentError::NoServer, self.now),
                    }
                }
                // Closing the link fences the old server out.
                Action::CloseLink => self.link = None,
                Action::Attach { start, .. } => {
                    self.link = Some(self.open_link(start));
                    self.hq.attached(&self.mem, self.now);
                }
                Action::Interrupt | Action::MoveDone(_) => {}
            }
        }
    }

    /// The guest posts a few requests (now and then a malformed one) and
    /// kicks.
    fn post(&mut self, n: usize, hostile: bool) {
        let mut added = 0;
        for _ in 0..n {
            // A good request takes two descriptors.
            if self.driver.num_free() < 2 {
                break;
            }
            let bad = hostile && self.rng.gen_range(0..8) == 0;
            let tag = self.next_tag;
            self.next_tag += 1;
            // Which buffer: the head the driver will hand out is unknown
            // until it does, so write after adding (before publishing).
            let head = if bad {
                let seg = Segment {
                    addr: MEM as u64 + 0x1000,
                    len: 4,
                };
                self.driver.add(&self.mem, &[seg], &[], false).unwrap()
            } else {
                let placeholder = Segment { addr: BUF, len: 4 };
                let head = self
                    .driver
                    .add(&self.mem, &[placeholder], &[placeholder], false)
                    .unwrap();
                // Point the chain at this head's own buffers.
                let r = BUF + 16 * u64::from(head);
                self.rewrite_chain(head, r, r + 8);
                self.mem.write(r, &tag.to_le_bytes()).unwrap();
                self.mem.write(r + 8, &[0xff; 4]).unwrap();
                head
            };
            self.inflight[usize::from(head)] = Some((tag, bad));
            self.posted += 1;
            added += 1;
        }
        if added > 0 {
            self.driver.publish(&self.mem).unwrap();
            if self.hq.is_linked() {
                self.hq.on_kick(&self.mem, self.now);
            }
            self.act();
        }
    }

    /// Rewrites the two descriptors of `head`'s chain to the given buffers.
    fn rewrite_chain(&mut self, head: u16, readable: u64, writable: u64) {
        let d0 = self.layout.desc_addr(head);
        let mut b = [0u8; 16];
        self.mem.read(d0, &mut b).unwrap();
        b[0..8].copy_from_slice(&readable.to_le_bytes());
        self.mem.write(d0, &b).unwrap();
        let next = u16::from_le_bytes([b[14], b[15]]);
        let d1 = self.layout.desc_addr(next);
        self.mem.read(d1, &mut b).unwrap();
        b[0..8].copy_from_slice(&writable.to_le_bytes());
        self.mem.write(d1, &b).unwrap();
    }

    /// The guest takes what completed and checks each answer.
    fn reap(&mut self) {
        while let Some((head, len)) = self.driver.pop_used(&self.mem).unwrap() {
            let (tag, bad) = self.inflight[usize::from(head)]
                .take()
                .expect("a completion for a head the guest has in flight");
            if bad {
                assert_eq!(len, 0, "a malformed request completes empty");
                self.refused += 1;
            } else {
                assert_eq!(len, 4);
                let mut got = [0u8; 4];
                let w = BUF + 16 * u64::from(head) + 8;
                self.mem.read(w, &mut got).unwrap();
                assert_eq!(
                    u32::from_le_bytes(got),
                    tag,
                    "head {head} got another answer"
                );
            }
            self.completed += 1;
        }
    }

    fn move_queue(&mut self) {
        let to = target(self.next_server);
        self.next_server += 1;
        self.hq.on_move(to, self.now);
        self.moves += 1;
        self.act();
    }

    fn kill(&mut self) {
        if self.link.take().is_some() {
            self.kills += 1;
            self.hq.on_link_error(
                AgentError::Completion {
                    status: WcStatus::RetryExceeded,
                    wr_id: 0,
                },
                self.now,
            );
            self.act();
        }
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
        self.hq.on_timer(self.now);
        self.act();
    }

    fn pick(&mut self, churn: bool) -> Step {
        let r = self.rng.gen_range(0..100);
        match r {
            0..=24 => Step::ToHost,
            25..=39 => Step::ToServer,
            40..=64 => Step::Serve,
            65..=79 => Step::Post,
            80..=91 => Step::Reap,
            92..=94 if churn => Step::Move,
            95 if churn => Step::Kill,
            _ => Step::Tick,
        }
    }

    fn step(&mut self, churn: bool, hostile: bool, posting: bool) {
        match self.pick(churn) {
            Step::ToHost => self.deliver_to_host(),
            Step::ToServer => self.deliver_to_server(),
            Step::Serve => self.serve(),
            Step::Post if !posting => self.reap(),
            Step::Post => {
                let n = self.rng.gen_range(1..6);
                self.post(n, hostile);
            }
            Step::Reap => self.reap(),
            Step::Move => self.move_queue(),
            Step::Kill => self.kill(),
            Step::Tick => {
                // Mostly a millisecond; now and then past every timeout.
                let big = churn && self.rng.gen_range(0..50) == 0;
                self.tick(if big {
                    TIMEOUT * 2
                } else {
                    Duration::from_millis(1)
                });
            }
        }
    }

    /// Runs `steps` random steps, then lets everything finish: no more
    /// moves or deaths, a placement if the queue has none, and service
    /// until every request the guest posted came back.
    fn run(&mut self, steps: usize, churn: bool, hostile: bool) {
        for _ in 0..steps {
            self.step(churn, hostile, true);
        }
        for _ in 0..20_000 {
            if self.completed == self.posted && self.hq.status().state == LinkState::Serving {
                break;
            }
            if self.hq.status().state == LinkState::Orphaned {
                self.move_queue();
            }
            self.step(false, false, false);
        }
        self.reap();
        assert_eq!(self.violations, 0, "the server stayed inside guest memory");
        assert_eq!(
            self.completed,
            self.posted,
            "every request came back (state {:?})",
            self.hq.status().state
        );
        assert!(self.inflight.iter().all(|s| s.is_none()));
    }

    /// The server visits the queue `n` times with the wire drained in
    /// between and the guest quiet.
    fn settle(&mut self, n: usize) {
        for _ in 0..n {
            self.serve();
            while self.link.as_ref().is_some_and(|l| !l.to_host.is_empty()) {
                self.deliver_to_host();
            }
            while self
                .link
                .as_ref()
                .is_some_and(|l| !l.to_server.is_empty() && !l.recvs.is_empty())
            {
                self.deliver_to_server();
            }
            self.tick(Duration::from_millis(1));
        }
    }

    /// A trace of what happened, to compare runs.
    fn trace(&self) -> (u64, u64, u64, u64, u64, u16) {
        (
            self.posted,
            self.completed,
            self.refused,
            self.moves,
            self.kills,
            self.hq.status().used,
        )
    }
}

fn target(n: u32) -> QueueTarget {
    QueueTarget::any(&format!("server{n}"))
}

fn small_queue() -> RemoteQueueConfig {
    RemoteQueueConfig {
        max_request: 4096,
        max_batch: 8,
        // Adaptive switches often: two busy batches to poll, four empty
        // polls back to doorbells.
        busy_batch: 2,
        busy_polls: 2,
        idle_polls: 4,
        op_timeout: TIMEOUT,
        ..RemoteQueueConfig::default()
    }
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let run = |seed| {
        let mut p = Pair::new(seed, NotifyMode::Adaptive, small_queue());
        p.run(3000, true, true);
        p.trace()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8), "different seeds interleave differently");
}

#[test]
fn a_send_queue_smaller_than_a_wave_still_serves_everything() {
    let cfg = RemoteQueueConfig {
        send_depth: 2,
        ..small_queue()
    };
    let mut p = Pair::new(1, NotifyMode::Doorbell, cfg);
    p.run(4000, false, false);
    assert!(p.completed > 100, "{}", p.completed);
}

#[test]
fn adaptive_switches_both_ways_and_loses_nothing() {
    let mut p = Pair::new(2, NotifyMode::Adaptive, small_queue());
    p.run(6000, false, false);
    // Busy: the server switched to polling at some point.
    assert!(p.stats.snapshot().mode_switches >= 1);
    // Quiet: empty polls hand discovery back to doorbells.
    p.settle(16);
    let s = p.stats.snapshot();
    assert!(s.mode_switches >= 2, "{} mode switches", s.mode_switches);
    assert!(s.mode_switches % 2 == 0, "ends on doorbells");
    // Requests posted now go by doorbell again and complete.
    let before = p.completed;
    p.post(4, false);
    p.settle(8);
    p.reap();
    assert_eq!(p.completed, before + 4);
}

#[test]
fn a_hostile_guests_bad_chains_complete_empty_and_the_queue_goes_on() {
    let mut p = Pair::new(3, NotifyMode::Doorbell, small_queue());
    p.run(4000, false, true);
    assert!(p.refused > 0);
    assert!(p.completed > p.refused);
    assert_eq!(p.kills, 0);
}

#[test]
fn a_server_that_times_out_is_replaced_and_its_requests_re_served() {
    let mut p = Pair::new(4, NotifyMode::Doorbell, small_queue());
    p.post(5, false);
    // The server takes the requests in and posts its READ wave, which
    // never completes: time passes beyond the server's timeout.
    p.deliver_to_server();
    p.serve();
    p.tick(TIMEOUT * 2);
    p.serve();
    assert_eq!(
        p.hq.status().state,
        LinkState::Orphaned,
        "the server gave up"
    );
    p.run(0, false, false);
    assert_eq!(p.completed, 5);
    assert_eq!(p.hq.status().failovers, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random interleavings of both sides, with moves every so often,
    /// servers dying, timeouts, adaptive switching and a hostile guest:
    /// every request completes exactly once, with its own answer.
    #[test]
    fn every_request_completes_exactly_once(seed in any::<u64>(), adaptive in any::<bool>()) {
        let mode = if adaptive { NotifyMode::Adaptive } else { NotifyMode::Doorbell };
        let mut p = Pair::new(seed, mode, small_queue());
        p.run(2000, true, true);
    }

    /// The same in remote-poll mode, where the server reads the avail ring.
    #[test]
    fn remote_polling_completes_exactly_once(seed in any::<u64>()) {
        let mut p = Pair::new(seed, NotifyMode::RemotePoll, small_queue());
        p.run(2000, true, false);
    }
}
