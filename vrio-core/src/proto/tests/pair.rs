//! Both sides of a queue together: a guest driver, the VM-host side
//! ([`HostQueue`]) and the I/O server's side ([`RequestQueue`]) over
//! `vrio_rdma::sim`, an in-memory model of RC queue pairs, driven by a
//! seeded scheduler and a fake clock.
//!
//! The sim keeps RC's rules (per-endpoint order, receives consumed in
//! order, RNR, rkey, range and access checks, error states and flushes).
//! What the scheduler picks next (which fabric step runs, when the server,
//! the agent or the guest runs, when the queue moves or its server dies,
//! how the clock advances) comes from the seed. The test stands in for the
//! runtimes: it posts the server's outbox and the agent's messages, and
//! feeds each side its completions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vm_memory::GuestMemoryBackend;
use vrio_rdma::sim::{SimDomain, SimEndpoint, SimNet};
use vrio_rdma::{
    Access, Completion, Domain, Endpoint, EndpointConfig, MemoryRegion, Opcode, RecvRequest,
    SendRequest, Sge, WcOpcode,
};

use crate::proto::agent::{
    Action, AgentError, AgentStats, HostQueue, HostQueueConfig, LinkState, QueueTarget,
};
use crate::proto::config::RemoteQueueConfig;
use crate::proto::queue_error::RemoteQueueError;
use crate::proto::server::{RequestQueue, SLEEPER_STREAK};
use crate::proto::staging::StagingBuffer;
use crate::proto::stats::RemoteStats;
use crate::proto::wire::{Attach, Message, NotifyMode, WireRegion, ANY_SIDECORE, MAX_MSG};
use crate::virtio::device::{DeviceModel, RequestError};
use crate::virtio::dirty_log::DirtyLog;
use crate::virtio::memory::{anonymous_memory, GuestMemory, LocalMemory, MemoryMap};
use crate::virtio::ring::{DescriptorChain, DriverQueue, RingFeatures, RingLayout, Segment};

const SIZE: u16 = 16;
const MEM: usize = 0x40000;
const RING: u64 = 0x1000;
/// Request buffers: 16 bytes per head, the readable tag then the writable
/// answer.
const BUF: u64 = 0x8000;
/// With [`Pair::spread`]: head h's answer goes to its own page here, so the
/// dirty log shows exactly which answers were marked.
const SPREAD: u64 = 0x20000;
/// The agent's message slots per link, each way.
const SLOTS: usize = 16;
const RECV_TAG: u64 = 1 << 63;
const TIMEOUT: Duration = Duration::from_secs(10);
/// The guest's own bytes after each answer, which the device never writes:
/// the server must leave them alone.
const UNWRITTEN: [u8; 4] = [0xa5; 4];

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

/// One server's link: the queue's server side, the connected pair of
/// endpoints, and the agent's message buffers.
struct Link {
    // Registrations before the buffers they cover (fields drop in order).
    _server_mrs: [Box<dyn MemoryRegion>; 2],
    msg_mr: Box<dyn MemoryRegion>,
    /// None once the server retired (handed back) or failed.
    server: Option<RequestQueue<Echo>>,
    _server_dom: SimDomain,
    sep: SimEndpoint,
    aep: SimEndpoint,
    /// The agent's SEND slots then its receive slots.
    msgs: StagingBuffer,
    free_send: Vec<usize>,
}

impl Link {
    fn msg_sge(&self, slot: usize, len: usize) -> Sge {
        Sge {
            lkey: self.msg_mr.lkey(),
            addr: self.msgs.addr() + (slot * MAX_MSG) as u64,
            len: len as u32,
        }
    }

    fn agent_recv(&self, s: usize) -> RecvRequest {
        RecvRequest {
            wr_id: RECV_TAG | s as u64,
            local: self.msg_sge(SLOTS + s, MAX_MSG),
        }
    }

    /// Posts what the server queued (the server's runtime does this).
    fn flush_server(&mut self) {
        let Some(server) = &mut self.server else {
            return;
        };
        let ring = &mut server.ring;
        let (sends, recvs) = ring.outbox();
        if !sends.is_empty() {
            let _ = self.sep.post_send(sends);
        }
        if !recvs.is_empty() {
            let _ = self.sep.post_recv(recvs);
        }
        ring.clear_outbox();
    }
}

