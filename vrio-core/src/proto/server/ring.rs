//! What every remote queue kind shares: one guest ring reached through the
//! fabric. The endpoint and its registered staging and receive buffers,
//! ring indices, doorbell intake (or remote polling, and the adaptive
//! switch between them), chain walking over a [`Shadow`] with fetches,
//! and posting waves of one-sided requests whose completions are drained
//! without blocking. `RemoteQueue` (`remote_queue.rs`: request/reply
//! devices, virtio-blk and virtio-net TX) and `RemoteRxQueue` (`net_rx.rs`:
//! virtio-net RX) add their own batch logic on top; plain names rather than
//! links, so this lower layer does not point back at its users.

use std::cell::UnsafeCell;
use std::num::Wrapping;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_rdma::{Completion, Opcode, RecvRequest, SendRequest, Sge, WcStatus};

use crate::proto::config::RemoteQueueConfig;
use crate::proto::queue_error::RemoteQueueError;
use crate::proto::shadow::Shadow;
use crate::proto::staging::StagingBuffer;
use crate::proto::stats::RemoteStats;
use crate::proto::wire::{
    Attach, DoorbellEntry, Message, NotifyMode, SetMode, WireRegion, EARLY_IMM, EARLY_SPAN_MAX,
    EARLY_SPAN_SHIFT, MAX_MSG, NOTIFY_IMM, PUBLISH_IMM,
};
use crate::sidecore::{PollOutcome, QueueFailure};
use crate::virtio::memory::{GuestRegion, MemoryError, MemoryMap};
use crate::virtio::ring::{
    ChainError, DescriptorChain, QueueError, RingFeatures, RingLayout, Walker,
};

/// Offsets inside the staging buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Areas {
    pub desc: usize,
    pub avail: usize,
    pub used: usize,
    pub fetch: usize,
    pub send: usize,
    /// The used index the server WRITEs, and the suppression word it READs
    /// back (see [`ServerRing::queue_used`]).
    pub notify: usize,
    pub data: usize,
}

const FETCH_MAX: usize = 64 << 10;
/// The smallest batch whose interrupt is asked for early. A batch of one
/// is a guest with one request out, which finds its completion itself as
/// often as not (it looks at the ring once more before it sleeps): an
/// early request then wakes the VM host for nothing and, on a busy host,
/// delays the guest that was about to find it. Measured on `shm` at 1 x 1:
/// p50 7 us without, 26 us with; at 16 x 32, 29% more requests/s with.
const EARLY_MIN_BATCH: u16 = 2;
/// Batches of one whose guest, as the READ behind used.idx found it, was
/// already waiting for its interrupt, in a row, before batches of one are
/// asked early too. Such a guest sleeps until the interrupt, so the READ
/// only adds a round trip to its latency: over `soft`, two more one-way
/// trips through both sides' fabric threads (at 4 x 1 the p50 fell from
/// 258 to 176 us without them). The synthetic guest at
/// 1 x 1 over `shm` is rarely waiting yet (4-6% of its batches), so four
/// in a row keeps the early request away from it.
pub(crate) const SLEEPER_STREAK: u8 = 4;
/// Control messages (SET_MODE, QUIESCED, the ATTACH reply) in flight at
/// once; more wait in order until a slot's SEND has completed.
const MSG_SLOTS: usize = 4;

/// Direction of a one-sided request, seen from the server.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dir {
    Read,
    Write,
    WriteImm(u32),
}

/// Where a queue's batch is: waiting for nothing, for a READ its intake
/// needs (the avail ring, descriptors), for its READ wave, or for its reply
/// wave (the waves name the signalled work request that ends them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Idle,
    Intake,
    Reading(u64),
    Writing(u64),
}
const RECV_TAG: u64 = 1 << 63;
/// Remote polls that keep reading the descriptor table after the last one
/// that found work: a guest refills its queue a little after its
/// completions (many polls at shm speed), and an idle queue should still
/// drop to one READ a poll within a few milliseconds.
const TABLE_POLLS: u16 = 256;
/// ... and for at least this long after it: a count of polls alone runs
/// out sooner the cheaper a poll is, while a guest on a loaded host
/// refills its queue as late as ever.
const TABLE_WINDOW: Duration = Duration::from_millis(5);

/// Receives posted per queue: one per ring slot, at most [`MAX_RECVS`].
/// The agent keeps at most 64 messages in flight; a peer that sends more
/// than the server has posted fails its own queue, and a huge ring no
/// longer buys a peer megabytes of server memory.
fn recv_slots(size: u16) -> usize {
    usize::from(size).min(MAX_RECVS)
}
/// See [`recv_slots`].
pub(crate) const MAX_RECVS: usize = 128;

fn align(x: usize) -> usize {
    x.div_ceil(4096) * 4096
}

/// What [`ServerRing::intake`] got.
pub(crate) enum Intake {
    /// No new requests.
    Nothing,
    /// A READ (of the avail ring, or of descriptors) is in flight: call
    /// again once it completed.
    Waiting,
    /// The batch's chains are in the caller's list, walked and validated
    /// (or refused); `rtts` round trips were spent on learning and fetching.
    Ready { rtts: u64 },
}

/// A READ of guest bytes into the shadow, in flight.
#[derive(Debug, Clone, Copy)]
struct Fetch {
    wr: u64,
    off: usize,
    gpa: u64,
    len: usize,
}

/// How far one chain's walk has got.
#[derive(Debug, Default)]
struct WalkState {
    fetches: u32,
    table_fetched: bool,
    fetch: Option<Fetch>,
    rtts: u64,
}

/// How far a batch's intake has got: learning of new avail entries (maybe
/// waiting for a READ of the avail ring), then walking their chains one
/// after another (maybe waiting for a fetch). Nothing here blocks: each
/// wait returns to the sidecore, which serves its other queues meanwhile.
#[derive(Debug, Default)]
struct IntakeState {
    /// A READ of the avail ring in flight.
    avail_wr: Option<u64>,
    /// This intake has read the avail ring already.
    avail_read: bool,
    /// ...and the descriptor table right after it.
    table: bool,
    /// Round trips spent learning.
    learn_rtts: u64,
    /// Learned heads, in ring order, once learning is done.
    heads: Option<Vec<u16>>,
    /// The next of `heads` to walk.
    next: usize,
    /// The chain being walked while a fetch is in flight.
    chain: Option<DescriptorChain>,
    walk: WalkState,
    /// The most round trips one chain's walk took.
    walk_rtts: u64,
}

