//! The VM-host side of one remote queue, as a state machine that does no
//! I/O: no threads, file descriptors, endpoints or clocks. The runtime
//! (`remote::agent`) feeds it events — a guest kick, a completion the
//! server signalled with an immediate, a message from the server, a move
//! command, a link failure, the time — and carries out the [`Action`]s it
//! queues: send a message, close the link, attach somewhere else, interrupt
//! the guest, answer the move command. It reads and writes the guest's ring
//! through [`GuestMemory`] only, so tests drive it over plain memory with a
//! fake clock.
//!
//! What it guarantees:
//! - every avail entry is announced to the serving server once per link
//!   (doorbell mode), from where that server will serve;
//! - used.idx only moves forward, and never past what the guest made
//!   available (a server that claims more is cut off);
//! - a move either hands over at the old server's stopping index (live) or
//!   resumes at the used index published here (failover), so no request is
//!   lost and none completes twice.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::sync::atomic::{fence, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_rdma::{FabricError, WcStatus};

use super::wire::{
    doorbell_entry_size, Doorbell, DoorbellEntry, Message, NotifyMode, WireError, ANY_SIDECORE,
    DOORBELL_HEADER, EARLY_IMM, EARLY_SPAN_SHIFT, MAX_MSG, NOTIFY_IMM, PUBLISH_IMM,
};
use crate::virtio::dirty_log::DirtyLog;
use crate::virtio::memory::{GuestMemory, MemoryError, MemoryMap};
use crate::virtio::ring::layout::{
    vring_need_event, VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY,
};
use crate::virtio::ring::{
    Descriptor, DescriptorChain, DeviceQueue, QueueError, RingFeatures, RingLayout, RingState,
    Walker,
};

/// Why attaching, serving or moving a queue failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The fabric refused an operation (connect, post, poll).
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    /// The I/O server answered the ATTACH with a non-zero status.
    #[error("the I/O server refused queue {queue}: {} (status {status})", crate::proto::wire::AttachStatus::from_code(*status))]
    Refused {
        /// The queue, as the device numbers it.
        queue: u16,
        /// The server's status code.
        status: u16,
    },
    /// The caller's placement does not match the device.
    #[error("{targets} targets for {queues} queues")]
    TargetCount {
        /// Targets given.
        targets: usize,
        /// Queues the device has.
        queues: usize,
    },
    /// Guest memory (or the agent's message buffers) out of reach.
    #[error("memory: {0}")]
    Memory(#[from] MemoryError),
    /// The guest's ring is unusable (misplaced, or its memory unreachable).
    #[error("guest ring: {0}")]
    Ring(#[from] QueueError),
    /// The server completed requests the guest never made available.
    #[error(
        "the server completed up to {idx}, past the guest's avail index {avail} (used was {used})"
    )]
    CompletedPastAvail {
        /// The used index the server announced.
        idx: u16,
        /// The guest's avail index.
        avail: u16,
        /// The used index before.
        used: u16,
    },
    /// The server's bytes do not decode.
    #[error("bad message from the I/O server: {0}")]
    BadMessage(#[source] WireError),
    /// A message that has no place where it arrived.
    #[error("unexpected message from the I/O server: {0:?}")]
    UnexpectedMessage(Box<Message>),
    /// A message of ours did not encode.
    #[error("encoding a message: {0}")]
    Encode(#[source] WireError),
    /// A receive completion named a buffer the agent never posted.
    #[error("receive id out of range")]
    RecvOutOfRange,
    /// A failed completion on the link to the server.
    #[error("fabric completion {status:?} (wr {wr_id:#x})")]
    Completion {
        /// How it failed.
        status: WcStatus,
        /// Which work request.
        wr_id: u64,
    },
    /// The server closed the link before answering an ATTACH.
    #[error(
        "the I/O server dropped the connection while attaching queue {queue} ({status:?}); \
         its log says why (a different vrio wire version, rings outside guest memory, ...)"
    )]
    AttachDropped {
        /// The queue being attached.
        queue: u16,
        /// The completion status that ended the link.
        status: WcStatus,
    },
    /// No ATTACH reply within the agent's timeout.
    #[error("no attach reply from the server")]
    NoAttachReply,
    /// The old server did not answer QUIESCE within the timeout.
    #[error("no answer to QUIESCE")]
    NoQuiesceAnswer,
    /// The server did not answer SET_LOG within the timeout.
    #[error("no answer to SET_LOG")]
    NoLogAnswer,
    /// A move (a quiesce and an attach) did not end within twice the
    /// timeout.
    #[error("moving queue {0} did not finish")]
    MoveUnfinished(u16),
    /// The send ring stayed full (no send completed).
    #[error("send queue stuck")]
    SendQueueStuck,
    /// The queue is orphaned: there is no server to send to.
    #[error("queue has no server")]
    NoServer,
    /// A move named a queue the device does not have.
    #[error("no queue {0} on this device")]
    NoSuchQueue(u16),
    /// A move was asked for while the queue was already moving.
    #[error("queue {0} is already moving")]
    Busy(u16),
    /// The agent thread is gone (detached).
    #[error("the agent has stopped")]
    Stopped,
    /// An OS call (eventfd, epoll, thread) failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Where a queue is served: an I/O server's fabric address and one of its