/// What the scheduler can do next.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The fabric moves one step.
    Net,
    /// The agent takes its link's completions.
    AgentPoll,
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
    /// The VMM turns dirty logging on or off.
    Log,
}

struct Pair {
    rng: SmallRng,
    net: SimNet,
    agent_dom: SimDomain,
    // The link and the registration of guest RAM go before the memory.
    link: Option<Link>,
    guest_mr: Box<dyn MemoryRegion>,
    mem: LocalMemory,
    layout: RingLayout,
    driver: DriverQueue,
    hq: HostQueue,
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
    moves: u64,
    kills: u64,
    /// Why the server failed the queue, each time it did: a run without
    /// churn or hostile requests must have none (`run` re-places an
    /// orphaned queue, which would hide a server failing for no reason).
    server_errors: Vec<String>,
    /// The sidecore's advice given to every server queue (adaptive).
    advice: Option<bool>,
    /// Change the advice at random steps.
    advice_churn: bool,
    agent_stats: Arc<AgentStats>,
    /// Answers on a page per head (see [`SPREAD`]).
    spread: bool,
    /// The VMM's dirty log, and whether the scheduler switches it.
    log: Arc<DirtyLog>,
    log_churn: bool,
    /// Logging is asked for.
    logging: bool,
    /// Logging is confirmed: requests from this tag on must be logged.
    log_since: Option<u32>,
    log_switches: u64,
    /// Completions checked against the log.
    logged_checks: u64,
}

impl Pair {
    fn new(seed: u64, mode: NotifyMode, cfg: RemoteQueueConfig) -> Self {
        Self::with_features(seed, mode, cfg, RingFeatures::default())
    }

    fn with_features(
        seed: u64,
        mode: NotifyMode,
        cfg: RemoteQueueConfig,
        features: RingFeatures,
    ) -> Self {
        let mem = anonymous_memory(MEM).unwrap();
        let net = SimNet::new();
        let agent_dom = net.domain().unwrap();
        let host = mem.iter().next().unwrap().as_ptr();
        // SAFETY: `mem` is one anonymous mapping of MEM bytes that the
        // pair owns and drops after this registration (declared later).
        let guest_mr = unsafe { agent_dom.register(host, MEM, Access::GUEST_RAM) }.unwrap();
        let (layout, _) = RingLayout::packed(SIZE, RING).unwrap();
        let driver = DriverQueue::new(layout, features, None);
        driver.init(&mem).unwrap();
        let map = MemoryMap::of(&mem).unwrap();
        let now = Instant::now();
        let host_cfg = HostQueueConfig {
            mode,
            chain_copy: 8,
            inline_max: 4096,
            timeout: TIMEOUT,
            log_data: true,
        };
        let stats = Arc::new(AgentStats::default());
        let mut hq = HostQueue::new(
            0,
            layout,
            features,
            &map,
            0,
            target(0),
            host_cfg,
            stats.clone(),
        )
        .unwrap();
        hq.start(&mem);
        let mut p = Self {
            rng: SmallRng::seed_from_u64(seed),
            net,
            agent_dom,
            link: None,
            guest_mr,
            mem,
            layout,
            driver,
            hq,
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
            moves: 0,
            kills: 0,
            server_errors: Vec::new(),
            advice: None,
            advice_churn: false,
            agent_stats: stats,
            spread: false,
            log: Arc::new(DirtyLog::anonymous(MEM / 4096 / 8).unwrap()),
            log_churn: false,
            logging: false,
            log_since: None,
            log_switches: 0,
            logged_checks: 0,
        };
        p.link = Some(p.open_link(0));
        p
    }