/// What every remote queue kind shares on the I/O server: one guest ring
/// reached through the fabric (see the module docs).
pub struct ServerRing {
    /// Keys of the two buffers, once the runtime has registered them.
    lkey_staging: u32,
    lkey_recv: u32,
    /// Work requests and receives to post, in order; the runtime posts
    /// them after each call.
    out_sends: Vec<SendRequest>,
    out_recvs: Vec<RecvRequest>,
    /// The time, as the runtime last said.
    now: Instant,
    pub(crate) staging: UnsafeCell<StagingBuffer>,
    recv: StagingBuffer,
    pub(crate) name: String,
    /// The device the agent attached the queue for.
    device_id: u64,
    pub(crate) cfg: RemoteQueueConfig,
    pub(crate) areas: Areas,
    pub(crate) mode: NotifyMode,
    pub(crate) polling_remote: bool,
    /// Adaptive: the sidecore's measured advice (remote polls or
    /// doorbells), once it gave one; until then the queue's own
    /// heuristic (busy batches) decides.
    pub(crate) advice: Option<bool>,
    /// Advised to doorbells while taking a batch: switch once it is taken.
    leave_polls: bool,
    pub(crate) layout: RingLayout,
    features: RingFeatures,
    map: MemoryMap,
    regions: Vec<WireRegion>,
    pub(crate) next_avail: Wrapping<u16>,
    pub(crate) next_used: Wrapping<u16>,
    pub(crate) known_avail: Wrapping<u16>,
    pending: Vec<Option<DoorbellEntry>>,
    /// The last doorbell decoded, and entries done with: their buffers
    /// are reused, so a stream of doorbells allocates nothing.
    doorbell: crate::proto::wire::Doorbell,
    spare_entries: Vec<DoorbellEntry>,
    /// The learned heads' buffer, reused from batch to batch.
    spare_heads: Vec<u16>,
    walker: Walker,
    shadow: Shadow,
    pub(crate) stage_started: Instant,
    /// Highest signalled work request known complete.
    pub(crate) done_wr: u64,
    /// Last work request posted.
    posted_wr: u64,
    wrs: Vec<SendRequest>,
    msg: Vec<u8>,
    wr_seq: u64,
    busy_run: u32,
    idle_run: u32,
    pub(crate) stats: Arc<RemoteStats>,
    /// The agent asked for the queue back: finish the batch, start no other.
    pub(crate) quiescing: bool,
    /// The QUIESCED answer: not yet posted (Some(None)), or its SEND.
    handing_back: Option<Option<u64>>,
    /// Control messages waiting for a free slot, in order.
    msgs: std::collections::VecDeque<Message>,
    /// The last work request posted from each message slot.
    msg_wr: [u64; MSG_SLOTS],
    /// Work requests waiting for room in the send queue, in order.
    backlog: Vec<SendRequest>,
    intake: IntakeState,
    /// The used indices (before, after) of the reply wave in flight, whose
    /// interrupt is decided once the wave's READ of the guest's
    /// suppression word is back.
    notify_span: Option<(u16, u16)>,
    /// The guest's suppression word as the last reply wave read it, and
    /// the used index that batch started at: it predicts the next batch's
    /// (see [`ServerRing::queue_used`]).
    last_word: Option<(u16, u16)>,
    /// The reply wave in flight asked for its interrupt early.
    asked_early: bool,
    /// Batches of one in a row whose guest already waited for the
    /// interrupt when the READ behind the index ran (to
    /// [`SLEEPER_STREAK`]).
    sleeper_streak: u8,
    /// The agent logs dirty pages (SET_LOG): batches leave used.idx, and
    /// the interrupt, to it.
    logging: bool,
    /// The reply wave in flight was queued while logging.
    span_logged: bool,
    scratch: Vec<u8>,
    /// The avail READ in flight brings the descriptor table too.
    table_read: bool,
    /// Polls left that read the table too: refilled when a poll finds work.
    busy_polls: u16,
    /// When a poll last found work (the table is read for
    /// [`TABLE_WINDOW`] after it, whatever the count of polls).
    found_at: Option<Instant>,
    /// Why the queue stopped: every later poll reports it again.
    failed: Option<RemoteQueueError>,
}

impl ServerRing {
    /// The server side of a queue from the agent's ATTACH, named `name`.
    /// Its staging and receive buffers ([`ServerRing::buffers`]) must be
    /// registered, and [`ServerRing::start`] called with their keys, before
    /// it serves.
    pub fn new(
        attach: &Attach,
        cfg: RemoteQueueConfig,
        stats: Arc<RemoteStats>,
        name: String,
        now: Instant,
    ) -> Result<Self, RemoteQueueError> {
        let regions = {
            let mut r = attach.regions.clone();
            r.sort_by_key(|w| w.gpa);
            r
        };
        let map = MemoryMap::new(
            regions
                .iter()
                .map(|w| GuestRegion {
                    gpa: w.gpa,
                    len: w.remote.len,
                })
                .collect(),
        )?;
        let layout = attach.layout;
        for (a, n) in [
            (layout.desc, layout.desc_table_bytes()),
            (layout.avail, layout.avail_bytes()),
            (layout.used, layout.used_bytes()),
        ] {
            map.check(a, n)?;
        }
        let size = usize::from(layout.size);
        let mut o = 0;
        let desc = o;
        o = align(o + 16 * size);
        let avail = o;
        o = align(o + 6 + 2 * size);
        let used = o;
        o = align(o + 8 * size);
        let fetch = o;
        o = align(o + FETCH_MAX);
        let send = o;
        o = align(o + MSG_SLOTS * MAX_MSG);
        let notify = o;
        o = align(o + 16);
        let data = o;
        let data_len = cfg.max_request * cfg.max_batch.max(1);
        let areas = Areas {
            desc,
            avail,
            used,
            fetch,
            send,
            notify,
            data,
        };
        let staging = StagingBuffer::new(data + data_len)?;
        let recv = StagingBuffer::new(recv_slots(layout.size) * MAX_MSG)?;
        Ok(Self {
            lkey_staging: 0,
            lkey_recv: 0,
            out_sends: Vec::new(),
            out_recvs: Vec::new(),
            now,
            staging: UnsafeCell::new(staging),
            recv,
            name,
            cfg,
            areas,
            mode: attach.mode,
            polling_remote: attach.mode == NotifyMode::RemotePoll,
            advice: None,
            leave_polls: false,
            layout,
            features: attach.features,
            map,
            regions,
            next_avail: Wrapping(attach.start),
            next_used: Wrapping(attach.start),
            known_avail: Wrapping(attach.start),
            pending: vec![None; size],
            doorbell: crate::proto::wire::Doorbell::default(),
            spare_entries: Vec::new(),
            spare_heads: Vec::new(),
            walker: Walker::new(),
            shadow: {
                let mut s = Shadow::default();
                s.set_table(layout.desc, layout.size);
                s
            },
            stage_started: now,
            done_wr: 0,
            posted_wr: 0,
            wrs: Vec::new(),
            msg: Vec::with_capacity(MAX_MSG),
            wr_seq: 0,
            busy_run: 0,
            idle_run: 0,
            stats,
            quiescing: false,
            handing_back: None,
            msgs: std::collections::VecDeque::new(),
            msg_wr: [0; MSG_SLOTS],
            backlog: Vec::new(),
            intake: IntakeState::default(),
            notify_span: None,
            last_word: None,
            asked_early: false,
            sleeper_streak: 0,
            logging: attach.logging,
            span_logged: false,
            table_read: false,
            busy_polls: 0,
            found_at: None,
            scratch: Vec::new(),
            failed: None,
            device_id: attach.device_id,
        })
    }