/// sidecores ([`ANY_SIDECORE`]: the server chooses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTarget {
    /// The I/O server's fabric address.
    pub server: String,
    /// The sidecore, or [`ANY_SIDECORE`].
    pub sidecore: u16,
}

impl QueueTarget {
    /// `server`, on whichever sidecore it chooses.
    pub fn any(server: &str) -> Self {
        Self {
            server: server.to_string(),
            sidecore: ANY_SIDECORE,
        }
    }
}

/// How a queue is linked to its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// An I/O server serves the queue.
    Serving,
    /// Handing over: the old server is finishing its batch.
    Moving,
    /// The server was lost; requests wait in the ring for a new placement.
    Orphaned,
}

/// One queue's placement and history, as the agent last saw it.
#[derive(Debug, Clone)]
pub struct QueueStatus {
    /// The queue, as the device numbers it.
    pub queue: u16,
    /// Where it is (or was last) served.
    pub target: QueueTarget,
    /// How it is linked.
    pub state: LinkState,
    /// The used index the agent last published.
    pub used: u16,
    /// Handovers from a live server.
    pub moves: u64,
    /// Re-attachments after a lost server.
    pub failovers: u64,
}

/// What a move did.
#[derive(Debug, Clone, Copy)]
pub struct MoveReport {
    /// The queue moved.
    pub queue: u16,
    /// The ring index the new server resumed at.
    pub resumed_at: u16,
    /// The old server was gone: requests after `resumed_at` were re-served.
    pub failover: bool,
    /// From the command to the queue being served again.
    pub took: Duration,
    /// For a failover: how long the queue had no server (from the moment
    /// the agent saw the link fail to the queue being served again).
    pub down: Option<Duration>,
}

/// What the agent did, for benchmarks and tests (all queues of a device).
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Doorbell messages sent.
    pub doorbells: AtomicU64,
    /// Used-index updates published.
    pub completions: AtomicU64,
    /// Guest interrupts raised.
    pub interrupts: AtomicU64,
    /// Guest kicks seen.
    pub kicks: AtomicU64,
    /// CPU time of the agent thread, in ns, set when the device detaches.
    /// A thread shared by several devices (`remote::Agent`) reports its
    /// whole time to each: read `Agent::cpu_ns` instead.
    pub cpu_ns: AtomicU64,
    /// Handovers from a live server.
    pub moves: AtomicU64,
    /// Re-attachments after a lost server.
    pub failovers: AtomicU64,
    /// Queues that lost their server.
    pub orphaned: AtomicU64,
    /// Used-index updates the agent published for the server while
    /// logging (one per batch).
    pub logged_batches: AtomicU64,
    /// Guest ranges marked dirty for the server's WRITEs (data segments,
    /// used elements, used.idx).
    pub logged_ranges: AtomicU64,
}

/// What the runtime must do for the queue, in order.
#[derive(Debug)]
pub enum Action {
    /// Send this message on the queue's current link. If that fails, tell
    /// the queue with [`HostQueue::on_link_error`].
    Send(Message),
    /// Close the current link: its endpoint and rkeys go, which fences the
    /// old server out of guest memory.
    CloseLink,
    /// Open a link to `to` and attach the queue there at the ring index
    /// [`HostQueue::resume_index`] gives (asked after the old link is
    /// closed, since the server writes the used index itself); then call
    /// [`HostQueue::attached`] or [`HostQueue::attach_failed`].
    Attach {
        /// Where.
        to: QueueTarget,
    },
    /// Interrupt the guest (write its call eventfd).
    Interrupt,
    /// The move command under way ended; answer it with this.
    MoveDone(Result<MoveReport, AgentError>),
    /// A dirty-log switch ([`HostQueue::set_log`]) is in effect: the server
    /// confirmed it, or the queue has no server (the next attach carries
    /// it).
    LogSwitched,
}

/// The protocol limits of a queue's VM-host side.
#[derive(Debug, Clone, Copy)]
pub struct HostQueueConfig {
    /// How requests reach the server at first (it may switch adaptive
    /// queues between doorbells and remote polling).
    pub mode: NotifyMode,
    /// Descriptors copied per chain into a doorbell (the server fetches
    /// the rest).
    pub chain_copy: usize,
    /// Payload bytes of a chain copied inline into its doorbell entry
    /// (NVMe-oF's in-capsule data): a chain whose readable segments beyond
    /// its headers total at most this goes whole, so the server starts it
    /// without a READ; larger ones carry only their header-sized segments.
    pub inline_max: usize,
    /// QUIESCE answers must arrive within this.
    pub timeout: Duration,
    /// While logging, mark the data segments the server wrote. Always true
    /// but in the test that proves the marks matter (a migration then
    /// loses the guest's data).
    pub log_data: bool,
}