    /// A fresh server side for the queue, resuming at `start`, connected
    /// to the agent by a new pair of endpoints.
    fn open_link(&mut self, start: u16) -> Link {
        let attach = Attach {
            device_id: 1,
            queue: 0,
            layout: self.layout,
            features: self.hq.features(),
            mode: self.mode,
            start,
            sidecore: ANY_SIDECORE,
            logging: self.hq.logging(),
            regions: vec![WireRegion {
                gpa: 0,
                remote: self.guest_mr.remote(),
            }],
        };
        let mut server =
            RequestQueue::new(&attach, Echo, self.cfg, self.stats.clone(), self.now).unwrap();
        server.ring.advice = self.advice;
        let server_dom = self.net.domain().unwrap();
        let [(sp, sl), (rp, rl)] = server.ring.buffers();
        // SAFETY: the ring owns both buffers; the link drops these
        // registrations before the ring (declared earlier).
        let mrs = unsafe {
            [
                server_dom.register(sp, sl, Access::LOCAL_ONLY).unwrap(),
                server_dom.register(rp, rl, Access::LOCAL_ONLY).unwrap(),
            ]
        };
        server.ring.start(mrs[0].lkey(), mrs[1].lkey());
        // The server's send queue is as deep as its config says (a small
        // one makes waves wait for room); the agent's is the default.
        let server_cfg = EndpointConfig {
            send_depth: self.cfg.send_depth as u32,
            ..EndpointConfig::default()
        };
        let (aep, sep) = self
            .net
            .pair(
                &self.agent_dom,
                &server_dom,
                EndpointConfig::default(),
                server_cfg,
            )
            .unwrap();
        let msgs = StagingBuffer::new(2 * SLOTS * MAX_MSG).unwrap();
        // SAFETY: the link owns `msgs` and drops this registration first.
        let msg_mr = unsafe {
            self.agent_dom
                .register(msgs.as_ptr(), msgs.len(), Access::LOCAL_ONLY)
        }
        .unwrap();
        let mut link = Link {
            _server_mrs: mrs,
            msg_mr,
            server: Some(server),
            _server_dom: server_dom,
            sep,
            aep,
            msgs,
            free_send: (0..SLOTS).collect(),
        };
        let recvs: Vec<RecvRequest> = (0..SLOTS).map(|i| link.agent_recv(i)).collect();
        link.aep.post_recv(&recvs).unwrap();
        link.flush_server();
        link
    }

    /// The agent takes its link's completions: used indexes, messages,
    /// freed send slots, or the news that the link failed.
    fn agent_poll(&mut self) {
        let Some(link) = &mut self.link else { return };
        let mut cqes = [Completion::EMPTY; 16];
        let n = link.aep.poll(&mut cqes).unwrap_or(0);
        for c in &cqes[..n] {
            let Some(link) = &mut self.link else { return };
            if !c.status.is_ok() {
                self.hq.on_link_error(
                    AgentError::Completion {
                        status: c.status,
                        wr_id: c.wr_id,
                    },
                    self.now,
                );
                break;
            }
            if c.wr_id & RECV_TAG == 0 {
                link.free_send.push(c.wr_id as usize);
                continue;
            }
            let slot = (c.wr_id & !RECV_TAG) as usize;
            let mut buf = vec![0u8; c.byte_len as usize];
            link.msgs.get((SLOTS + slot) * MAX_MSG, &mut buf).unwrap();
            let wr = link.agent_recv(slot);
            link.aep.post_recv(&[wr]).unwrap();
            match c.opcode {
                WcOpcode::RecvWithImm => self.hq.on_used(&self.mem, c.imm.unwrap_or(0), self.now),
                _ => self
                    .hq
                    .on_message(&self.mem, Message::decode(&buf).unwrap(), self.now),
            }
            if self.hq.link_closing() {
                break;
            }
        }
        self.act();
    }