    /// The device the agent attached the queue for.
    pub fn device_id(&self) -> u64 {
        self.device_id
    }

    /// [`ServerRing::new`], named as the server names the queue.
    pub fn for_attach(
        attach: &Attach,
        cfg: RemoteQueueConfig,
        stats: Arc<RemoteStats>,
        now: Instant,
    ) -> Result<Self, RemoteQueueError> {
        let name = crate::proto::queue_name(attach.device_id, attach.queue);
        Self::new(attach, cfg, stats, name, now)
    }

    /// The staging and receive buffers, (address, length), for the runtime
    /// to register (local access only: the server's own memory).
    pub fn buffers(&self) -> [(*mut u8, usize); 2] {
        // SAFETY: reading the pointer and length only; no reference to the
        // contents is created.
        let staging = unsafe { &*self.staging.get() };
        [
            (staging.as_ptr(), staging.len()),
            (self.recv.as_ptr(), self.recv.len()),
        ]
    }

    /// The buffers are registered under these keys: post the receives
    /// the agent's doorbells land in.
    pub fn start(&mut self, lkey_staging: u32, lkey_recv: u32) {
        self.lkey_staging = lkey_staging;
        self.lkey_recv = lkey_recv;
        for i in 0..recv_slots(self.layout.size) {
            let wr = self.recv_wr(i);
            self.out_recvs.push(wr);
        }
    }

    /// The time now (the runtime says it before each call).
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// The time the runtime last said.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// What to post: work requests for the send queue, then receives. The
    /// runtime posts them in this order and then calls
    /// [`ServerRing::clear_outbox`].
    pub fn outbox(&self) -> (&[SendRequest], &[RecvRequest]) {
        (&self.out_sends, &self.out_recvs)
    }

    /// The outbox was posted.
    pub fn clear_outbox(&mut self) {
        self.out_sends.clear();
        self.out_recvs.clear();
    }

    /// Answers the agent's ATTACH: the device's config space and the
    /// feature bits the server imposes.
    pub(crate) fn reply_attach(
        &mut self,
        config: Vec<u8>,
        features: u64,
    ) -> Result<(), RemoteQueueError> {
        self.send(Message::AttachReply(crate::proto::wire::AttachReply {
            status: 0,
            config,
            features,
        }))
        .map(|_| ())
    }

    /// The next avail index the queue serves (== next used when idle).
    pub(crate) fn position(&self) -> (u16, u16) {
        (self.next_avail.0, self.next_used.0)
    }

    pub(crate) fn recv_wr(&self, i: usize) -> RecvRequest {
        RecvRequest {
            wr_id: RECV_TAG | i as u64,
            local: Sge {
                lkey: self.lkey_recv,
                addr: self.recv.addr() + (i * MAX_MSG) as u64,
                len: MAX_MSG as u32,
            },
        }
    }

    pub(crate) fn staging(&mut self) -> &mut StagingBuffer {
        self.staging.get_mut()
    }

    pub(crate) fn sge(&self, off: usize, len: usize) -> Sge {
        Sge {
            lkey: self.lkey_staging,
            addr: self.staging_addr() + off as u64,
            len: len as u32,
        }
    }

    pub(crate) fn staging_addr(&self) -> u64 {
        // SAFETY: reading the pointer value only; no reference to the
        // contents is created.
        unsafe { &*self.staging.get() }.addr()
    }

    /// Remote address and rkey of a validated guest range.
    pub(crate) fn translate(&self, gpa: u64, len: u64) -> Result<(u64, u32), MemoryError> {
        self.map.check(gpa, len)?;
        let (i, r) = self
            .map
            .region_of(gpa)
            .ok_or(MemoryError::OutOfBounds { addr: gpa, len })?;
        let w = &self.regions[i];
        Ok((w.remote.addr + (gpa - r.gpa), w.remote.rkey))
    }

    /// Queues one one-sided request between staging offset `off` and guest
    /// range `gpa..gpa+len` (validated against the guest's map first).
    pub(crate) fn queue_wr(
        &mut self,
        dir: Dir,
        gpa: u64,
        off: usize,
        len: usize,
    ) -> Result<(), MemoryError> {
        let (remote_addr, rkey) = self.translate(gpa, len as u64)?;
        let opcode = match dir {
            Dir::Read => Opcode::Read { remote_addr, rkey },
            Dir::Write => Opcode::Write { remote_addr, rkey },
            Dir::WriteImm(imm) => Opcode::WriteWithImm {
                remote_addr,
                rkey,
                imm,
            },
        };
        let wr_id = self.next_wr();
        let local = self.sge(off, len);
        self.wrs.push(SendRequest {
            wr_id,
            opcode,
            local,
            signaled: false,
        });
        Ok(())
    }

    pub(crate) fn next_wr(&mut self) -> u64 {
        self.wr_seq += 1;
        self.wr_seq
    }

    /// Handles completions the runtime polled, in order.
    pub fn on_completions(&mut self, cqes: &[Completion]) -> Result<(), RemoteQueueError> {
        for c in cqes {
            if !c.status.is_ok() {
                self.stats.completion_errors.fetch_add(1, Relaxed);
                return Err(match c.status {
                    WcStatus::Flushed | WcStatus::RetryExceeded => {
                        RemoteQueueError::Disconnected(c.status)
                    }
                    status => RemoteQueueError::Completion {
                        status,
                        wr_id: c.wr_id,
                    },
                });
            }
            if c.wr_id & RECV_TAG != 0 {
                self.on_recv((c.wr_id & !RECV_TAG) as usize, c.byte_len as usize)?;
            } else {
                // RC completes in order: a signalled request done means
                // every earlier one is done too.
                self.done_wr = self.done_wr.max(c.wr_id);
            }
        }
        // Completions made room: post what waited.
        self.post_backlog()?;
        self.flush_msgs()?;
        Ok(())
    }

