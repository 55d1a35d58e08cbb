//! The VM-host side of a queue ([`HostQueue`]) alone: a
//! synthetic guest driver on plain memory, a fake clock, and in-test I/O
//! servers that follow the protocol (serve in ring order from where they
//! were attached, answer QUIESCE with where they stopped). No threads,
//! sockets or real time: the same seed gives the same run.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use crate::proto::agent::{Action, AgentError, AgentStats, HostQueue, HostQueueConfig, LinkState};
use crate::proto::agent::{MoveReport, QueueTarget};
use crate::proto::wire::{Message, NotifyMode, Quiesced, SetMode, NOTIFY_IMM};
use crate::virtio::memory::{anonymous_memory, GuestMemory, LocalMemory, MemoryMap};
use crate::virtio::ring::layout::VRING_USED_F_NO_NOTIFY;
use crate::virtio::ring::{DriverQueue, RingFeatures, RingLayout, Segment};

const SIZE: u16 = 16;
const RING: u64 = 0x1000;
const BUF: u64 = 0x8000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// One I/O server's view of the queue: where it serves from, and what the
/// doorbells announced.
struct Server {
    name: String,
    next: u16,
    announced: VecDeque<(u16, u16)>,
    quiesced: bool,
}

/// A guest, its queue's VM-host side, and the servers it has been linked to.
struct World {
    mem: LocalMemory,
    layout: RingLayout,
    driver: DriverQueue,
    hq: HostQueue,
    /// The server on the current link, if any.
    link: Option<Server>,
    /// Servers that refuse attaches (down).
    down: Vec<String>,
    now: Instant,
    posted: u64,
    /// Heads the guest got back, in order.
    completed: Vec<u16>,
    interrupts: u64,
    reports: Vec<Result<MoveReport, AgentError>>,
    sent: Vec<Message>,
}

fn target(name: &str) -> QueueTarget {
    QueueTarget::any(name)
}