    /// The server's sidecore visits the queue, as `remote::RemoteQueue`
    /// does: completions in, serve, outbox out. A failed queue is dropped
    /// and its endpoint closed, which the VM host notices.
    fn serve(&mut self) {
        let Some(link) = &mut self.link else { return };
        let Some(server) = &mut link.server else {
            return;
        };
        let mut cqes = [Completion::EMPTY; 64];
        let n = link.sep.poll(&mut cqes).unwrap_or(0);
        let ring = &mut server.ring;
        ring.set_now(self.now);
        let r = ring
            .on_completions(&cqes[..n])
            .and_then(|_| server.serve(usize::from(SIZE)));
        link.flush_server();
        match r {
            Ok(_) => {}
            // Handed back: the queue retires once its answer is out.
            Err(RemoteQueueError::HandedBack { .. }) => link.server = None,
            Err(e) => {
                self.server_errors.push(e.to_string());
                link.server = None;
                let _ = self.net.disconnect(link.sep.id());
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
                    // As the runtime does: later doorbells reuse its buffers.
                    self.hq.recycle(m);
                    let posted = self.link.as_mut().and_then(|l| {
                        let slot = l.free_send.pop()?;
                        l.msgs.put(slot * MAX_MSG, &b).ok()?;
                        let wr = SendRequest {
                            wr_id: slot as u64,
                            opcode: Opcode::Send,
                            local: l.msg_sge(slot, b.len()),
                            signaled: true,
                        };
                        l.aep.post_send(&[wr]).ok()
                    });
                    if posted.is_none() {
                        self.hq.on_link_error(AgentError::SendQueueStuck, self.now);
                    }
                }
                // Closing the link fences the old server out.
                Action::CloseLink => self.link = None,
                Action::Attach { .. } => {
                    let start = self.hq.resume_index(&self.mem);
                    self.link = Some(self.open_link(start));
                    self.hq.attached(&self.mem, self.now);
                }
                Action::LogSwitched => {
                    self.log_switches += 1;
                    if self.logging && self.log_since.is_none() {
                        self.log_since = Some(self.next_tag);
                    }
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
                self.add_echo(tag)
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

    /// Adds one echo request carrying `tag` (not yet published): its own
    /// buffers, with room for 8 bytes of answer of which the device writes
    /// 4. Returns its head.
    fn add_echo(&mut self, tag: u32) -> u16 {
        let placeholder = Segment { addr: BUF, len: 4 };
        let answer = Segment { addr: BUF, len: 8 };
        let head = self
            .driver
            .add(&self.mem, &[placeholder], &[answer], false)
            .unwrap();
        // Point the chain at this head's own buffers.
        let r = BUF + 16 * u64::from(head);
        let w = self.answer(head);
        self.rewrite_chain(head, r, w);
        self.mem.write(r, &tag.to_le_bytes()).unwrap();
        self.mem.write(w, &[0xff; 4]).unwrap();
        self.mem.write(w + 4, &UNWRITTEN).unwrap();
        head
    }

    /// Where `head`'s answer goes.
    fn answer(&self, head: u16) -> u64 {
        if self.spread {
            SPREAD + 0x1000 * u64::from(head)
        } else {
            BUF + 16 * u64::from(head) + 8
        }
    }

    /// The VMM switches logging (on with a clean log, as a migration
    /// starts).
    fn switch_log(&mut self) {
        self.logging = !self.logging;
        self.log_since = None;
        if self.logging {
            self.log.clear();
        }
        let log = self.logging.then(|| self.log.clone());
        self.hq.set_log(log, self.now);
        self.act();
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
                let w = self.answer(head);
                self.mem.read(w, &mut got).unwrap();
                assert_eq!(
                    u32::from_le_bytes(got),
                    tag,
                    "head {head} got another answer"
                );
                let mut rest = [0u8; 4];
                self.mem.read(w + 4, &mut rest).unwrap();
                assert_eq!(
                    rest, UNWRITTEN,
                    "head {head}: the server sent back bytes its device did not write"
                );
                if self.log_since.is_some_and(|t| tag >= t) {
                    // The server wrote the answer, its used element and
                    // used.idx while logging: all marked before the guest
                    // could see them. The VMM copies (clears) the answer's
                    // page; the ring's pages are marked again every batch.
                    if self.spread {
                        assert!(self.log.take(w), "head {head}'s answer page was not logged");
                    } else {
                        assert!(
                            self.log.is_dirty(w),
                            "head {head}'s answer page was not logged"
                        );
                    }
                    assert!(
                        self.log.is_dirty(self.layout.used_idx()),
                        "used.idx not logged"
                    );
                    self.logged_checks += 1;
                }
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

    /// The server dies: its queue is gone and its connection cut; the
    /// agent learns of it from its completions.
    fn kill(&mut self) {
        if let Some(link) = self.link.as_mut().filter(|l| l.server.is_some()) {
            link.server = None;
            let _ = self.net.disconnect(link.sep.id());
            self.kills += 1;
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
            0..=29 => Step::Net,
            30..=39 => Step::AgentPoll,
            40..=64 => Step::Serve,
            65..=79 => Step::Post,
            80..=91 => Step::Reap,
            92..=94 if churn => Step::Move,
            95 if churn => Step::Kill,
            96 if self.log_churn => Step::Log,
            _ => Step::Tick,
        }
    }

    fn step(&mut self, churn: bool, hostile: bool, posting: bool) {
        if self.advice_churn && self.rng.gen_range(0..64) == 0 {
            let a = [None, Some(false), Some(true)][self.rng.gen_range(0..3)];
            self.advise(a);
        }
        match self.pick(churn) {
            Step::Net => {
                let mut rng = SmallRng::seed_from_u64(self.rng.gen());
                self.net.step(&mut rng);
            }
            Step::AgentPoll => self.agent_poll(),
            Step::Serve => self.serve(),
            Step::Post if !posting => self.reap(),
            Step::Post => {
                let n = self.rng.gen_range(1..6);
                self.post(n, hostile);
            }
            Step::Reap => self.reap(),
            Step::Move => self.move_queue(),
            Step::Kill => self.kill(),
            Step::Log => self.switch_log(),
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
        if !churn && !hostile {
            assert!(
                self.server_errors.is_empty(),
                "the server failed the queue: {:?}",
                self.server_errors
            );
        }
        assert_eq!(
            self.net.stats().faults,
            0,
            "the server stayed inside guest memory"
        );
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
            let mut rng = SmallRng::seed_from_u64(self.rng.gen());
            self.net.run(&mut rng, 10_000);
            self.agent_poll();
            self.net.run(&mut rng, 10_000);
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

impl Pair {
    /// Two requests in one kick (the smallest batch whose interrupt may be
    /// asked early), then server visits (the wire drained and the agent
    /// polled after each) until they are back and the agent has decided on
    /// their interrupt (then, if `rearm`, asks for the next one, as a
    /// driver that waits for its completions does). Returns the visits the
    /// interrupt took, if there was one.
    fn one_batch(&mut self, rearm: bool) -> Option<usize> {
        self.batch_of(2, rearm)
    }

    /// A doorbell pair whose ring has EVENT_IDX, its driver armed for
    /// the first completion.
    fn armed_event_idx(seed: u64) -> Self {
        let features = RingFeatures {
            event_idx: true,
            ..RingFeatures::default()
        };
        let mut p = Self::with_features(
            seed,
            NotifyMode::Doorbell,
            RemoteQueueConfig::default(),
            features,
        );
        assert!(!p.driver.enable_interrupts(&p.mem).unwrap());
        p
    }

    /// [`Pair::one_batch`] with `n` requests.
    fn batch_of(&mut self, n: usize, rearm: bool) -> Option<usize> {
        let raised = self
            .agent_stats
            .interrupts
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut rng = SmallRng::seed_from_u64(7);
        self.post(n, false);
        let mut got = None;
        for visit in 1..=4 {
            self.net.run(&mut rng, 10_000);
            self.serve();
            self.net.run(&mut rng, 10_000);
            self.agent_poll();
            if got.is_none()
                && self
                    .agent_stats
                    .interrupts
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > raised
            {
                got = Some(visit);
            }
        }
        self.reap();
        assert_eq!(self.completed, self.posted);
        if rearm {
            assert!(!self.driver.enable_interrupts(&self.mem).unwrap());
        }
        got
    }
}

#[test]
fn the_interrupt_rides_the_reply_wave_when_the_guest_waits_for_it() {
    // A guest that waits for every completion wants every interrupt. The
    // first batch learns that from the READ of its suppression word (a
    // second visit of the server, a round trip later); from then on the
    // server asks for the interrupt right behind used.idx, in the wave
    // that carries the reply: one visit.
    let mut p = Pair::new(1, NotifyMode::Doorbell, RemoteQueueConfig::default());
    assert_eq!(
        p.one_batch(false),
        Some(2),
        "first batch: decided on the READ"
    );
    for _ in 0..3 {
        assert_eq!(
            p.one_batch(false),
            Some(1),
            "the interrupt came with the reply"
        );
    }
    // The guest turns interrupts off (as a polling driver does): the early
    // request, made on the old word, reaches the agent, which reads the
    // word itself after used.idx and raises nothing.
    let asked = p.stats.snapshot().interrupts;
    p.mem
        .store_u16(
            p.layout.avail_flags(),
            crate::virtio::ring::layout::VRING_AVAIL_F_NO_INTERRUPT,
        )
        .unwrap();
    assert_eq!(
        p.one_batch(false),
        None,
        "a suppressed guest is not interrupted"
    );
    assert_eq!(p.stats.snapshot().interrupts, asked + 1);
    // The server read the new word with that batch: it asks no more.
    assert_eq!(p.one_batch(false), None);
    assert_eq!(p.stats.snapshot().interrupts, asked + 1);
    // Interrupts on again: the next batch decides on the READ, the one
    // after rides the reply again.
    p.mem.store_u16(p.layout.avail_flags(), 0).unwrap();
    assert_eq!(p.one_batch(false), Some(2));
    assert_eq!(p.one_batch(false), Some(1));
    // A batch of one (a guest with one request out, which often finds it
    // before it sleeps) waits for the READ: no early request, until
    // SLEEPER_STREAK of them in a row found the guest already waiting.
    for _ in 0..SLEEPER_STREAK {
        assert_eq!(p.batch_of(1, false), Some(2));
    }
    for _ in 0..3 {
        assert_eq!(
            p.batch_of(1, false),
            Some(1),
            "a sleeping guest's single rides the reply"
        );
    }
    // A guest that stops waiting (it suppresses) ends the streak: the
    // early request it got is dropped by the agent, and the next batches
    // of one wait for the READ again.
    p.mem
        .store_u16(
            p.layout.avail_flags(),
            crate::virtio::ring::layout::VRING_AVAIL_F_NO_INTERRUPT,
        )
        .unwrap();
    assert_eq!(p.batch_of(1, false), None);
    p.mem.store_u16(p.layout.avail_flags(), 0).unwrap();
    assert_eq!(p.batch_of(1, false), Some(2));
    assert_eq!(p.batch_of(1, false), Some(2));
}

#[test]
fn without_early_interrupts_every_interrupt_waits_for_the_read() {
    let cfg = RemoteQueueConfig {
        early_interrupts: false,
        ..RemoteQueueConfig::default()
    };
    let mut p = Pair::new(3, NotifyMode::Doorbell, cfg);
    for _ in 0..4 {
        assert_eq!(p.one_batch(false), Some(2));
    }
}

#[test]
fn with_event_idx_the_interrupt_rides_the_reply_wave_too() {
    // With EVENT_IDX the word is used_event, which a waiting driver moves
    // to the last entry it saw: the server predicts it at the same
    // distance from each batch.
    let mut p = Pair::armed_event_idx(2);
    assert_eq!(
        p.one_batch(true),
        Some(2),
        "first batch: decided on the READ"
    );
    for _ in 0..3 {
        assert_eq!(
            p.one_batch(true),
            Some(1),
            "the interrupt came with the reply"
        );
    }
    // The driver stops moving used_event: the entry it armed for still
    // interrupts; the next does not, though the server asked early (the
    // agent reads used_event itself); then the server stops asking.
    assert_eq!(p.one_batch(false), Some(1));
    let asked = p.stats.snapshot().interrupts;
    assert_eq!(p.one_batch(false), None, "past used_event: no interrupt");
    assert_eq!(p.stats.snapshot().interrupts, asked + 1);
    assert_eq!(p.one_batch(false), None);
    assert_eq!(p.stats.snapshot().interrupts, asked + 1);
}

#[test]
fn with_event_idx_a_guest_that_sleeps_on_each_request_gets_it_with_the_reply() {
    // Linux's virtio-blk at QD 1: one request out, used_event moved to
    // the next entry before it sleeps. Once the READs showed it waiting
    // SLEEPER_STREAK times in a row, its interrupt rides the reply.
    let mut p = Pair::armed_event_idx(5);
    for _ in 0..SLEEPER_STREAK {
        assert_eq!(p.batch_of(1, true), Some(2), "decided on the READ");
    }
    for _ in 0..4 {
        assert_eq!(p.batch_of(1, true), Some(1), "came with the reply");
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

impl Pair {
    /// The sidecore advises remote polls (`Some(true)`) or doorbells.
    fn advise(&mut self, advice: Option<bool>) {
        self.advice = advice;
        if let Some(q) = self.link.as_mut().and_then(|l| l.server.as_mut()) {
            q.ring.advice = advice;
        }
    }
}

#[test]
fn adaptive_follows_the_sidecores_advice_and_loses_nothing() {
    // The queue's own heuristic would never poll: only the advice does.
    let cfg = RemoteQueueConfig {
        busy_batch: usize::MAX,
        ..small_queue()
    };
    let mut p = Pair::new(11, NotifyMode::Adaptive, cfg);
    p.run(2000, false, false);
    assert_eq!(p.stats.snapshot().mode_switches, 0);
    p.advise(Some(true));
    p.run(4000, false, false);
    let s = p.stats.snapshot();
    assert!(s.mode_switches >= 1 && s.remote_polls > 0, "{s:?}");
    // Advised back to doorbells: the queue switches at its next poll and
    // polls no more.
    p.advise(Some(false));
    p.run(2000, false, false);
    let s = p.stats.snapshot();
    assert!(s.mode_switches % 2 == 0, "ends on doorbells: {s:?}");
    p.run(4000, false, false);
    assert_eq!(p.stats.snapshot().remote_polls, s.remote_polls);
    // And with moves, kills and switches at random, still exactly once.
    p.advise(Some(true));
    p.run(6000, true, false);
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
    // The doorbell arrives; the server takes the requests in and posts its
    // READ wave, which stalls (its send queue is paused): time passes
    // beyond the server's timeout.
    let mut rng = SmallRng::seed_from_u64(4);
    p.net.run(&mut rng, 1000);
    let sep = p.link.as_ref().map(|l| l.sep.id()).unwrap();
    p.net.pause(sep).unwrap();
    p.serve();
    p.tick(TIMEOUT * 2);
    p.serve();
    p.net.run(&mut rng, 1000);
    p.agent_poll();
    assert_eq!(
        p.hq.status().state,
        LinkState::Orphaned,
        "the server gave up"
    );
    assert_eq!(p.server_errors, ["fabric operation timed out"]);
    p.server_errors.clear();
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

    /// Adaptive with the sidecore's advice changing at random (remote
    /// polls, doorbells, none) mid-batch: alone (so that no move or
    /// re-attach can cover a loss), then with the same churn.
    #[test]
    fn changing_advice_completes_exactly_once(seed in any::<u64>()) {
        let mut p = Pair::new(seed, NotifyMode::Adaptive, small_queue());
        p.advice_churn = true;
        p.run(3000, false, false);
        p.run(3000, true, true);
        prop_assert!(p.stats.snapshot().mode_switches > 0);
    }

    /// The same in remote-poll mode, where the server reads the avail ring.
    #[test]
    fn remote_polling_completes_exactly_once(seed in any::<u64>()) {
        let mut p = Pair::new(seed, NotifyMode::RemotePoll, small_queue());
        p.run(2000, true, false);
    }
}

/// Adds one 4-byte echo request (not yet published); see [`Pair::post`].
fn add_request(p: &mut Pair) {
    let head = p.add_echo(p.next_tag);
    p.inflight[usize::from(head)] = Some((p.next_tag, false));
    p.next_tag += 1;
    p.posted += 1;
}

/// The flake of `remote_net::adaptive_and_remote_poll_modes_exchange_exactly_once`:
/// the agent builds a doorbell (a kick) before it has taken in the
/// server's SET_MODE(poll); the guest publishes more; the server's remote
/// polls take everything; the doorbell lands behind next_avail. It must be
/// ignored, not fail the queue (which orphans it for good).
#[test]
fn a_doorbell_overtaken_by_remote_polls_is_ignored() {
    let cfg = RemoteQueueConfig {
        busy_batch: 1,
        busy_polls: 1,
        ..small_queue()
    };
    let mut p = Pair::new(9, NotifyMode::Adaptive, cfg);
    let mut rng = SmallRng::seed_from_u64(9);
    // One busy batch: the server switches to remote polling.
    p.post(2, false);
    p.net.run(&mut rng, 10_000);
    p.serve();
    let polling = |p: &Pair| {
        p.link
            .as_ref()
            .and_then(|l| l.server.as_ref())
            .is_some_and(|s| s.ring.polling_remote)
    };
    assert!(polling(&p));
    // SET_MODE(poll) is on the wire, not taken in. The guest posts two and
    // kicks: the agent builds a doorbell up to 4, still unsent (in push).
    add_request(&mut p);
    add_request(&mut p);
    p.driver.publish(&p.mem).unwrap();
    p.hq.on_kick(&p.mem, p.now);
    // The guest publishes two more meanwhile.
    add_request(&mut p);
    add_request(&mut p);
    p.driver.publish(&p.mem).unwrap();
    // Remote polls find all six and serve them: next_avail is 6.
    for _ in 0..8 {
        p.serve();
        p.net.run(&mut rng, 10_000);
    }
    // Only now does the doorbell (avail_idx 4) go out.
    p.act();
    p.net.run(&mut rng, 10_000);
    p.serve();
    assert!(
        polling(&p),
        "the server dropped the queue on a stale doorbell"
    );
    p.run(0, false, false);
    assert_eq!(p.hq.status().failovers, 0);
    assert_eq!(p.hq.status().state, LinkState::Serving);
}

/// Live migration: while the VMM logs, the server leaves used.idx to the
/// agent, which marks every page the batch wrote first; turned off, the
/// server publishes by itself again.
#[test]
fn logging_marks_every_written_page_before_the_guest_sees_it() {
    let mut p = Pair::new(11, NotifyMode::Doorbell, small_queue());
    p.spread = true;
    p.run(500, false, false);
    let st = |p: &Pair| {
        p.agent_stats
            .logged_batches
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(st(&p), 0, "nothing logged before the VMM asks");
    p.switch_log();
    p.settle(4);
    assert!(p.log_since.is_some(), "the server confirmed SET_LOG");
    let checked = p.logged_checks;
    p.run(1500, false, false);
    assert!(
        p.logged_checks > checked + 50,
        "{} completions checked",
        p.logged_checks
    );
    let logged = st(&p);
    assert!(logged > 0);
    // Off: the server publishes again, the agent marks nothing more.
    p.switch_log();
    p.settle(4);
    let before = (st(&p), p.log.pages_marked());
    let done = p.completed;
    p.run(1500, false, false);
    assert_eq!(
        (st(&p), p.log.pages_marked()),
        before,
        "no logging after LOG_ALL off"
    );
    assert!(p.completed > done + 50, "{} then {}", done, p.completed);
}

/// LOG_ALL off while a logged batch's PUBLISH waits in the agent's queue:
/// the server publishes its next batch itself, and the agent, taking the
/// old PUBLISH afterwards, must not take used.idx back (the guest would
/// lose the newer completions and wait for them forever).
#[test]
fn a_late_publish_after_logging_stops_never_takes_used_idx_back() {
    let mut p = Pair::new(21, NotifyMode::Doorbell, small_queue());
    p.spread = true;
    let mut rng = SmallRng::seed_from_u64(21);
    p.switch_log();
    p.settle(4);
    assert!(p.log_since.is_some());
    let mut wire = |p: &mut Pair| {
        for _ in 0..4 {
            p.net.run(&mut rng, 10_000);
            p.serve();
        }
        p.net.run(&mut rng, 10_000);
    };
    // Batch A, logged: its PUBLISH reaches the agent, which does not look.
    p.post(2, false);
    wire(&mut p);
    let used = p.layout.used_idx();
    assert_eq!(p.mem.load_u16(used).unwrap(), 0, "A waits for the agent");
    // Logging off reaches the server; batch B is published by the server.
    p.switch_log();
    wire(&mut p);
    p.post(2, false);
    wire(&mut p);
    assert_eq!(
        p.mem.load_u16(used).unwrap(),
        4,
        "B published by the server"
    );
    // Now the agent takes A's PUBLISH (and the rest).
    p.agent_poll();
    assert_eq!(p.mem.load_u16(used).unwrap(), 4, "used.idx never goes back");
    p.reap();
    assert_eq!(p.completed, 4);
    p.run(500, false, false);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Logging switched on and off at random while queues move, servers
    /// die and adaptive mode switches: every request completes exactly
    /// once, and every one posted while logging was confirmed has its
    /// pages marked when the guest sees it.
    #[test]
    fn logging_under_churn_marks_every_write_and_loses_nothing(seed in any::<u64>(), mode in 0u8..3) {
        let mode = [NotifyMode::Doorbell, NotifyMode::Adaptive, NotifyMode::RemotePoll][usize::from(mode)];
        let mut p = Pair::new(seed, mode, small_queue());
        p.spread = true;
        p.log_churn = true;
        p.run(3000, true, mode == NotifyMode::Doorbell);
        prop_assert!(p.log_switches > 0 || p.logging, "logging never switched");
    }
}