    pub(crate) fn on_recv(&mut self, i: usize, len: usize) -> Result<(), RemoteQueueError> {
        if i >= recv_slots(self.layout.size) || len > MAX_MSG {
            return Err(RemoteQueueError::RecvOutOfRange);
        }
        let mut buf = std::mem::take(&mut self.msg);
        buf.resize(len, 0);
        let mut d = std::mem::take(&mut self.doorbell);
        let r = self.recv.get(i * MAX_MSG, &mut buf);
        let doorbell = r.map_err(RemoteQueueError::from).and_then(|_| {
            Message::decode_doorbell_into(&buf, &mut d, &mut self.spare_entries)
                .map_err(RemoteQueueError::BadMessage)
        });
        let decoded = match doorbell {
            Ok(true) => Ok(None),
            Ok(false) => Message::decode(&buf)
                .map(Some)
                .map_err(RemoteQueueError::BadMessage),
            Err(e) => Err(e),
        };
        self.msg = buf;
        let wr = self.recv_wr(i);
        self.out_recvs.push(wr);
        let r = match decoded? {
            None => self.on_doorbell(&mut d),
            Some(m) => self.on_message(m),
        };
        self.doorbell = d;
        r
    }

    /// Takes in a DOORBELL's entries (their buffers go back to the spares
    /// once the walk has used them).
    fn on_doorbell(
        &mut self,
        d: &mut crate::proto::wire::Doorbell,
    ) -> Result<(), RemoteQueueError> {
        self.stats.doorbells.fetch_add(1, Relaxed);
        let idx = Wrapping(d.avail_idx);
        if (idx - self.next_avail).0 > self.layout.size {
            // Behind us rather than too far ahead: a doorbell the
            // agent built before it took in SET_MODE(poll), overtaken
            // by a remote poll that already took its entries (and
            // more). It carries nothing new; it is not a broken ring.
            if (self.next_avail - idx).0 <= self.layout.size {
                tracing::debug!(queue = %self.name, idx = idx.0, next = self.next_avail.0, "stale doorbell ignored");
                return Ok(());
            }
            return Err(self.avail_jump(idx).into());
        }
        if (idx - self.next_avail).0 > (self.known_avail - self.next_avail).0 {
            self.known_avail = idx;
        }
        for e in d.entries.drain(..) {
            // Entries already consumed, or not yet announced, are stale.
            let ahead = (Wrapping(e.pos) - self.next_avail).0;
            if ahead < (idx - self.next_avail).0 {
                let slot = usize::from(e.pos % self.layout.size);
                if let Some(old) = self.pending[slot].replace(e) {
                    self.recycle(old);
                }
            } else {
                self.recycle(e);
            }
        }
        Ok(())
    }

    /// Keeps `e`'s buffers for a later doorbell, up to two rings' worth
    /// (a peer's odd doorbell must not pin memory forever).
    fn recycle(&mut self, e: DoorbellEntry) {
        if self.spare_entries.len() < 2 * usize::from(self.layout.size) {
            self.spare_entries.push(e);
        }
    }

    /// Any message but a DOORBELL.
    fn on_message(&mut self, m: Message) -> Result<(), RemoteQueueError> {
        match m {
            Message::Doorbell(mut d) => self.on_doorbell(&mut d),
            Message::Quiesce => {
                self.quiescing = true;
                Ok(())
            }
            // Taken between batches (a batch queues and posts its reply
            // wave in one go), so the answer goes out behind every WRITE of
            // a batch published the old way: when the agent reads it, those
            // are in guest memory.
            Message::SetLog(on) => {
                self.logging = on;
                tracing::info!(queue = %self.name, logging = on, next_used = self.next_used.0, "dirty logging switched by the VM host");
                self.send(Message::Logging(crate::proto::wire::Logging {
                    on,
                    next_used: self.next_used.0,
                }))?;
                Ok(())
            }
            other => Err(RemoteQueueError::UnexpectedMessage(Box::new(other))),
        }
    }

    /// The batch in flight has landed: tell the agent where we stopped and
    /// retire once that answer is out. Idle means next avail == next used
    /// (in-order service).
    pub(crate) fn hand_back(&mut self) -> Result<PollOutcome, RemoteQueueError> {
        let waiting = PollOutcome {
            pending: 1,
            ..PollOutcome::default()
        };
        let next = self.next_used.0;
        match self.handing_back {
            None => {
                // Counted first: the agent may close the link as soon as it
                // reads the answer, before our send completes.
                self.stats.handovers.fetch_add(1, Relaxed);
                let wr = self.send(Message::Quiesced(crate::proto::wire::Quiesced { next }))?;
                self.handing_back = Some(wr);
                Ok(waiting)
            }
            // Still waiting for a message slot.
            Some(None) => {
                self.flush_msgs()?;
                Ok(waiting)
            }
            Some(Some(wr)) if self.in_flight(wr)? => Ok(waiting),
            Some(Some(_)) => {
                tracing::info!(queue = %self.name, next, "queue handed back to the VM host");
                Err(RemoteQueueError::HandedBack { next })
            }
        }
    }

    /// Sends a control message without waiting: posted at once if a slot is
    /// free (returns its work request), else queued behind the others.
    pub(crate) fn send(&mut self, m: Message) -> Result<Option<u64>, RemoteQueueError> {
        self.msgs.push_back(m);
        self.flush_msgs()
    }

    /// Posts queued control messages while slots are free; returns the
    /// work request of the last one posted.
    fn flush_msgs(&mut self) -> Result<Option<u64>, RemoteQueueError> {
        let mut last = None;
        while !self.msgs.is_empty() {
            let Some(slot) = (0..MSG_SLOTS).find(|&i| self.msg_wr[i] <= self.done_wr) else {
                break;
            };
            let Some(m) = self.msgs.pop_front() else {
                break;
            };
            let mut buf = std::mem::take(&mut self.msg);
            let r = m.encode(&mut buf).map_err(RemoteQueueError::Encode);
            let off = self.areas.send + slot * MAX_MSG;
            let r = r.and_then(|_| {
                self.staging()
                    .put(off, &buf)
                    .map_err(RemoteQueueError::from)
            });
            let len = buf.len();
            self.msg = buf;
            r?;
            let wr_id = self.next_wr();
            let local = self.sge(off, len);
            self.msg_wr[slot] = wr_id;
            self.stats.sends.fetch_add(1, Relaxed);
            self.backlog.push(SendRequest {
                wr_id,
                opcode: Opcode::Send,
                local,
                // Signalled: the slot is free again once it completes.
                signaled: true,
            });
            last = Some(wr_id);
        }
        if last.is_some() {
            self.stage_started = self.now;
            self.post_backlog()?;
        }
        Ok(last)
    }