/// Readable segments up to this size always go inline: request headers,
/// which the server needs before it can do anything.
const INLINE_HEADER: u32 = 64;

enum Link {
    Serving,
    Quiescing {
        to: QueueTarget,
        started: Instant,
    },
    /// An [`Action::Attach`] is being carried out.
    Attaching {
        to: QueueTarget,
        start: u16,
        started: Instant,
        /// Set for a failover: when the queue lost its server.
        down_since: Option<Instant>,
        /// Whether a move command waits for the outcome.
        commanded: bool,
    },
    Orphaned {
        since: Instant,
    },
}

/// The VM-host side of one queue: announces the guest's requests,
/// publishes the server's completions, and hands the queue over between
/// servers.
pub struct HostQueue {
    index: u16,
    layout: RingLayout,
    features: RingFeatures,
    dq: DeviceQueue,
    cfg: HostQueueConfig,
    /// The next avail position not yet announced to the server.
    last_pushed: Wrapping<u16>,
    polled_by_server: bool,
    /// `push` stopped after its last round with the guest still
    /// publishing: entries may be unannounced while the guest, having read
    /// an old avail_event, will not kick again. Push again unprompted.
    repush: bool,
    target: QueueTarget,
    link: Link,
    moves: u64,
    failovers: u64,
    stats: Arc<AgentStats>,
    actions: VecDeque<Action>,
    /// The guest's memory, for walking completed chains while logging.
    map: MemoryMap,
    walker: Walker,
    chain: DescriptorChain,
    /// The VMM's dirty log while a migration runs.
    log: Option<Arc<DirtyLog>>,
    /// SET_LOG sent, its LOGGING not yet back.
    log_pending: Option<Instant>,
    /// SET_LOGs on this link not answered yet: the switch is in effect
    /// only once the last one is.
    log_unanswered: u32,
    /// Doorbell buffers the runtime gave back ([`HostQueue::recycle`]), so
    /// that building a doorbell allocates nothing in steady state.
    spare: Spare,
}

/// Buffers of sent doorbells, for the next ones.
#[derive(Debug, Default)]
struct Spare {
    lists: Vec<Vec<DoorbellEntry>>,
    entries: Vec<DoorbellEntry>,
    bytes: Vec<Vec<u8>>,
}

impl Spare {
    /// Keeps `d`'s buffers, up to `max` entries and byte buffers (a ring's
    /// worth is all a queue ever needs at once).
    fn keep(&mut self, d: Doorbell, max: usize) {
        let mut list = d.entries;
        for mut e in list.drain(..) {
            for (_, b) in e.inline.drain(..) {
                if self.bytes.len() < max {
                    self.bytes.push(b);
                }
            }
            e.descs.clear();
            if self.entries.len() < max {
                self.entries.push(e);
            }
        }
        if self.lists.len() < 4 {
            self.lists.push(list);
        }
    }
}