impl World {
    fn new(mode: NotifyMode, features: RingFeatures) -> Self {
        let mem = anonymous_memory(0x10000).unwrap();
        let (layout, _) = RingLayout::packed(SIZE, RING).unwrap();
        let driver = DriverQueue::new(layout, features, None);
        driver.init(&mem).unwrap();
        let map = MemoryMap::of(&mem).unwrap();
        let cfg = HostQueueConfig {
            mode,
            chain_copy: 8,
            inline_max: 4096,
            timeout: TIMEOUT,
            log_data: true,
        };
        let stats = Arc::new(AgentStats::default());
        let mut hq = HostQueue::new(0, layout, features, &map, 0, target("a"), cfg, stats).unwrap();
        hq.start(&mem);
        Self {
            mem,
            layout,
            driver,
            hq,
            link: Some(Server {
                name: "a".into(),
                next: 0,
                announced: VecDeque::new(),
                quiesced: false,
            }),
            down: Vec::new(),
            now: Instant::now(),
            posted: 0,
            completed: Vec::new(),
            interrupts: 0,
            reports: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// The guest posts `n` one-segment requests (if the ring has room) and
    /// kicks unless the device suppressed kicks.
    fn post(&mut self, n: usize) {
        let mut added = 0;
        for _ in 0..n {
            if self.driver.num_free() == 0 {
                break;
            }
            let seg = Segment {
                addr: BUF + 64 * (self.posted % 64),
                len: 64,
            };
            self.driver.add(&self.mem, &[seg], &[], false).unwrap();
            self.posted += 1;
            added += 1;
        }
        if added > 0 {
            self.driver.publish(&self.mem).unwrap();
        }
    }

    fn kicks_on(&self) -> bool {
        self.mem.load_u16(self.layout.used_flags()).unwrap() & VRING_USED_F_NO_NOTIFY == 0
    }

    /// The guest kicks (the runtime drops kicks of an unlinked queue).
    fn kick(&mut self) {
        if self.hq.is_linked() {
            self.hq.on_kick(&self.mem, self.now);
        }
        self.run();
    }

    /// Carries out the queue's actions the way the runtime does.
    fn run(&mut self) {
        while let Some(a) = self.hq.poll_action() {
            match a {
                Action::Send(m) => {
                    self.sent.push(m.clone());
                    let Some(s) = &mut self.link else {
                        self.hq.on_link_error(AgentError::NoServer, self.now);
                        continue;
                    };
                    match m {
                        Message::Doorbell(d) => {
                            for e in d.entries {
                                s.announced.push_back((e.pos, e.head));
                            }
                        }
                        Message::Quiesce => s.quiesced = true,
                        other => panic!("agent sent {other:?}"),
                    }
                }
                Action::CloseLink => self.link = None,
                Action::Attach { to } => {
                    self.link = None;
                    let start = self.hq.resume_index(&self.mem);
                    if self.down.contains(&to.server) {
                        self.hq.attach_failed(AgentError::NoAttachReply, self.now);
                    } else {
                        self.link = Some(Server {
                            name: to.server.clone(),
                            next: start,
                            announced: VecDeque::new(),
                            quiesced: false,
                        });
                        self.hq.attached(&self.mem, self.now);
                    }
                }
                Action::Interrupt => self.interrupts += 1,
                Action::MoveDone(r) => self.reports.push(r),
                Action::LogSwitched => {}
            }
        }
    }

    /// The linked server serves up to `n` requests in ring order (what its
    /// doorbells announced, or what it reads from the avail ring when it
    /// polls) and signals the new used index; a quiesced server then
    /// answers with where it stopped.
    fn serve(&mut self, n: usize, polling: bool) {
        let Some(s) = &mut self.link else { return };
        let mut done = 0;
        while done < n {
            let head = if polling {
                let avail = self.mem.load_u16(self.layout.avail_idx()).unwrap();
                if avail == s.next {
                    break;
                }
                self.mem.load_u16(self.layout.avail_ring(s.next)).unwrap()
            } else {
                // Announcements before `next` are stale (another server's).
                while s.announced.front().is_some_and(|&(p, _)| p != s.next) {
                    s.announced.pop_front();
                }
                let Some((_, head)) = s.announced.pop_front() else {
                    break;
                };
                head
            };
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            self.mem
                .write(self.layout.used_ring(s.next), &elem)
                .unwrap();
            s.next = s.next.wrapping_add(1);
            done += 1;
        }
        let (next, quiesced) = (s.next, s.quiesced);
        if done > 0 {
            // The server publishes the index itself, then asks for the
            // interrupt.
            self.mem.store_u16(self.layout.used_idx(), next).unwrap();
            self.hq
                .on_used(&self.mem, u32::from(next) | NOTIFY_IMM, self.now);
        }
        if quiesced {
            self.hq
                .on_message(&self.mem, Message::Quiesced(Quiesced { next }), self.now);
        }
        self.run();
    }

    /// The link fails (the server died, or a completion failed).
    fn kill_link(&mut self) {
        if self.link.is_some() {
            self.hq.on_link_error(
                AgentError::Completion {
                    status: vrio_rdma::WcStatus::RetryExceeded,
                    wr_id: 0,
                },
                self.now,
            );
            self.run();
        }
    }

    fn move_to(&mut self, to: &str) {
        self.hq.on_move(target(to), self.now);
        self.run();
    }

    fn tick(&mut self, d: Duration) {
        self.now += d;
        self.hq.on_timer(self.now);
        self.run();
    }

    /// What the guest got back.
    fn reap(&mut self) {
        while let Some((head, _)) = self.driver.pop_used(&self.mem).unwrap() {
            self.completed.push(head);
        }
    }

    fn doorbells(&self) -> Vec<&crate::proto::wire::Doorbell> {
        self.sent
            .iter()
            .filter_map(|m| match m {
                Message::Doorbell(d) => Some(d),
                _ => None,
            })
            .collect()
    }
}

impl World {
    /// A doorbell queue on server "a" with `posted` requests announced and
    /// the first `served` of them completed.
    fn serving(posted: usize, served: usize) -> Self {
        let mut w = World::new(NotifyMode::Doorbell, plain());
        w.post(posted);
        w.kick();
        if served > 0 {
            w.serve(served, false);
        }
        w
    }

    /// Lets the linked server finish and checks the guest got all
    /// `posted` requests back.
    fn drain_all(&mut self, posted: usize) {
        self.serve(usize::from(SIZE), false);
        self.reap();
        assert_eq!(self.completed.len(), posted);
    }
}

fn plain() -> RingFeatures {
    RingFeatures::default()
}

#[test]
fn each_new_entry_is_announced_once_with_its_descriptors() {
    let mut w = World::serving(3, 0);
    w.kick();
    let d = w.doorbells();
    assert_eq!(d.len(), 1, "a kick with nothing new sends nothing");
    assert_eq!(d[0].avail_idx, 3);
    let pos: Vec<u16> = d[0].entries.iter().map(|e| e.pos).collect();
    assert_eq!(pos, [0, 1, 2]);
    assert!(d[0].entries.iter().all(|e| e.descs.len() == 1));
    w.serve(3, false);
    w.reap();
    assert_eq!(w.completed.len(), 3);
    assert!(w.interrupts > 0);
}

#[test]
fn the_used_index_may_lap_what_the_agent_last_heard() {
    // The server publishes used entries itself and tells the agent only
    // when an interrupt is due: after a guest that polled for more than a
    // lap of the 16-bit index, the next report is "behind" the last one
    // in wrapping terms, yet plausible against avail.
    let mut w = World::serving(2, 2);
    let last_heard = w.hq.status().used;
    // A lap and then some later, yet 6 "behind" in wrapping terms, with
    // the guest's avail a few entries further on.
    let later = last_heard.wrapping_sub(6);
    w.mem
        .store_u16(w.layout.avail_idx(), later.wrapping_add(SIZE / 2))
        .unwrap();
    w.mem.store_u16(w.layout.used_idx(), later).unwrap();
    // The interrupt names an older index than the server has published
    // since: a hint, not the truth.
    w.hq.on_used(
        &w.mem,
        u32::from(later.wrapping_sub(40)) | NOTIFY_IMM,
        w.now,
    );
    w.run();
    assert!(
        w.link.is_some(),
        "a lapped or late report is not a broken server"
    );
    assert_eq!(w.hq.status().used, later);
}

#[test]
fn a_server_completing_past_avail_is_cut_off() {
    let mut w = World::serving(2, 0);
    // The server published used.idx 5 with only 2 requests posted.
    w.mem.store_u16(w.layout.used_idx(), 5).unwrap();
    w.hq.on_used(&w.mem, 5 | NOTIFY_IMM, w.now);
    w.run();
    assert!(w.link.is_none(), "the link is closed");
    assert_eq!(w.hq.status().state, LinkState::Orphaned);
    assert_eq!(w.hq.status().used, 0, "the agent did not take it");
    assert_eq!(w.interrupts, 0, "nor did it interrupt the guest");
}

#[test]
fn a_live_move_resumes_where_the_old_server_stopped() {
    let mut w = World::serving(3, 2);
    w.move_to("b");
    assert!(matches!(w.sent.last(), Some(Message::Quiesce)));
    assert_eq!(w.hq.status().state, LinkState::Moving);
    // A second move while this one runs is refused.
    w.move_to("c");
    assert!(matches!(w.reports.pop(), Some(Err(AgentError::Busy(0)))));
    // The old server answers with where it stopped (after its batch).
    w.serve(0, false);
    assert_eq!(w.link.as_ref().map(|s| s.name.as_str()), Some("b"));
    let r = w.reports.pop().unwrap().unwrap();
    assert!(!r.failover);
    assert_eq!(r.resumed_at, 2);
    // The new server got the one request left, announced again.
    let last = w.doorbells().last().map(|d| d.entries[0].pos);
    assert_eq!(last, Some(2));
    w.drain_all(3);
    assert_eq!(w.hq.status().moves, 1);
}

#[test]
fn moving_to_where_the_queue_is_does_nothing() {
    let mut w = World::new(NotifyMode::Doorbell, plain());
    w.move_to("a");
    let r = w.reports.pop().unwrap().unwrap();
    assert_eq!(r.took, Duration::ZERO);
    assert!(w.sent.is_empty());
}

#[test]
fn a_server_dying_mid_move_fails_over_from_the_published_index() {
    let mut w = World::serving(4, 1);
    w.move_to("b");
    w.kill_link();
    let r = w.reports.pop().unwrap().unwrap();
    assert!(r.failover);
    assert_eq!(r.resumed_at, 1);
    w.drain_all(4);
    assert_eq!(w.hq.status().failovers, 1);
}

#[test]
fn a_quiesce_without_answer_times_out_into_a_failover() {
    let mut w = World::serving(2, 0);
    w.move_to("b");
    let d = w.hq.deadline().unwrap();
    w.tick(TIMEOUT - Duration::from_millis(1));
    assert!(w.reports.is_empty(), "not before the timeout");
    w.tick(Duration::from_millis(1));
    assert!(w.now >= d);
    let r = w.reports.pop().unwrap().unwrap();
    assert!(r.failover);
    assert_eq!(w.link.as_ref().map(|s| s.name.as_str()), Some("b"));
}

#[test]
fn a_lost_server_leaves_requests_in_the_ring_for_the_next_placement() {
    let mut w = World::serving(2, 1);
    w.kill_link();
    assert_eq!(w.hq.status().state, LinkState::Orphaned);
    // Posted while orphaned: nobody is told, nothing is lost.
    w.post(2);
    let before = w.doorbells().len();
    w.kick();
    assert_eq!(w.doorbells().len(), before);
    // A placement to a server that is down too: still orphaned.
    w.down.push("b".into());
    w.move_to("b");
    assert!(matches!(
        w.reports.pop(),
        Some(Err(AgentError::NoAttachReply))
    ));
    assert_eq!(w.hq.status().state, LinkState::Orphaned);
    w.move_to("c");
    let r = w.reports.pop().unwrap().unwrap();
    assert!(r.failover);
    assert_eq!(r.resumed_at, 1);
    w.drain_all(4);
}

#[test]
fn adaptive_switches_hand_discovery_back_and_forth() {
    let mut w = World::new(NotifyMode::Adaptive, plain());
    assert!(w.kicks_on());
    w.hq.on_message(
        &w.mem,
        Message::SetMode(SetMode {
            poll: true,
            next_avail: 0,
        }),
        w.now,
    );
    w.run();
    assert!(!w.kicks_on(), "a polled queue needs no kicks");
    w.post(3);
    w.kick();
    assert!(w.doorbells().is_empty());
    w.serve(2, true);
    // Back to doorbells: everything from the server's next avail on.
    w.hq.on_message(
        &w.mem,
        Message::SetMode(SetMode {
            poll: false,
            next_avail: 2,
        }),
        w.now,
    );
    w.run();
    assert!(w.kicks_on());
    let d = w.doorbells();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].entries.iter().map(|e| e.pos).collect::<Vec<_>>(), [2]);
    w.drain_all(3);
}