    /// Posts one wave that reads the avail ring (flags, idx, ring) and,
    /// while polls find work, the descriptor table after it, so the chains
    /// it finds walk without a second round trip. The ring is read
    /// first: RC executes the READs in order, so every descriptor of an
    /// entry the ring shows (the guest writes them before it publishes the
    /// entry) is in the table read after it. After [`TABLE_POLLS`] empty
    /// polls and [`TABLE_WINDOW`] the table READ stops: an idle queue
    /// costs one READ a poll.
    fn post_avail_read(&mut self) -> Result<u64, RemoteQueueError> {
        let l = self.layout;
        let ring = 4 + 2 * usize::from(l.size);
        self.queue_wr(Dir::Read, l.avail, self.areas.avail, ring)?;
        let recent = self
            .found_at
            .is_some_and(|t| self.now.saturating_duration_since(t) < TABLE_WINDOW);
        self.table_read = self.busy_polls > 0 || recent;
        if self.table_read {
            let table = l.desc_table_bytes() as usize;
            self.queue_wr(Dir::Read, l.desc, self.areas.desc, table)?;
        }
        self.stats.remote_polls.fetch_add(1, Relaxed);
        Ok(self.post_wave()?.unwrap_or(0))
    }

    /// Takes in what the READ of the avail ring brought.
    fn apply_avail_read(&mut self) -> Result<(), RemoteQueueError> {
        let mut b = [0u8; 2];
        let base = self.areas.avail;
        self.staging().get(base + 2, &mut b)?;
        let idx = Wrapping(u16::from_le_bytes(b));
        if (idx - self.next_avail).0 > self.layout.size {
            return Err(self.avail_jump(idx).into());
        }
        self.known_avail = idx;
        let mut p = self.next_avail;
        while p != idx {
            let slot = usize::from(p.0 % self.layout.size);
            self.staging().get(base + 4 + 2 * slot, &mut b)?;
            let head = u16::from_le_bytes(b);
            // A doorbell's copy of the same entry stays: it saves READs.
            let keep = self.pending[slot]
                .as_ref()
                .is_some_and(|e| e.pos == p.0 && e.head == head);
            if !keep {
                let mut e = self.spare_entries.pop().unwrap_or_default();
                e.pos = p.0;
                e.head = head;
                e.descs.clear();
                e.inline.clear();
                if let Some(old) = self.pending[slot].replace(e) {
                    self.recycle(old);
                }
            }
            p += 1;
        }
        Ok(())
    }

    /// Advances one chain's walk: walks over the shadow, and when it lacks
    /// bytes posts their READ and returns None (call again once it is
    /// done). The outer error is the queue's (the fabric failed); the inner
    /// one the chain's.
    #[allow(clippy::type_complexity)]
    fn walk_step(
        &mut self,
        head: u16,
        chain: &mut DescriptorChain,
        ws: &mut WalkState,
    ) -> Result<Option<Result<(), ChainError>>, RemoteQueueError> {
        if let Some(f) = ws.fetch {
            if self.in_flight(f.wr)? {
                return Ok(None);
            }
            ws.fetch = None;
            ws.rtts += 1;
            let mut tmp = std::mem::take(&mut self.scratch);
            tmp.resize(f.len, 0);
            let r = self.staging().get(f.off, &mut tmp);
            if r.is_ok() {
                self.shadow.insert(f.gpa, &tmp);
            }
            self.scratch = tmp;
            if let Err(e) = r {
                return Ok(Some(Err(ChainError::Memory(e))));
            }
        }
        if ws.fetches > self.cfg.max_fetches {
            return Ok(Some(Err(ChainError::TooLong {
                limit: self.layout.size,
            })));
        }
        let r = self.walker.walk(
            &self.shadow,
            &self.map,
            &self.layout,
            self.features,
            head,
            chain,
        );
        let Err(e) = &r else { return Ok(Some(r)) };
        let Some((addr, len)) = e.needs_fetch() else {
            return Ok(Some(r));
        };
        let l = self.layout;
        let in_table = addr >= l.desc && addr < l.desc + l.desc_table_bytes();
        let (gpa, len, whole) = if in_table && !ws.table_fetched {
            ws.table_fetched = true;
            (l.desc, l.desc_table_bytes(), true)
        } else if let ChainError::BadIndirectTable { addr, len, .. } = e {
            (*addr, u64::from(*len), false)
        } else {
            (addr, len, false)
        };
        let (off, max) = if whole {
            (self.areas.desc, 16 * usize::from(self.layout.size))
        } else {
            (self.areas.fetch, FETCH_MAX)
        };
        if len as usize > max {
            return Ok(Some(Err(ChainError::IndirectTooLarge {
                entries: (len / 16) as u32,
                limit: self.layout.size,
            })));
        }
        if let Err(source) = self.queue_wr(Dir::Read, gpa, off, len as usize) {
            return Ok(Some(Err(ChainError::BadBuffer {
                addr: gpa,
                len: len as u32,
                source,
            })));
        }
        self.stats.fetches.fetch_add(1, Relaxed);
        ws.fetches += 1;
        let wr = self.post_wave()?.unwrap_or(0);
        ws.fetch = Some(Fetch {
            wr,
            off,
            gpa,
            len: len as usize,
        });
        Ok(None)
    }

    /// Posts a wave without waiting; returns its signalled target. What the
    /// send queue has no room for waits in the backlog, in order, and goes
    /// out as completions make room (a batch of requests with many segments
    /// each can outgrow the queue).
    pub(crate) fn post_wave(&mut self) -> Result<Option<u64>, RemoteQueueError> {
        let Some(target) = self.wrs.last().map(|w| w.wr_id) else {
            return Ok(None);
        };
        self.count_wave();
        if let Some(last) = self.wrs.last_mut() {
            last.signaled = true;
        }
        self.backlog.append(&mut self.wrs);
        self.post_backlog()?;
        self.stage_started = self.now;
        Ok(Some(target))
    }

    /// Counts the wave about to go out, by kind and bytes.
    fn count_wave(&self) {
        let (mut reads, mut writes, mut imms, mut rb, mut wb) = (0u64, 0u64, 0u64, 0u64, 0u64);
        for w in &self.wrs {
            let len = u64::from(w.local.len);
            match w.opcode {
                Opcode::Read { .. } => {
                    reads += 1;
                    rb += len;
                }
                Opcode::Write { .. } => {
                    writes += 1;
                    wb += len;
                }
                Opcode::WriteWithImm { .. } => {
                    imms += 1;
                    wb += len;
                }
                _ => {}
            }
        }
        let st = &self.stats;
        st.fabric_ops.fetch_add(self.wrs.len() as u64, Relaxed);
        for (c, n) in [
            (&st.reads, reads),
            (&st.writes, writes),
            (&st.write_imms, imms),
            (&st.read_bytes, rb),
            (&st.write_bytes, wb),
        ] {
            if n > 0 {
                c.fetch_add(n, Relaxed);
            }
        }
    }