impl HostQueue {
    /// Queue `index` of a device, on guest memory `map`, served by `target`
    /// from ring index `start` (the link is already attached there).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u16,
        layout: RingLayout,
        features: RingFeatures,
        map: &MemoryMap,
        start: u16,
        target: QueueTarget,
        cfg: HostQueueConfig,
        stats: Arc<AgentStats>,
    ) -> Result<Self, QueueError> {
        let mut dq = DeviceQueue::new(layout, features, map)?;
        dq.set_state(RingState {
            next_avail: start,
            next_used: start,
        });
        Ok(Self {
            index,
            layout,
            features,
            dq,
            cfg,
            last_pushed: Wrapping(start),
            polled_by_server: cfg.mode == NotifyMode::RemotePoll,
            repush: false,
            target,
            link: Link::Serving,
            moves: 0,
            failovers: 0,
            stats,
            actions: VecDeque::new(),
            map: map.clone(),
            walker: Walker::new(),
            chain: DescriptorChain::default(),
            log: None,
            log_pending: None,
            log_unanswered: 0,
            spare: Spare::default(),
        })
    }

    /// The queue's number on its device.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The guest's ring.
    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }

    /// The ring features the driver negotiated.
    pub fn features(&self) -> RingFeatures {
        self.features
    }

    /// Whether the current link is being closed (its remaining completions
    /// no longer matter).
    pub fn link_closing(&self) -> bool {
        self.actions.iter().any(|a| matches!(a, Action::CloseLink))
    }

    /// The next action to carry out, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Takes back a message the runtime has sent, to reuse its buffers
    /// (optional: a dropped message costs only the allocations).
    pub fn recycle(&mut self, m: Message) {
        if let Message::Doorbell(d) = m {
            self.spare.keep(d, 2 * usize::from(self.layout.size));
        }
    }

    /// Whether the queue has a link to serve on (the runtime drops guest
    /// kicks otherwise: the ring itself remembers the requests).
    pub fn is_linked(&self) -> bool {
        !matches!(self.link, Link::Orphaned { .. })
    }

    /// Whether a move is under way (a second one is refused).
    pub fn is_moving(&self) -> bool {
        matches!(self.link, Link::Quiescing { .. } | Link::Attaching { .. })
    }

    /// When [`HostQueue::on_timer`] must run next, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        let quiesce = match &self.link {
            Link::Quiescing { started, .. } => Some(*started + self.cfg.timeout),
            _ => None,
        };
        let log = self.log_pending.map(|t| t + self.cfg.timeout);
        match (quiesce, log) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the agent logs the server's writes (an attach must say so).
    pub fn logging(&self) -> bool {
        self.log.is_some()
    }

    /// Starts (`Some`) or stops logging the server's writes in the VMM's
    /// dirty log. The server is told with SET_LOG; [`Action::LogSwitched`]
    /// follows once it answered (every batch it published the old way is
    /// then in guest memory), or at once when the queue has no server.
    pub fn set_log(&mut self, log: Option<Arc<DirtyLog>>, now: Instant) {
        let on = log.is_some();
        // Marking starts now: a batch the server queued before SET_LOG is
        // published by the server itself, one after it comes here.
        self.log = log;
        match self.link {
            Link::Serving => {
                self.actions.push_back(Action::Send(Message::SetLog(on)));
                self.log_unanswered += 1;
                self.log_pending = Some(now);
            }
            // The old server finishes its batch the old way; once QUIESCED
            // is here its writes are in memory, and the next server is
            // attached with the new state.
            Link::Quiescing { .. } => self.log_pending = Some(now),
            Link::Attaching { .. } | Link::Orphaned { .. } => {
                self.actions.push_back(Action::LogSwitched)
            }
        }
    }

    /// Whether a SET_LOG waits for its answer.
    pub fn log_switching(&self) -> bool {
        self.log_pending.is_some()
    }

    fn log_settled(&mut self) {
        if self.log_pending.take().is_some() {
            self.actions.push_back(Action::LogSwitched);
        }
    }

    /// Where the queue is served, as of now.
    pub fn status(&self) -> QueueStatus {
        QueueStatus {
            queue: self.index,
            target: self.target.clone(),
            state: match self.link {
                Link::Serving => LinkState::Serving,
                Link::Quiescing { .. } | Link::Attaching { .. } => LinkState::Moving,
                Link::Orphaned { .. } => LinkState::Orphaned,
            },
            used: self.dq.state().next_used,
            moves: self.moves,
            failovers: self.failovers,
        }
    }

    /// The link is up (the first attach succeeded): turn guest kicks on
    /// unless the server polls.
    pub fn start<M: GuestMemory + ?Sized>(&mut self, mem: &M) {
        self.set_kicks(mem, !self.polled_by_server);
    }

    /// The guest kicked.
    pub fn on_kick<M: GuestMemory + ?Sized>(&mut self, mem: &M, now: Instant) {
        self.stats.kicks.fetch_add(1, Relaxed);
        if !self.polled_by_server && matches!(self.link, Link::Serving) {
            if let Err(e) = self.push(mem) {
                self.on_link_error(e.into(), now);
            }
        }
    }

    /// The server's WRITE_WITH_IMM (`imm`: the used index it published in
    /// guest memory, in the low 16 bits, and [`NOTIFY_IMM`]): the guest
    /// wants an interrupt for those entries. The server writes used entries
    /// and the index itself and only sends this when the guest's
    /// suppression asks for it, so the VM host does nothing per request.
    pub fn on_used<M: GuestMemory + ?Sized>(&mut self, mem: &M, imm: u32, now: Instant) {
        if imm & PUBLISH_IMM != 0 {
            if let Err(e) = self.publish_logged(mem, imm as u16) {
                self.on_link_error(e, now);
            }
            return;
        }
        if let Err(e) = self.note_used(mem, imm as u16) {
            self.on_link_error(e, now);
            return;
        }
        if imm & NOTIFY_IMM != 0 {
            self.interrupt();
        } else if imm & EARLY_IMM != 0 {
            let span = (imm >> EARLY_SPAN_SHIFT) as u16;
            match self.wants_early(mem, imm as u16, span) {
                Ok(true) => self.interrupt(),
                Ok(false) => {}
                Err(e) => self.on_link_error(e, now),
            }
        }
    }

    /// An early interrupt request (`EARLY_IMM`) for the `span` used entries
    /// up to `new`: decided here as a device decides, from the guest's
    /// suppression word read after used.idx (which landed before the
    /// immediate: RC order).
    fn wants_early<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        new: u16,
        span: u16,
    ) -> Result<bool, AgentError> {
        fence(Ordering::SeqCst);
        Ok(if self.features.event_idx {
            let event = mem.load_u16(self.layout.used_event())?;
            vring_need_event(event, new, new.wrapping_sub(span))
        } else {
            let flags = mem.load_u16(self.layout.avail_flags())?;
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        })
    }

    /// Records that the server published used entries: the interrupt's
    /// `idx` is only a hint (it may be older than what the server has
    /// published since); the used index in guest memory, which the server
    /// writes, is what counts, and it must be consistent with avail.
    fn note_used<M: GuestMemory + ?Sized>(&mut self, mem: &M, idx: u16) -> Result<(), AgentError> {
        let st = self.dq.state();
        let avail = mem.load_u16(self.layout.avail_idx())?;
        let cur = mem.load_u16(self.layout.used_idx())?;
        if !self.plausible_used(cur, avail) {
            tracing::debug!(queue = self.index, hint = idx, "used index past avail");
            return Err(AgentError::CompletedPastAvail {
                idx: cur,
                avail,
                used: st.next_used,
            });
        }
        self.dq.set_state(RingState {
            next_used: cur,
            ..st
        });
        self.stats.completions.fetch_add(1, Relaxed);
        Ok(())
    }

    /// A batch the server wrote while the agent logs: its used elements are
    /// in the used ring up to `new`, used.idx is not. Marks every page the
    /// server wrote (the writable segments of each completed chain, the
    /// used elements), then publishes used.idx, marks it, and interrupts
    /// the guest if its suppression asks for it.
    ///
    /// The chains are walked in guest memory: the driver may not touch a
    /// chain until it is used, so they are the ones the server served. A
    /// guest that rewrites its descriptors in flight can only hide its own
    /// pages from its own migration.
    fn publish_logged<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        new: u16,
    ) -> Result<(), AgentError> {
        let st = self.dq.state();
        let avail = mem.load_u16(self.layout.avail_idx())?;
        let cur = mem.load_u16(self.layout.used_idx())?;
        if !self.plausible_used(new, avail) || !self.plausible_used(cur, avail) {
            return Err(AgentError::CompletedPastAvail {
                idx: new,
                avail,
                used: cur,
            });
        }
        // Distances back from avail order the indexes without wrapping.
        let back = |i: u16| avail.wrapping_sub(i);
        if back(cur) <= back(new) {
            // The server published past this batch itself: SET_LOG(off)
            // reached it and its next batch overtook us. Its index covers
            // ours (never taken back); its interrupt decision saw only its
            // own batch, so interrupt for ours.
            self.dq.set_state(RingState {
                next_used: cur,
                ..st
            });
            self.interrupt();
            return Ok(());
        }
        // What the guest cannot see yet: from the index in guest memory.
        let count = new.wrapping_sub(cur);
        let mut ranges = 0u64;
        if let Some(log) = &self.log {
            for k in 0..count {
                let at = self.layout.used_ring(cur.wrapping_add(k));
                let mut e = [0u8; 8];
                mem.read(at, &mut e)?;
                log.mark(at, 8);
                ranges += 1;
                let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                let Ok(head) = u16::try_from(id) else {
                    continue;
                };
                let walked = self.walker.walk(
                    mem,
                    &self.map,
                    &self.layout,
                    self.features,
                    head,
                    &mut self.chain,
                );
                if let Err(e) = walked {
                    // The server failed such a chain without writing it.
                    tracing::debug!(queue = self.index, head, error = %e, "completed chain does not walk; nothing to log");
                    continue;
                }
                if !self.cfg.log_data {
                    continue;
                }
                for seg in &self.chain.writable {
                    log.mark(seg.addr, u64::from(seg.len));
                    ranges += 1;
                }
            }
        }
        // The marks before the index: the VMM may copy a page as soon as
        // the guest could have seen it change.
        fence(Ordering::SeqCst);
        // Atomically against a server that publishes again meanwhile
        // (after SET_LOG(off)): its index is past ours, and stays.
        let published = match mem.compare_exchange_u16(self.layout.used_idx(), cur, new)? {
            Ok(_) => new,
            Err(theirs) => theirs,
        };
        self.dq.set_state(RingState {
            next_used: published,
            ..st
        });
        if published != new {
            self.interrupt();
            return Ok(());
        }
        if let Some(log) = &self.log {
            log.mark(self.layout.used_idx(), 2);
            ranges += 1;
        }
        self.stats.logged_batches.fetch_add(1, Relaxed);
        self.stats.logged_ranges.fetch_add(ranges, Relaxed);
        self.stats.completions.fetch_add(1, Relaxed);
        if self.dq.needs_notification(mem)? {
            self.interrupt();
        }
        Ok(())
    }

    /// Interrupts the guest (counted).
    fn interrupt(&mut self) {
        self.actions.push_back(Action::Interrupt);
        self.stats.interrupts.fetch_add(1, Relaxed);
    }

    /// Whether a used index `idx` can be the server's with the guest's avail
    /// index at `avail`: a device completes only what was posted, and no
    /// more than a ring's worth is ever in flight. Judged against avail
    /// alone, because the agent hears of the used index only when an
    /// interrupt is due, so what it last heard may be laps old.
    fn plausible_used(&self, idx: u16, avail: u16) -> bool {
        avail.wrapping_sub(idx) <= self.layout.size
    }

    /// Where the queue resumes on its next server: the used index in guest
    /// memory, read once the old link is closed (so the old server can no
    /// longer move it). The runtime calls this between
    /// [`Action::CloseLink`]'s effect and the attach. An index the guest
    /// could not have reached (a broken server) falls back to the last one
    /// the server reported.
    pub fn resume_index<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> u16 {
        let known = self.dq.state().next_used;
        let read = mem.load_u16(self.layout.used_idx()).ok();
        let avail = mem.load_u16(self.layout.avail_idx()).ok();
        let start = match (read, avail) {
            (Some(u), Some(a)) if self.plausible_used(u, a) => {
                let _ = self.note_used(mem, u);
                u
            }
            _ => known,
        };
        if let Link::Attaching { start: s, .. } = &mut self.link {
            *s = start;
        }
        start
    }

    /// A message from the server.
    pub fn on_message<M: GuestMemory + ?Sized>(&mut self, mem: &M, m: Message, now: Instant) {
        match m {
            Message::SetMode(m) if m.poll => {
                self.polled_by_server = true;
                self.set_kicks(mem, false);
            }
            Message::SetMode(m) => {
                // The server hands discovery back from its next avail on,
                // so a request posted during the switch is not stranded.
                self.polled_by_server = false;
                self.last_pushed = Wrapping(m.next_avail);
                self.set_kicks(mem, true);
                if matches!(self.link, Link::Serving) {
                    if let Err(e) = self.push(mem) {
                        self.on_link_error(e.into(), now);
                    }
                }
            }
            // Everything before it arrived first (RC ordering).
            Message::Quiesced(q) => self.on_quiesced(q.next),
            // An answer to an earlier SET_LOG that a newer one replaced is
            // not an error; the newer one's answer follows.
            Message::Logging(l) => {
                tracing::debug!(
                    queue = self.index,
                    on = l.on,
                    server_next = l.next_used,
                    "the server switched dirty logging"
                );
                self.log_unanswered = self.log_unanswered.saturating_sub(1);
                if self.log_unanswered == 0 {
                    self.log_settled();
                }
            }
            other => self.on_link_error(AgentError::UnexpectedMessage(Box::new(other)), now),
        }
    }

    /// A move command: hand the queue over to `to` (or fail over to it if
    /// the old server is gone). Ends with an [`Action::MoveDone`].
    pub fn on_move(&mut self, to: QueueTarget, now: Instant) {
        match &self.link {
            Link::Quiescing { .. } | Link::Attaching { .. } => {
                self.actions
                    .push_back(Action::MoveDone(Err(AgentError::Busy(self.index))));
            }
            Link::Serving if to == self.target => {
                self.actions.push_back(Action::MoveDone(Ok(MoveReport {
                    queue: self.index,
                    resumed_at: self.dq.state().next_used,
                    failover: false,
                    took: Duration::ZERO,
                    down: None,
                })));
            }
            Link::Serving => {
                self.actions.push_back(Action::Send(Message::Quiesce));
                self.link = Link::Quiescing { to, started: now };
            }
            Link::Orphaned { since } => {
                let since = *since;
                self.reattach(to, now, Some(since), true);
            }
        }
    }

    /// The old server answered QUIESCE, stopping at `next`: resume on the
    /// new one at the index published here.
    fn on_quiesced(&mut self, next: u16) {
        self.log_settled();
        let Link::Quiescing { to, started } = std::mem::replace(&mut self.link, Link::Serving)
        else {
            tracing::warn!(queue = self.index, "QUIESCED without a move; ignored");
            return;
        };
        // The queue resumes at the used index in guest memory, which the
        // server wrote before it answered (RC order); `next` says the same.
        tracing::debug!(queue = self.index, server_next = next, "old server stopped");
        self.reattach(to, started, None, true);
    }

    /// Closes the link and attaches at `to`, resuming at the used index.
    fn reattach(
        &mut self,
        to: QueueTarget,
        started: Instant,
        down_since: Option<Instant>,
        commanded: bool,
    ) {
        // Messages queued for the old link are void (a SET_LOG among
        // them: the new ATTACH carries the log state).
        self.actions.retain(|a| !matches!(a, Action::Send(_)));
        self.log_unanswered = 0;
        self.actions.push_back(Action::CloseLink);
        let start = self.dq.state().next_used;
        self.actions.push_back(Action::Attach { to: to.clone() });
        self.link = Link::Attaching {
            to,
            start,
            started,
            down_since,
            commanded,
        };
    }

    /// The [`Action::Attach`] succeeded: the queue is served again.
    pub fn attached<M: GuestMemory + ?Sized>(&mut self, mem: &M, now: Instant) {
        let Link::Attaching {
            to,
            start,
            started,
            down_since,
            commanded,
        } = std::mem::replace(&mut self.link, Link::Serving)
        else {
            return;
        };
        let failover = down_since.is_some();
        self.target = to;
        self.polled_by_server = self.cfg.mode == NotifyMode::RemotePoll;
        self.last_pushed = Wrapping(start);
        self.set_kicks(mem, !self.polled_by_server);
        if failover {
            self.failovers += 1;
            self.stats.failovers.fetch_add(1, Relaxed);
        } else {
            self.moves += 1;
            self.stats.moves.fetch_add(1, Relaxed);
        }
        tracing::info!(queue = self.index, server = %self.target.server, sidecore = self.target.sidecore, start, failover, "queue resumed");
        // The old server may have published completions and died (or
        // handed over) before it asked for their interrupt: one spurious
        // interrupt makes the guest look, a missing one could hang it.
        self.interrupt();
        if !self.polled_by_server {
            // Requests the guest posted while the queue was moving.
            if let Err(e) = self.push(mem) {
                self.on_link_error(AgentError::Memory(e.clone()), now);
                if commanded {
                    self.actions
                        .push_back(Action::MoveDone(Err(AgentError::Memory(e))));
                }
                return;
            }
        }
        if commanded {
            self.actions.push_back(Action::MoveDone(Ok(MoveReport {
                queue: self.index,
                resumed_at: start,
                failover,
                took: now.saturating_duration_since(started),
                down: down_since.map(|t| now.saturating_duration_since(t)),
            })));
        }
    }

    /// The [`Action::Attach`] failed: the queue waits for another placement.
    pub fn attach_failed(&mut self, e: AgentError, now: Instant) {
        let Link::Attaching {
            to,
            started,
            down_since,
            commanded,
            ..
        } = std::mem::replace(&mut self.link, Link::Orphaned { since: now })
        else {
            return;
        };
        tracing::error!(queue = self.index, server = %to.server, error = %e, "re-attach failed; the queue waits for another placement");
        self.link = Link::Orphaned {
            since: down_since.unwrap_or(started),
        };
        if commanded {
            self.actions.push_back(Action::MoveDone(Err(e)));
        }
    }

    /// The link failed (a failed completion, a send that could not be
    /// posted, a broken rule): fail over if a move was under way, else wait
    /// for a new placement.
    pub fn on_link_error(&mut self, e: AgentError, now: Instant) {
        // No server writes for this link any more; the next attach carries
        // the log state.
        self.log_unanswered = 0;
        self.log_settled();
        match std::mem::replace(&mut self.link, Link::Orphaned { since: now }) {
            Link::Quiescing { to, started } => {
                tracing::warn!(queue = self.index, error = %e, "the old server failed during a move; failing over");
                self.reattach(to, started, Some(now), true);
            }
            Link::Orphaned { since } => self.link = Link::Orphaned { since },
            // The attach itself reports its failure.
            a @ Link::Attaching { .. } => self.link = a,
            Link::Serving => {
                tracing::error!(queue = self.index, server = %self.target.server, error = %e, "I/O server lost; the queue waits for a new placement");
                self.stats.orphaned.fetch_add(1, Relaxed);
                self.actions.retain(|a| !matches!(a, Action::Send(_)));
                self.actions.push_back(Action::CloseLink);
            }
        }
    }

    /// Whether the runtime must call [`HostQueue::on_kick`] without a
    /// kick (and soon): a push gave up with the guest still publishing.
    pub fn needs_push(&self) -> bool {
        self.repush && !self.polled_by_server && matches!(self.link, Link::Serving)
    }

    /// Time passed: a quiesce without an answer means the old server is
    /// lost.
    pub fn on_timer(&mut self, now: Instant) {
        if self
            .log_pending
            .is_some_and(|t| now >= t + self.cfg.timeout)
        {
            self.on_link_error(AgentError::NoLogAnswer, now);
        }
        if self.deadline().is_some_and(|d| now >= d) {
            self.on_link_error(AgentError::NoQuiesceAnswer, now);
        }
    }

    /// Turns guest kicks on or off (the agent is the "device" for kick
    /// suppression; the server never writes ring flags).
    fn set_kicks<M: GuestMemory + ?Sized>(&mut self, mem: &M, on: bool) {
        let a = self.layout.used_flags();
        let f = mem.load_u16(a).unwrap_or(0);
        let f = if on {
            f & !VRING_USED_F_NO_NOTIFY
        } else {
            f | VRING_USED_F_NO_NOTIFY
        };
        let _ = mem.store_u16(a, f);
    }

    /// Announces every avail entry from `last_pushed` on, then re-arms
    /// kicks and re-checks, so no entry is left behind.
    fn push<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), MemoryError> {
        let size = self.layout.size;
        self.repush = false;
        for _ in 0..64 {
            let avail = Wrapping(mem.load_u16(self.layout.avail_idx())?);
            if (avail - self.last_pushed).0 > size {
                // A broken guest: announce one ring's worth; the server
                // validates everything anyway.
                self.last_pushed = avail - Wrapping(size);
            }
            while self.last_pushed != avail {
                let mut d = Doorbell {
                    avail_idx: avail.0,
                    entries: self.spare.lists.pop().unwrap_or_default(),
                };
                let mut bytes = DOORBELL_HEADER;
                while self.last_pushed != avail {
                    let e = self.copy_chain(mem, self.last_pushed.0);
                    let sz = doorbell_entry_size(
                        e.descs.len(),
                        e.inline.len(),
                        e.inline.iter().map(|(_, b)| b.len()).sum(),
                    );
                    if bytes + sz > MAX_MSG && !d.entries.is_empty() {
                        break;
                    }
                    bytes += sz;
                    d.entries.push(e);
                    self.last_pushed += 1;
                }
                // Announce only what this doorbell carries.
                d.avail_idx = self.last_pushed.0;
                self.actions.push_back(Action::Send(Message::Doorbell(d)));
                self.stats.doorbells.fetch_add(1, Relaxed);
            }
            if self.features.event_idx {
                let _ = mem.store_u16(self.layout.avail_event(), avail.0);
            }
            fence(Ordering::SeqCst);
            let again = mem.load_u16(self.layout.avail_idx()).unwrap_or(avail.0);
            if again == avail.0 {
                return Ok(());
            }
        }
        // Still moving: the guest may have read the old avail_event and
        // will not kick for what it published since. Come back unprompted.
        self.repush = true;
        Ok(())
    }

    /// Copies a chain's descriptors (not validated: the server does that).
    fn copy_chain<M: GuestMemory + ?Sized>(&mut self, mem: &M, pos: u16) -> DoorbellEntry {
        let max = self.cfg.chain_copy;
        let head = mem.load_u16(self.layout.avail_ring(pos)).unwrap_or(0);
        let mut e = self.spare.entries.pop().unwrap_or_default();
        e.pos = pos;
        e.head = head;
        e.descs.clear();
        e.inline.clear();
        let mut idx = head;
        while e.descs.len() < max && idx < self.layout.size {
            let gpa = self.layout.desc_addr(idx);
            let mut b = [0u8; 16];
            if mem.read(gpa, &mut b).is_err() {
                break;
            }
            e.descs.push((gpa, b));
            let d = Descriptor::from_bytes(&b);
            if d.is_indirect() {
                let n = (d.len as usize / 16).min(max.saturating_sub(e.descs.len()));
                for i in 0..n {
                    let ga = d.addr.wrapping_add(16 * i as u64);
                    let mut t = [0u8; 16];
                    if mem.read(ga, &mut t).is_err() {
                        break;
                    }
                    e.descs.push((ga, t));
                }
                break;
            }
            if !d.has_next() {
                break;
            }
            idx = d.next;
        }
        self.copy_inline(mem, &mut e);
        e
    }

    /// Copies the chain's readable segments inline (see
    /// [`HostQueueConfig::inline_max`]). Unvalidated, like the descriptors:
    /// the server uses a copy only for a segment it validated and that the
    /// copy covers exactly, and otherwise READs.
    fn copy_inline<M: GuestMemory + ?Sized>(&mut self, mem: &M, e: &mut DoorbellEntry) {
        let readable = || {
            e.descs
                .iter()
                .map(|(_, b)| Descriptor::from_bytes(b))
                .filter(|d| !d.is_indirect() && !d.is_write_only() && d.len > 0)
        };
        // The payload is what is not header-sized; headers always go.
        let payload: u64 = readable()
            .filter(|d| d.len > INLINE_HEADER)
            .map(|d| u64::from(d.len))
            .sum();
        let whole = payload <= self.cfg.inline_max as u64;
        let mut inline = std::mem::take(&mut e.inline);
        let mut bytes = 0usize;
        for d in readable() {
            if !whole && d.len > INLINE_HEADER {
                continue;
            }
            let len = d.len as usize;
            // Never more than a message can carry beside its descriptors,
            // whatever the guest says.
            if bytes + len > MAX_MSG - 1024 {
                break;
            }
            let mut b = self.spare.bytes.pop().unwrap_or_default();
            b.clear();
            b.resize(len, 0);
            if mem.read(d.addr, &mut b).is_ok() {
                bytes += len;
                inline.push((d.addr, b));
            } else {
                self.spare.bytes.push(b);
            }
        }
        e.inline = inline;
    }
}