#[derive(Debug, Clone)]
enum Op {
    Post(usize),
    Kick,
    Serve(usize),
    Move(u8),
    Kill,
    Tick,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..6).prop_map(Op::Post),
        3 => Just(Op::Kick),
        4 => (0usize..6).prop_map(Op::Serve),
        1 => (0u8..3).prop_map(Op::Move),
        1 => Just(Op::Kill),
        1 => Just(Op::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the interleaving of guest requests, service, moves, lost
    /// servers and timeouts, once the queue is placed and drained the guest
    /// got every request back exactly once, in the order it posted them.
    #[test]
    fn every_request_completes_exactly_once(ops in proptest::collection::vec(op(), 1..80)) {
        let mut w = World::new(NotifyMode::Doorbell, plain());
        for o in ops {
            match o {
                Op::Post(n) => w.post(n),
                Op::Kick => w.kick(),
                Op::Serve(n) => w.serve(n, false),
                Op::Move(k) => {
                    w.move_to(["a", "b", "c"][usize::from(k)]);
                    w.reports.clear();
                }
                Op::Kill => w.kill_link(),
                Op::Tick => w.tick(TIMEOUT),
            }
            w.reap();
            // The guest never sees more than it posted.
            prop_assert!(w.completed.len() as u64 <= w.posted);
        }
        // Place the queue if it is orphaned or moving, then drain.
        w.tick(TIMEOUT);
        w.serve(0, false);
        if w.hq.status().state == LinkState::Orphaned {
            w.move_to("z");
        }
        w.kick();
        for _ in 0..8 {
            w.serve(usize::from(SIZE), false);
        }
        w.reap();
        prop_assert_eq!(w.hq.status().state, LinkState::Serving);
        prop_assert_eq!(w.completed.len() as u64, w.posted);
        // Exactly once: the guest driver's pop_used (in `reap`) refuses a
        // head that is not outstanding, so a duplicate fails the run there,
        // and the count above rules out a loss.
    }
}