    /// Posts as much of the backlog as the send queue has room for. Work
    /// requests complete in order, so everything up to the last completed
    /// signalled one is gone; counting the rest as in flight may
    /// overestimate, never undercount. Each part posted ends signalled, so
    /// that its completion makes room for the next.
    fn post_backlog(&mut self) -> Result<(), RemoteQueueError> {
        let depth = self.cfg.send_depth.max(1) as u64;
        while !self.backlog.is_empty() {
            let in_flight = self.posted_wr.saturating_sub(self.done_wr);
            if in_flight >= depth {
                tracing::debug!(queue = %self.name, left = self.backlog.len(), "send queue full: the rest of the wave waits");
                break;
            }
            let n = ((depth - in_flight) as usize).min(self.backlog.len());
            self.backlog[n - 1].signaled = true;
            self.out_sends.extend_from_slice(&self.backlog[..n]);
            self.posted_wr = self.backlog[n - 1].wr_id;
            self.backlog.drain(..n);
        }
        Ok(())
    }

    /// Adaptive mode: remote polling while busy, doorbells while quiet.
    pub(crate) fn adapt(&mut self, n: usize) -> Result<(), RemoteQueueError> {
        if self.mode != NotifyMode::Adaptive {
            return Ok(());
        }
        if let Some(remote) = self.advice {
            return self.follow_advice(remote, n);
        }
        if self.polling_remote {
            if n == 0 {
                self.idle_run += 1;
                if self.idle_run >= self.cfg.idle_polls {
                    self.switch_to_doorbells()?;
                }
            } else {
                self.idle_run = 0;
            }
        } else if n >= self.cfg.busy_batch {
            self.busy_run += 1;
            if self.busy_run >= self.cfg.busy_polls {
                self.start_remote_polls()?;
            }
        } else {
            self.busy_run = 0;
        }
        Ok(())
    }

    /// Adaptive with the sidecore's advice: remote polls while the queue
    /// has work, if they are the cheaper way; doorbells otherwise, and
    /// after `idle_polls` empty polls (an idle queue costs nothing with
    /// doorbells, a READ a poll without).
    fn follow_advice(&mut self, remote: bool, n: usize) -> Result<(), RemoteQueueError> {
        if self.polling_remote {
            self.idle_run = if n == 0 { self.idle_run + 1 } else { 0 };
            if n > 0 {
                // After this batch is taken: the agent pushes from the
                // index the switch names, which must be past it.
                self.leave_polls = !remote;
            } else if !remote || self.idle_run >= self.cfg.idle_polls {
                self.switch_to_doorbells()?;
            }
        } else if remote && n > 0 {
            self.start_remote_polls()?;
        }
        Ok(())
    }

    fn start_remote_polls(&mut self) -> Result<(), RemoteQueueError> {
        self.busy_run = 0;
        self.idle_run = 0;
        self.polling_remote = true;
        self.stats.mode_switches.fetch_add(1, Relaxed);
        self.send(Message::SetMode(SetMode {
            poll: true,
            next_avail: self.next_avail.0,
        }))
        .map(|_| ())
    }

    /// Hands discovery back to the agent. It pushes everything from our
    /// `next_avail` on, so a request posted during the switch is not
    /// stranded.
    pub(crate) fn switch_to_doorbells(&mut self) -> Result<(), RemoteQueueError> {
        self.polling_remote = false;
        self.idle_run = 0;
        self.stats.mode_switches.fetch_add(1, Relaxed);
        // Forget what polling learned: the agent re-announces it.
        self.known_avail = self.next_avail;
        self.send(Message::SetMode(SetMode {
            poll: false,
            next_avail: self.next_avail.0,
        }))
        .map(|_| ())
    }

    /// Takes in a batch of at most `max` new requests, as far as it can
    /// without waiting: learns of them (doorbells already received, or a
    /// READ of the avail ring) and walks their chains over the shadow,
    /// fetching what it lacks. Walked chains go to `out` (taken from
    /// `spare`), in ring order.
    pub(crate) fn intake(
        &mut self,
        max: usize,
        out: &mut Vec<(u16, Result<DescriptorChain, ChainError>)>,
        spare: &mut Vec<DescriptorChain>,
    ) -> Result<Intake, RemoteQueueError> {
        let mut st = std::mem::take(&mut self.intake);
        let r = self.intake_step(&mut st, max, out, spare);
        if matches!(r, Ok(Intake::Waiting)) {
            self.intake = st;
        }
        r
    }

    fn intake_step(
        &mut self,
        st: &mut IntakeState,
        max: usize,
        out: &mut Vec<(u16, Result<DescriptorChain, ChainError>)>,
        spare: &mut Vec<DescriptorChain>,
    ) -> Result<Intake, RemoteQueueError> {
        if st.heads.is_none() {
            match self.learn_step(st, max)? {
                None => return Ok(Intake::Waiting),
                Some(None) => return Ok(Intake::Nothing),
                Some(Some(heads)) => st.heads = Some(heads),
            }
        }
        let heads = st.heads.take().unwrap_or_default();
        while st.next < heads.len() {
            let head = heads[st.next];
            let mut chain = st
                .chain
                .take()
                .unwrap_or_else(|| spare.pop().unwrap_or_default());
            let mut ws = std::mem::take(&mut st.walk);
            match self.walk_step(head, &mut chain, &mut ws)? {
                None => {
                    st.walk = ws;
                    st.chain = Some(chain);
                    st.heads = Some(heads);
                    return Ok(Intake::Waiting);
                }
                Some(r) => {
                    // Fetches of different chains happen one after another.
                    st.walk_rtts = st.walk_rtts.max(ws.rtts);
                    out.push((head, r.map(|_| chain)));
                    st.next += 1;
                }
            }
        }
        self.spare_heads = heads;
        Ok(Intake::Ready {
            rtts: st.learn_rtts + st.walk_rtts,
        })
    }

    /// Learns of new requests and takes at most `max` of them, loading
    /// their doorbell copies into the shadow: None while a READ of the
    /// avail ring is in flight, Some(None) when there is nothing to take.
    #[allow(clippy::option_option)]
    fn learn_step(
        &mut self,
        st: &mut IntakeState,
        max: usize,
    ) -> Result<Option<Option<Vec<u16>>>, RemoteQueueError> {
        if let Some(wr) = st.avail_wr {
            if self.in_flight(wr)? {
                return Ok(None);
            }
            st.avail_wr = None;
            st.avail_read = true;
            st.learn_rtts += 1;
            st.table = std::mem::take(&mut self.table_read);
            self.apply_avail_read()?;
        }
        if self.polling_remote && !st.avail_read {
            st.avail_wr = Some(self.post_avail_read()?);
            return Ok(None);
        }
        let avail = (self.known_avail - self.next_avail).0 as usize;
        let n = avail.min(max);
        // Announced but not delivered: read the ring once.
        let missing = (0..n).any(|k| {
            let pos = self.next_avail + Wrapping(k as u16);
            let slot = usize::from(pos.0 % self.layout.size);
            self.pending[slot].as_ref().is_none_or(|e| e.pos != pos.0)
        });
        if missing {
            if st.avail_read {
                return Err(RemoteQueueError::AvailEntryVanished);
            }
            st.avail_wr = Some(self.post_avail_read()?);
            return Ok(None);
        }
        self.adapt(n)?;
        if st.avail_read {
            // Speculate on the table while polls find work, and for a few
            // empty polls after (a guest refills its queue a moment after
            // its completions): an idle queue soon costs one READ a poll.
            self.busy_polls = if n > 0 {
                self.found_at = Some(self.now);
                TABLE_POLLS
            } else {
                self.busy_polls.saturating_sub(1)
            };
        }
        if n == 0 {
            if st.learn_rtts > 0 {
                self.stats.idle_rtts.fetch_add(st.learn_rtts, Relaxed);
            }
            return Ok(Some(None));
        }
        self.shadow.clear();
        if st.table {
            // The table as this poll's READ found it (after the ring);
            // doorbell copies, inserted below, win over it.
            let mut tmp = std::mem::take(&mut self.scratch);
            tmp.resize(self.layout.desc_table_bytes() as usize, 0);
            let at = self.areas.desc;
            let r = self.staging().get(at, &mut tmp);
            if r.is_ok() {
                self.shadow.insert(self.layout.desc, &tmp);
            }
            self.scratch = tmp;
            r?;
        }
        let mut heads = std::mem::take(&mut self.spare_heads);
        heads.clear();
        for k in 0..n {
            let pos = self.next_avail + Wrapping(k as u16);
            let slot = usize::from(pos.0 % self.layout.size);
            let Some(e) = self.pending[slot].take() else {
                return Err(RemoteQueueError::AvailEntryVanished);
            };
            for (gpa, d) in &e.descs {
                self.shadow.insert(*gpa, d);
            }
            for (gpa, b) in &e.inline {
                self.shadow.insert(*gpa, b);
            }
            heads.push(e.head);
            self.recycle(e);
        }
        self.next_avail += Wrapping(n as u16);
        if std::mem::take(&mut self.leave_polls) {
            self.switch_to_doorbells()?;
        }
        Ok(Some(Some(heads)))
    }

    /// Brings `len` guest bytes at `gpa` into staging `off`: from the
    /// doorbell's inline copy when it holds exactly those bytes, else with
    /// a READ queued for the caller's wave.
    pub(crate) fn stage_readable(
        &mut self,
        gpa: u64,
        off: usize,
        len: usize,
    ) -> Result<(), RemoteQueueError> {
        if let Some(b) = self.shadow.get(gpa, len) {
            self.stats.inline_bytes.fetch_add(len as u64, Relaxed);
            return Ok(self.staging.get_mut().put(off, b)?);
        }
        Ok(self.queue_wr(Dir::Read, gpa, off, len)?)
    }

    /// Queues WRITEs of the first `len` bytes of `segs` from staging `off`
    /// on (segments laid out back to back there).
    pub(crate) fn queue_writes(
        &mut self,
        segs: &[crate::virtio::ring::Segment],
        mut off: usize,
        mut len: u64,
    ) -> Result<(), RemoteQueueError> {
        for s in segs {
            let n = u64::from(s.len).min(len);
            if n > 0 {
                self.queue_wr(Dir::Write, s.addr, off, n as usize)?;
            }
            off += s.len as usize;
            len -= n;
        }
        Ok(())
    }

    /// Queues the WRITEs of bytes `start..end` of the writable part `segs`,
    /// staged from staging offset `off`.
    pub(crate) fn queue_write_range(
        &mut self,
        segs: &[crate::virtio::ring::Segment],
        off: usize,
        start: u64,
        end: u64,
    ) -> Result<(), RemoteQueueError> {
        let mut at = 0u64;
        for s in segs {
            let next = at + u64::from(s.len);
            let (lo, hi) = (start.max(at), end.min(next));
            if lo < hi {
                self.queue_wr(
                    Dir::Write,
                    s.addr + (lo - at),
                    off + lo as usize,
                    (hi - lo) as usize,
                )?;
            }
            if next >= end {
                break;
            }
            at = next;
        }
        Ok(())
    }

    /// Queues the used elements `used` (from `next_used` on, split where the
    /// ring wraps), then the WRITE of the new used index (RC puts it after
    /// the elements, so the guest never sees an index before its entries),
    /// then a READ of the guest's suppression word (`used_event` with
    /// EVENT_IDX, else the avail flags). RC executes that READ after the
    /// index is in place, which is the order the spec asks of a device
    /// (write the index, then look at the suppression), so a driver that
    /// re-enables interrupts meanwhile is never missed. The caller posts the
    /// wave; [`ServerRing::after_reply`] then decides on the interrupt.
    pub(crate) fn queue_used(&mut self, used: &[(u16, u32)]) -> Result<(), RemoteQueueError> {
        let first = self.next_used;
        for &(head, len) in used {
            let slot = usize::from(self.next_used.0 % self.layout.size);
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            b[4..].copy_from_slice(&len.to_le_bytes());
            let at = self.areas.used + 8 * slot;
            self.staging().put(at, &b)?;
            self.next_used += 1;
        }
        let mut start = first;
        let mut left = used.len();
        while left > 0 {
            let slot = usize::from(start.0 % self.layout.size);
            let run = left.min(usize::from(self.layout.size) - slot);
            let gpa = self.layout.used_ring(start.0);
            self.queue_wr(Dir::Write, gpa, self.areas.used + 8 * slot, 8 * run)?;
            start += Wrapping(run as u16);
            left -= run;
        }
        self.notify_span = Some((first.0, self.next_used.0));
        self.span_logged = self.logging;
        if self.logging {
            // The agent marks what the batch wrote, then publishes.
            return Ok(());
        }
        let at = self.areas.notify;
        let idx = self.next_used.0.to_le_bytes();
        self.staging().put(at, &idx)?;
        self.queue_wr(Dir::Write, self.layout.used_idx(), at, 2)?;
        // If the guest's word, as last read, wants an interrupt for this
        // batch (a guest that waits for each completion keeps saying so),
        // ask for it now, behind the index, rather than a round trip later
        // when the READ below is back. The agent reads the word itself
        // once the index landed, as a device must, so a guest that
        // suppressed meanwhile is not interrupted; a wrong guess the other
        // way only falls back to the READ.
        // With EVENT_IDX the word is an index, which a driver moves along
        // with the ring (one that waits for each completion sets it to the
        // last entry it saw): it is predicted at the same distance from
        // this batch's start as it was from the last one's.
        let span = self.next_used.0.wrapping_sub(first.0);
        let min_batch = if self.sleeper_streak >= SLEEPER_STREAK {
            1
        } else {
            EARLY_MIN_BATCH
        };
        self.asked_early = self.cfg.early_interrupts
            && (min_batch..=EARLY_SPAN_MAX).contains(&span)
            && self.last_word.is_some_and(|(w, at)| {
                let w = if self.features.event_idx {
                    first.0.wrapping_add(w.wrapping_sub(at))
                } else {
                    w
                };
                self.wants_interrupt(w, first.0, self.next_used.0)
            });
        if self.asked_early {
            self.stats.interrupts.fetch_add(1, Relaxed);
            let imm =
                u32::from(self.next_used.0) | EARLY_IMM | (u32::from(span) << EARLY_SPAN_SHIFT);
            self.queue_wr(
                Dir::WriteImm(imm),
                self.layout.used_idx(),
                self.areas.send,
                0,
            )?;
        }
        let word = if self.features.event_idx {
            self.layout.used_event()
        } else {
            self.layout.avail_flags()
        };
        self.queue_wr(Dir::Read, word, at + 8, 2)?;
        Ok(())
    }

    /// The reply wave landed: if the guest wants an interrupt for the used
    /// entries it published (its suppression word, read after the index),
    /// ask the VM host for one with a zero-length WRITE_WITH_IMM; otherwise
    /// the VM host hears nothing of this batch.
    pub(crate) fn after_reply(&mut self) -> Result<(), RemoteQueueError> {
        let Some((old, new)) = self.notify_span.take() else {
            return Ok(());
        };
        if self.span_logged {
            // Every logged batch goes to the agent, which publishes it.
            let imm = Dir::WriteImm(u32::from(new) | PUBLISH_IMM);
            self.queue_wr(imm, self.layout.used_idx(), self.areas.send, 0)?;
            self.post_wave()?;
            return Ok(());
        }
        let mut b = [0u8; 2];
        let at = self.areas.notify + 8;
        self.staging().get(at, &mut b)?;
        let word = u16::from_le_bytes(b);
        self.last_word = Some((word, old));
        let wants = self.wants_interrupt(word, old, new);
        if new.wrapping_sub(old) == 1 {
            self.sleeper_streak = if wants {
                (self.sleeper_streak + 1).min(SLEEPER_STREAK)
            } else {
                0
            };
        }
        if self.asked_early || !wants {
            return Ok(());
        }
        self.stats.interrupts.fetch_add(1, Relaxed);
        let imm = Dir::WriteImm(u32::from(new) | NOTIFY_IMM);
        self.queue_wr(imm, self.layout.used_idx(), self.areas.send, 0)?;
        // Not waited for: RC completes it before anything posted later.
        self.post_wave()?;
        Ok(())
    }

    /// Whether suppression word `word` (used_event with EVENT_IDX, else
    /// the avail flags) asks for an interrupt for used entries `old..new`.
    fn wants_interrupt(&self, word: u16, old: u16, new: u16) -> bool {
        if self.features.event_idx {
            crate::virtio::ring::layout::vring_need_event(word, new, old)
        } else {
            word & crate::virtio::ring::layout::VRING_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Requests announced but not taken, or a quiesce to answer.
    pub(crate) fn has_news(&self) -> bool {
        self.known_avail != self.next_avail || self.quiescing
    }

    /// Refuses to serve a queue that already failed.
    pub(crate) fn check(&self) -> Result<(), QueueFailure> {
        match &self.failed {
            Some(e) => Err(self.failure(e.clone())),
            None => Ok(()),
        }
    }

    /// Remembers a failure, so that every later poll reports it again.
    pub(crate) fn latch(
        &mut self,
        r: Result<PollOutcome, RemoteQueueError>,
    ) -> Result<PollOutcome, QueueFailure> {
        r.map_err(|e| {
            self.failed = Some(e.clone());
            self.failure(e)
        })
    }

    /// Remembers a failure found outside a poll (arming for a kick), so
    /// that the next poll reports it: the completion that carried it is
    /// gone, and without this the queue would idle forever as a zombie.
    pub(crate) fn fail(&mut self, e: RemoteQueueError) {
        if self.failed.is_none() {
            self.failed = Some(e);
        }
    }

    /// `e` as this queue's failure, for the sidecore.
    pub(crate) fn failure(&self, e: RemoteQueueError) -> QueueFailure {
        e.at(&self.name)
    }

    /// The ring rule a doorbell or a remote poll announcing avail index
    /// `idx` broke: more new entries than the ring holds.
    fn avail_jump(&self, idx: Wrapping<u16>) -> QueueError {
        QueueError::AvailIndexJump {
            last: self.next_avail.0,
            idx: idx.0,
            size: self.layout.size,
        }
    }

    /// Whether the wave `target` is still in flight (an error once it has
    /// taken longer than the peer is given).
    pub(crate) fn in_flight(&self, target: u64) -> Result<bool, RemoteQueueError> {
        if self.done_wr >= target {
            return Ok(false);
        }
        if self.now.saturating_duration_since(self.stage_started) > self.cfg.op_timeout {
            return Err(if self.backlog.is_empty() {
                RemoteQueueError::Timeout
            } else {
                RemoteQueueError::SendQueueFull
            });
        }
        Ok(true)
    }

    /// `ServedQueue::set_notifications` for the ring.
    pub(crate) fn set_notifications(
        &mut self,
        enabled: bool,
        busy: bool,
    ) -> Result<Wake, RemoteQueueError> {
        if enabled && (busy || self.quiescing) {
            // Keep polling until the batch lands.
            return Ok(Wake::Poll);
        }
        match (self.mode, enabled) {
            // A remote-poll queue has no notifications: keep polling.
            (NotifyMode::RemotePoll, _) => Ok(Wake::Poll),
            (NotifyMode::Adaptive, true) if self.polling_remote => {
                self.switch_to_doorbells()?;
                Ok(Wake::Sleep)
            }
            (_, true) => Ok(Wake::ArmDoorbells),
            (_, false) => Ok(Wake::Sleep),
        }
    }

    /// `ServedQueue::take_kick` for the ring.
    pub(crate) fn take_kick(&self, busy: bool) -> Wake {
        if self.polling_remote || busy {
            Wake::Poll
        } else {
            Wake::ArmDoorbells
        }
    }
}

/// What a queue needs from the sidecore before it may sleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Work is under way (or the queue polls the guest): poll again.
    Poll,
    /// Nothing to wait for on the fabric.
    Sleep,
    /// Arm the endpoint's completion notification, take in what arrived
    /// meanwhile, and poll again if requests (or a quiesce) did.
    ArmDoorbells,
}
