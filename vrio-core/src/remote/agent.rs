//! The VM-host agent, as a library a VMM links: it registers guest memory
//! (one protection domain per guest), attaches each queue to an I/O server,
//! forwards guest kicks as doorbells, and on each completion publishes
//! used.idx and raises the guest interrupt when the guest asks for one.
//! It never touches request data.
//!
//! Queues can move while the guest runs ([`AttachedDevice::move_queue`]):
//! the agent asks the serving I/O server to QUIESCE, which finishes the
//! batch in flight and answers with the ring index where it stopped; the
//! agent then ATTACHes the queue to the new place with that index. If the
//! server is gone instead (failover), the agent resumes at the used index it
//! published itself: servers complete strictly in avail order, so every
//! request after it is re-served, which virtio allows (it never completed).
//! Closing the old endpoint fences the old server out of guest memory.

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrio_rdma::{
    Access, Completion, Domain, Endpoint, EndpointConfig, FabricError, MemoryRegion, Opcode,
    RecvRequest, SendRequest, Sge, WcOpcode, WcStatus,
};

use super::staging::StagingBuffer;
use super::wire::{
    doorbell_entry_size, Attach, AttachDevice, DeviceKind, Doorbell, DoorbellEntry, Message,
    NotifyMode, WireError, WireRegion, ANY_SIDECORE, DOORBELL_HEADER, MAX_MSG,
};
use crate::cputime::thread_cpu_ns;
use crate::memory::{GuestMemory, LocalMemory, MemoryError, MemoryMap};
use crate::ring::layout::VRING_USED_F_NO_NOTIFY;
use crate::ring::{Descriptor, DeviceQueue, QueueError, RingFeatures, RingLayout};

/// Why attaching, serving or moving a queue failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    #[error("the I/O server refused queue {queue}: status {status}")]
    Refused { queue: u16, status: u16 },
    /// The caller's placement does not match the device.
    #[error("{targets} targets for {queues} queues")]
    TargetCount { targets: usize, queues: usize },
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
    CompletedPastAvail { idx: u16, avail: u16, used: u16 },
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
    Completion { status: WcStatus, wr_id: u64 },
    /// The server closed the link before answering an ATTACH.
    #[error(
        "the I/O server dropped the connection while attaching queue {queue} ({status:?}); \
         its log says why (a different vrio wire version, rings outside guest memory, ...)"
    )]
    AttachDropped { queue: u16, status: WcStatus },
    /// No ATTACH reply within [`AgentConfig::timeout`].
    #[error("no attach reply from the server")]
    NoAttachReply,
    /// The old server did not answer QUIESCE within the timeout.
    #[error("no answer to QUIESCE")]
    NoQuiesceAnswer,
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
    #[error("no queue {0} on this device")]
    NoSuchQueue(u16),
    #[error("queue {0} is already moving")]
    Busy(u16),
    #[error("the agent has stopped")]
    Stopped,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One queue as the VMM negotiated it.
pub struct QueueAttach {
    pub layout: RingLayout,
    pub features: RingFeatures,
    /// The guest writes it to kick (non-blocking eventfd).
    pub kick: EventFd,
    /// The agent writes it to interrupt the guest.
    pub call: EventFd,
    /// Ring index to resume at: 0 for a fresh ring, the VMM's vring base
    /// for one that already ran (next avail == next used).
    pub start: u16,
}

pub struct DeviceAttach {
    pub device_id: u64,
    pub mem: Arc<LocalMemory>,
    pub queues: Vec<QueueAttach>,
}

/// Where a queue is served: an I/O server's fabric address and one of its
/// sidecores ([`ANY_SIDECORE`]: the server chooses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTarget {
    pub server: String,
    pub sidecore: u16,
}

impl QueueTarget {
    pub fn any(server: &str) -> Self {
        Self {
            server: server.to_string(),
            sidecore: ANY_SIDECORE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// An I/O server serves the queue.
    Serving,
    /// Handing over: the old server is finishing its batch.
    Moving,
    /// The server was lost; requests wait in the ring for a new placement.
    Orphaned,
}

#[derive(Debug, Clone)]
pub struct QueueStatus {
    pub queue: u16,
    pub target: QueueTarget,
    pub state: LinkState,
    /// The used index the agent last published.
    pub used: u16,
    pub moves: u64,
    pub failovers: u64,
}

/// What a move did.
#[derive(Debug, Clone, Copy)]
pub struct MoveReport {
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

#[derive(Debug, Clone, Copy)]
pub struct AgentConfig {
    pub mode: NotifyMode,
    pub endpoint: EndpointConfig,
    /// Descriptors copied per chain into a doorbell (the server fetches
    /// the rest).
    pub chain_copy: usize,
    /// Attach replies and quiesce answers must arrive within this.
    pub timeout: Duration,
    /// Wire index of the device's first queue. A VMM that attaches its
    /// vrings one at a time attaches vring q as a one-queue device with
    /// `queue_base` q, so the server names it `dev<id>.q<q>` as the
    /// controller does.
    pub queue_base: u16,
    /// What the queues belong to; a net device names its port's MAC.
    pub device: DeviceKind,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            mode: NotifyMode::Doorbell,
            endpoint: EndpointConfig::default(),
            chain_copy: 8,
            timeout: Duration::from_secs(10),
            queue_base: 0,
            device: DeviceKind::Blk,
        }
    }
}

#[derive(Debug, Default)]
pub struct AgentStats {
    pub doorbells: AtomicU64,
    pub completions: AtomicU64,
    pub interrupts: AtomicU64,
    pub kicks: AtomicU64,
    pub cpu_ns: AtomicU64,
    /// Handovers from a live server.
    pub moves: AtomicU64,
    /// Re-attachments after a lost server.
    pub failovers: AtomicU64,
    /// Queues that lost their server.
    pub orphaned: AtomicU64,
}

const SEND_SLOTS: usize = 64;
const RECV_SLOTS: usize = 32;
const RECV_TAG: u64 = 1 << 63;
const WAKE: u64 = u64::MAX;

/// One queue's link to its server: the endpoint and its message buffers.
struct Conn {
    // Registration before the buffers it covers (drop order).
    mr: Box<dyn MemoryRegion>,
    ep: Box<dyn Endpoint>,
    bufs: StagingBuffer,
    free_send: Vec<usize>,
    /// Encoding space, reused for every message.
    scratch: Vec<u8>,
}

/// What every queue of a device shares on the agent thread.
struct Ctx {
    domain: Arc<dyn Domain>,
    device_id: u64,
    wire: Vec<WireRegion>,
    cfg: AgentConfig,
    mem: Arc<LocalMemory>,
    stats: Arc<AgentStats>,
    status: Arc<Mutex<Vec<QueueStatus>>>,
}

enum Link {
    Serving,
    Quiescing {
        to: QueueTarget,
        reply: mpsc::Sender<Result<MoveReport, AgentError>>,
        started: Instant,
    },
    Orphaned {
        since: Instant,
    },
}

struct AgentQueue {
    conn: Option<Conn>,
    index: u16,
    layout: RingLayout,
    features: RingFeatures,
    dq: DeviceQueue,
    kick: EventFd,
    call: EventFd,
    last_pushed: Wrapping<u16>,
    polled_by_server: bool,
    target: QueueTarget,
    link: Link,
    moves: u64,
    failovers: u64,
}

enum Command {
    Move {
        queue: u16,
        to: QueueTarget,
        reply: mpsc::Sender<Result<MoveReport, AgentError>>,
    },
}

/// A device attached to I/O servers; dropping it detaches.
pub struct AttachedDevice {
    wake: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    commands: mpsc::Sender<Command>,
    join: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<AgentStats>,
    status: Arc<Mutex<Vec<QueueStatus>>>,
    config: Vec<u8>,
    timeout: Duration,
}

impl AttachedDevice {
    pub fn stats(&self) -> &Arc<AgentStats> {
        &self.stats
    }
    /// The device config space the I/O server reported.
    pub fn config_space(&self) -> &[u8] {
        &self.config
    }
    /// Where each queue is served, as of the agent's last event.
    pub fn queues(&self) -> Vec<QueueStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
    /// Moves `queue` to `to` while the guest keeps running: a handover from
    /// a live server, or a failover if its server is gone. Blocks until the
    /// queue is served again (or the move failed; the queue is then
    /// orphaned and a later move can place it).
    pub fn move_queue(&self, queue: u16, to: QueueTarget) -> Result<MoveReport, AgentError> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::Move {
                queue,
                to,
                reply: tx,
            })
            .map_err(|_| AgentError::Stopped)?;
        self.wake.write(1)?;
        // A quiesce and an attach, each bounded by the timeout.
        match rx.recv_timeout(self.timeout * 2 + Duration::from_secs(1)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(AgentError::MoveUnfinished(queue)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(AgentError::Stopped),
        }
    }
    /// Detaches: stops forwarding, closes the endpoints, deregisters memory.
    pub fn detach(&self) {
        self.stopping.store(true, Relaxed);
        let _ = self.wake.write(1);
        let join = self.join.lock().ok().and_then(|mut j| j.take());
        if let Some(j) = join {
            let _ = j.join();
        }
    }
}

impl Drop for AttachedDevice {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Registers the guest's memory in `domain` (which should be this guest's
/// alone) and attaches every queue to the I/O server at `server`.
pub fn attach(
    domain: Arc<dyn Domain>,
    server: &str,
    dev: DeviceAttach,
    cfg: AgentConfig,
) -> Result<AttachedDevice, AgentError> {
    let targets = vec![QueueTarget::any(server); dev.queues.len()];
    attach_placed(domain, targets, dev, cfg)
}

/// Like [`attach`], with each queue placed on its own server and sidecore
/// (`targets[i]` for queue `i`), as a controller decided.
pub fn attach_placed(
    domain: Arc<dyn Domain>,
    targets: Vec<QueueTarget>,
    dev: DeviceAttach,
    cfg: AgentConfig,
) -> Result<AttachedDevice, AgentError> {
    if targets.len() != dev.queues.len() {
        return Err(AgentError::TargetCount {
            targets: targets.len(),
            queues: dev.queues.len(),
        });
    }
    let mut regions = Vec::new();
    let mut wire = Vec::new();
    for r in dev.mem.iter() {
        // SAFETY: the region is guest RAM mapped by `dev.mem`, which the
        // agent thread keeps alive (an Arc) for as long as the registration.
        let mr = unsafe { domain.register(r.as_ptr(), r.len() as usize, Access::GUEST_RAM) }?;
        wire.push(WireRegion {
            gpa: r.start_addr().0,
            remote: mr.remote(),
        });
        regions.push(mr);
    }
    let map = MemoryMap::of(&*dev.mem)?;
    let ctx = Ctx {
        domain,
        device_id: dev.device_id,
        wire,
        cfg,
        mem: dev.mem.clone(),
        stats: Arc::new(AgentStats::default()),
        status: Arc::new(Mutex::new(Vec::new())),
    };
    let mut queues = Vec::new();
    let mut config = Vec::new();
    for ((i, q), target) in dev.queues.into_iter().enumerate().zip(targets) {
        let mut dq = DeviceQueue::new(q.layout, q.features, &map)?;
        dq.set_state(crate::ring::RingState {
            next_avail: q.start,
            next_used: q.start,
        });
        let mut aq = AgentQueue {
            conn: None,
            index: i as u16,
            layout: q.layout,
            features: q.features,
            dq,
            kick: q.kick,
            call: q.call,
            last_pushed: Wrapping(q.start),
            polled_by_server: cfg.mode == NotifyMode::RemotePoll,
            target: target.clone(),
            link: Link::Serving,
            moves: 0,
            failovers: 0,
        };
        let (conn, c) = aq.connect(&ctx, &target, q.start)?;
        aq.conn = Some(conn);
        config = c;
        aq.set_kicks(&ctx.mem, !aq.polled_by_server);
        queues.push(aq);
    }
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        wake.as_raw_fd(),
        EpollEvent::new(EventSet::IN, WAKE),
    )?;
    for (i, q) in queues.iter_mut().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            q.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
        if let Some(c) = &mut q.conn {
            epoll.ctl(
                ControlOperation::Add,
                c.ep.notify_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
            c.ep.arm()?;
        }
    }
    if let Ok(mut s) = ctx.status.lock() {
        *s = queues.iter().map(|q| q.status()).collect();
    }
    let status = ctx.status.clone();
    let stopping = Arc::new(AtomicBool::new(false));
    let (commands, rx) = mpsc::channel();
    let stats = ctx.stats.clone();
    let (w, sp) = (wake.clone(), stopping.clone());
    let join = std::thread::Builder::new()
        .name(format!("vrio-agent-{}", dev.device_id))
        .spawn(move || {
            run(queues, &ctx, epoll, &w, &sp, &rx);
            ctx.stats.cpu_ns.store(thread_cpu_ns(), Relaxed);
            // Queues (and their endpoints) went with `run`; now the memory.
            drop(regions);
        })?;
    Ok(AttachedDevice {
        wake,
        stopping,
        commands,
        join: Mutex::new(Some(join)),
        stats,
        status,
        config,
        timeout: cfg.timeout,
    })
}

impl Conn {
    fn open(domain: &dyn Domain, server: &str, cfg: EndpointConfig) -> Result<Self, AgentError> {
        let bufs = StagingBuffer::new((SEND_SLOTS + RECV_SLOTS) * MAX_MSG)?;
        // SAFETY: `bufs` is owned by the connection next to its
        // registration and outlives it (declared later, dropped later).
        let mr = unsafe { domain.register(bufs.as_ptr(), bufs.len(), Access::LOCAL_ONLY) }?;
        let ep = domain.connect(server, cfg)?;
        let mut c = Conn {
            mr,
            ep,
            bufs,
            free_send: (0..SEND_SLOTS).collect(),
            scratch: Vec::with_capacity(MAX_MSG),
        };
        let recvs: Vec<RecvRequest> = (0..RECV_SLOTS).map(|s| c.recv_wr(s)).collect();
        c.ep.post_recv(&recvs)?;
        Ok(c)
    }

    fn recv_wr(&self, s: usize) -> RecvRequest {
        RecvRequest {
            wr_id: RECV_TAG | s as u64,
            local: Sge {
                lkey: self.mr.lkey(),
                addr: self.bufs.addr() + ((SEND_SLOTS + s) * MAX_MSG) as u64,
                len: MAX_MSG as u32,
            },
        }
    }

    fn send(&mut self, m: &Message) -> Result<(), AgentError> {
        m.encode(&mut self.scratch).map_err(AgentError::Encode)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.free_send.is_empty() {
            self.reap_sends_only()?;
            if Instant::now() > deadline {
                return Err(AgentError::SendQueueStuck);
            }
        }
        let slot = self.free_send.pop().unwrap_or(0);
        self.bufs.put(slot * MAX_MSG, &self.scratch)?;
        self.ep.post_send(&[SendRequest {
            wr_id: slot as u64,
            opcode: Opcode::Send,
            local: Sge {
                lkey: self.mr.lkey(),
                addr: self.bufs.addr() + (slot * MAX_MSG) as u64,
                len: self.scratch.len() as u32,
            },
            signaled: true,
        }])?;
        Ok(())
    }

    /// Only used while the send ring is full and before the thread runs.
    fn reap_sends_only(&mut self) -> Result<(), AgentError> {
        let mut c = [Completion::EMPTY; 16];
        let n = self.ep.poll(&mut c)?;
        for c in &c[..n] {
            if c.wr_id & RECV_TAG == 0 {
                if !c.status.is_ok() {
                    return Err(AgentError::Completion {
                        status: c.status,
                        wr_id: c.wr_id,
                    });
                }
                self.free_send.push(c.wr_id as usize);
            }
        }
        Ok(())
    }

    /// Reads received message `s` and reposts its buffer.
    fn take_message(&mut self, s: usize, len: u32) -> Result<Message, AgentError> {
        if s >= RECV_SLOTS {
            return Err(AgentError::RecvOutOfRange);
        }
        let mut b = vec![0u8; (len as usize).min(MAX_MSG)];
        self.bufs.get((SEND_SLOTS + s) * MAX_MSG, &mut b)?;
        let wr = self.recv_wr(s);
        self.ep.post_recv(&[wr])?;
        Message::decode(&b).map_err(AgentError::BadMessage)
    }

    fn wait_reply(&mut self, queue: u16, timeout: Duration) -> Result<Vec<u8>, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut c = [Completion::EMPTY; 16];
        loop {
            let n = self.ep.poll(&mut c)?;
            for c in &c[..n] {
                if !c.status.is_ok() {
                    return Err(AgentError::AttachDropped {
                        queue,
                        status: c.status,
                    });
                }
                if c.wr_id & RECV_TAG == 0 {
                    self.free_send.push(c.wr_id as usize);
                    continue;
                }
                return match self.take_message((c.wr_id & !RECV_TAG) as usize, c.byte_len)? {
                    Message::AttachReply(r) if r.status == 0 => Ok(r.config),
                    Message::AttachReply(r) => Err(AgentError::Refused {
                        queue,
                        status: r.status,
                    }),
                    other => Err(AgentError::UnexpectedMessage(Box::new(other))),
                };
            }
            if Instant::now() > deadline {
                return Err(AgentError::NoAttachReply);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

impl AgentQueue {
    fn status(&self) -> QueueStatus {
        QueueStatus {
            queue: self.index,
            target: self.target.clone(),
            state: match self.link {
                Link::Serving => LinkState::Serving,
                Link::Quiescing { .. } => LinkState::Moving,
                Link::Orphaned { .. } => LinkState::Orphaned,
            },
            used: self.dq.state().next_used,
            moves: self.moves,
            failovers: self.failovers,
        }
    }

    /// Updates this queue's entry of the device's status (before any move
    /// reply, so a caller sees the state the reply describes).
    fn publish(&self, ctx: &Ctx) {
        if let Ok(mut s) = ctx.status.lock() {
            if let Some(e) = s.get_mut(usize::from(self.index)) {
                *e = self.status();
            }
        }
    }

    /// Connects to `to` and attaches this queue there, resuming at `start`.
    fn connect(
        &self,
        ctx: &Ctx,
        to: &QueueTarget,
        start: u16,
    ) -> Result<(Conn, Vec<u8>), AgentError> {
        let mut conn = Conn::open(&*ctx.domain, &to.server, ctx.cfg.endpoint)?;
        let attach = Attach {
            device_id: ctx.device_id,
            queue: ctx.cfg.queue_base.wrapping_add(self.index),
            layout: self.layout,
            features: self.features,
            mode: ctx.cfg.mode,
            start,
            sidecore: to.sidecore,
            regions: ctx.wire.clone(),
        };
        conn.send(&match ctx.cfg.device {
            // Plain ATTACH means blk (what every server understands).
            DeviceKind::Blk => Message::Attach(attach),
            device => Message::AttachDevice(AttachDevice { attach, device }),
        })?;
        let config = conn.wait_reply(self.index, ctx.cfg.timeout)?;
        Ok((conn, config))
    }

    fn send(&mut self, m: &Message) -> Result<(), AgentError> {
        match &mut self.conn {
            Some(c) => c.send(m),
            None => Err(AgentError::NoServer),
        }
    }

    /// Closes the link to the current server (fencing it out of guest
    /// memory: its rkeys die with the endpoint's registration scope).
    fn drop_conn(&mut self, epoll: &Epoll) {
        if let Some(c) = self.conn.take() {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                c.ep.notify_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Attaches the queue to `to` at `start`, replacing the old link.
    fn reattach(
        &mut self,
        ctx: &Ctx,
        epoll: &Epoll,
        to: QueueTarget,
        start: u16,
        started: Instant,
        // Set for a failover: when the queue lost its server.
        down_since: Option<Instant>,
    ) -> Result<MoveReport, AgentError> {
        let failover = down_since.is_some();
        self.drop_conn(epoll);
        let r = self.connect(ctx, &to, start).and_then(|(mut conn, _)| {
            epoll.ctl(
                ControlOperation::Add,
                conn.ep.notify_fd(),
                EpollEvent::new(EventSet::IN, u64::from(self.index)),
            )?;
            conn.ep.arm()?;
            Ok(conn)
        });
        let conn = match r {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(queue = self.index, server = %to.server, error = %e, "re-attach failed; the queue waits for another placement");
                self.link = Link::Orphaned {
                    since: down_since.unwrap_or(started),
                };
                self.publish(ctx);
                return Err(e);
            }
        };
        self.conn = Some(conn);
        self.target = to;
        self.link = Link::Serving;
        self.polled_by_server = ctx.cfg.mode == NotifyMode::RemotePoll;
        self.last_pushed = Wrapping(start);
        self.set_kicks(&ctx.mem, !self.polled_by_server);
        if failover {
            self.failovers += 1;
            ctx.stats.failovers.fetch_add(1, Relaxed);
        } else {
            self.moves += 1;
            ctx.stats.moves.fetch_add(1, Relaxed);
        }
        if !self.polled_by_server {
            // Requests the guest posted while the queue was moving.
            self.push(&ctx.mem, &ctx.stats, ctx.cfg.chain_copy)?;
        }
        self.publish(ctx);
        tracing::info!(queue = self.index, server = %self.target.server, sidecore = self.target.sidecore, start, failover, "queue resumed");
        Ok(MoveReport {
            queue: self.index,
            resumed_at: start,
            failover,
            took: started.elapsed(),
            down: down_since.map(|t| t.elapsed()),
        })
    }

    fn on_move(
        &mut self,
        ctx: &Ctx,
        epoll: &Epoll,
        to: QueueTarget,
        reply: mpsc::Sender<Result<MoveReport, AgentError>>,
    ) {
        let started = Instant::now();
        match self.link {
            Link::Quiescing { .. } => {
                let _ = reply.send(Err(AgentError::Busy(self.index)));
            }
            Link::Serving if to == self.target => {
                let _ = reply.send(Ok(MoveReport {
                    queue: self.index,
                    resumed_at: self.dq.state().next_used,
                    failover: false,
                    took: Duration::ZERO,
                    down: None,
                }));
            }
            Link::Serving => match self.send(&Message::Quiesce) {
                Ok(()) => {
                    self.link = Link::Quiescing { to, reply, started };
                    self.publish(ctx);
                }
                Err(e) => {
                    tracing::warn!(queue = self.index, error = %e, "the old server is unreachable; failing over");
                    let start = self.dq.state().next_used;
                    let r = self.reattach(ctx, epoll, to, start, started, Some(started));
                    let _ = reply.send(r);
                }
            },
            Link::Orphaned { since } => {
                let start = self.dq.state().next_used;
                let r = self.reattach(ctx, epoll, to, start, started, Some(since));
                let _ = reply.send(r);
            }
        }
    }

    /// The old server answered QUIESCE: resume on the new one.
    fn on_quiesced(&mut self, ctx: &Ctx, epoll: &Epoll, next: u16) {
        let Link::Quiescing { to, reply, started } =
            std::mem::replace(&mut self.link, Link::Serving)
        else {
            tracing::warn!(queue = self.index, "QUIESCED without a move; ignored");
            return;
        };
        let used = self.dq.state().next_used;
        if next != used {
            // Cannot happen on RC; re-serving from our index is safe anyway.
            tracing::warn!(
                queue = self.index,
                server_next = next,
                used,
                "server stopped elsewhere than the agent's used index"
            );
        }
        let r = self.reattach(ctx, epoll, to, used, started, None);
        let _ = reply.send(r);
    }

    /// The link failed: fail over if a move was under way, else wait for a
    /// new placement.
    fn on_link_error(&mut self, ctx: &Ctx, epoll: &Epoll, e: AgentError) {
        let now = Instant::now();
        match std::mem::replace(&mut self.link, Link::Orphaned { since: now }) {
            Link::Quiescing { to, reply, started } => {
                tracing::warn!(queue = self.index, error = %e, "the old server failed during a move; failing over");
                let start = self.dq.state().next_used;
                let r = self.reattach(ctx, epoll, to, start, started, Some(now));
                let _ = reply.send(r);
            }
            Link::Orphaned { since } => self.link = Link::Orphaned { since },
            Link::Serving => {
                tracing::error!(queue = self.index, server = %self.target.server, error = %e, "I/O server lost; the queue waits for a new placement");
                ctx.stats.orphaned.fetch_add(1, Relaxed);
                self.drop_conn(epoll);
                self.publish(ctx);
            }
        }
    }

    /// A quiesce that got no answer: treat the old server as lost.
    fn check_deadline(&mut self, ctx: &Ctx, epoll: &Epoll) {
        if let Link::Quiescing { started, .. } = &self.link {
            if started.elapsed() > ctx.cfg.timeout {
                self.on_link_error(ctx, epoll, AgentError::NoQuiesceAnswer);
            }
        }
    }

    /// Handles this queue's events; errors end its link.
    fn service(&mut self, ctx: &Ctx, epoll: &Epoll) {
        if self.conn.is_none() {
            // Orphaned: kicks are remembered by the ring itself.
            let _ = self.kick.read();
            return;
        }
        match self.pump(ctx) {
            Ok(None) => {}
            Ok(Some(next)) => self.on_quiesced(ctx, epoll, next),
            Err(e) => self.on_link_error(ctx, epoll, e),
        }
    }

    fn pump(&mut self, ctx: &Ctx) -> Result<Option<u16>, AgentError> {
        if let Some(next) = self.on_completions(ctx)? {
            return Ok(Some(next));
        }
        let kicked = self.kick.read().is_ok();
        if kicked {
            ctx.stats.kicks.fetch_add(1, Relaxed);
        }
        if kicked && !self.polled_by_server && matches!(self.link, Link::Serving) {
            self.push(&ctx.mem, &ctx.stats, ctx.cfg.chain_copy)?;
        }
        if let Some(c) = &mut self.conn {
            c.ep.arm()?;
        }
        // Completions that raced with arming.
        self.on_completions(ctx)
    }

    /// Completions: used-index updates, mode changes, send slots. Returns
    /// the server's stopping index when it answered a QUIESCE.
    fn on_completions(&mut self, ctx: &Ctx) -> Result<Option<u16>, AgentError> {
        let mut c = [Completion::EMPTY; 32];
        loop {
            let Some(conn) = &mut self.conn else {
                return Ok(None);
            };
            let n = conn.ep.poll(&mut c)?;
            for c in &c[..n] {
                if !c.status.is_ok() {
                    return Err(AgentError::Completion {
                        status: c.status,
                        wr_id: c.wr_id,
                    });
                }
                let Some(conn) = &mut self.conn else {
                    return Ok(None);
                };
                if c.wr_id & RECV_TAG == 0 {
                    conn.free_send.push(c.wr_id as usize);
                    continue;
                }
                let s = (c.wr_id & !RECV_TAG) as usize;
                if c.opcode == WcOpcode::RecvWithImm {
                    if s >= RECV_SLOTS {
                        return Err(AgentError::RecvOutOfRange);
                    }
                    let wr = conn.recv_wr(s);
                    conn.ep.post_recv(&[wr])?;
                    let idx = c.imm.unwrap_or(0) as u16;
                    // A server may complete only what the guest posted.
                    let used = self.dq.state().next_used;
                    let avail = ctx.mem.load_u16(self.layout.avail_idx())?;
                    let done = idx.wrapping_sub(used);
                    if done > avail.wrapping_sub(used) {
                        return Err(AgentError::CompletedPastAvail { idx, avail, used });
                    }
                    // The used elements landed before the immediate (RC
                    // ordering); publishing the index releases them.
                    self.dq.publish_used(&*ctx.mem, idx)?;
                    ctx.stats.completions.fetch_add(1, Relaxed);
                    if self.dq.needs_notification(&*ctx.mem)? {
                        let _ = self.call.write(1);
                        ctx.stats.interrupts.fetch_add(1, Relaxed);
                    }
                    continue;
                }
                match conn.take_message(s, c.byte_len)? {
                    Message::SetMode(m) if m.poll => {
                        self.polled_by_server = true;
                        self.set_kicks(&ctx.mem, false);
                    }
                    Message::SetMode(m) => {
                        self.polled_by_server = false;
                        self.last_pushed = Wrapping(m.next_avail);
                        self.set_kicks(&ctx.mem, true);
                        if matches!(self.link, Link::Serving) {
                            self.push(&ctx.mem, &ctx.stats, ctx.cfg.chain_copy)?;
                        }
                    }
                    // Everything before it arrived first (RC ordering).
                    Message::Quiesced(q) => return Ok(Some(q.next)),
                    other => return Err(AgentError::UnexpectedMessage(Box::new(other))),
                }
            }
            if n < c.len() {
                return Ok(None);
            }
        }
    }

    /// Turns guest kicks on or off (the agent is the "device" for kick
    /// suppression; the server never writes ring flags).
    fn set_kicks(&mut self, mem: &LocalMemory, on: bool) {
        let a = self.layout.used_flags();
        let f = mem.load_u16(a).unwrap_or(0);
        let f = if on {
            f & !VRING_USED_F_NO_NOTIFY
        } else {
            f | VRING_USED_F_NO_NOTIFY
        };
        let _ = mem.store_u16(a, f);
    }

    /// Pushes every avail entry from `last_pushed` on, then re-arms kicks
    /// and re-checks, so no entry is left behind.
    fn push(
        &mut self,
        mem: &LocalMemory,
        stats: &AgentStats,
        chain_copy: usize,
    ) -> Result<(), AgentError> {
        let size = self.layout.size;
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
                    entries: Vec::new(),
                };
                let mut bytes = DOORBELL_HEADER;
                while self.last_pushed != avail {
                    let e = self.copy_chain(mem, self.last_pushed.0, chain_copy);
                    let sz = doorbell_entry_size(e.descs.len());
                    if bytes + sz > MAX_MSG && !d.entries.is_empty() {
                        break;
                    }
                    bytes += sz;
                    d.entries.push(e);
                    self.last_pushed += 1;
                }
                // Announce only what this doorbell carries.
                d.avail_idx = self.last_pushed.0;
                self.send(&Message::Doorbell(d))?;
                stats.doorbells.fetch_add(1, Relaxed);
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
        Ok(())
    }

    /// Copies a chain's descriptors (not validated: the server does that).
    fn copy_chain(&self, mem: &LocalMemory, pos: u16, max: usize) -> DoorbellEntry {
        let head = mem.load_u16(self.layout.avail_ring(pos)).unwrap_or(0);
        let mut e = DoorbellEntry {
            pos,
            head,
            descs: Vec::new(),
        };
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
        e
    }
}

fn run(
    mut queues: Vec<AgentQueue>,
    ctx: &Ctx,
    epoll: Epoll,
    wake: &EventFd,
    stopping: &AtomicBool,
    commands: &mpsc::Receiver<Command>,
) {
    let mut events = vec![EpollEvent::default(); 32];
    let mut published = Instant::now();
    loop {
        let moving = queues
            .iter()
            .any(|q| matches!(q.link, Link::Quiescing { .. }));
        let n = match epoll.wait(if moving { 20 } else { 1000 }, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "agent epoll failed");
                return;
            }
        };
        if events[..n].iter().any(|e| e.data() == WAKE) {
            let _ = wake.read();
            if stopping.load(Relaxed) {
                return;
            }
            while let Ok(Command::Move { queue, to, reply }) = commands.try_recv() {
                match queues.get_mut(usize::from(queue)) {
                    Some(q) => q.on_move(ctx, &epoll, to, reply),
                    None => {
                        let _ = reply.send(Err(AgentError::NoSuchQueue(queue)));
                    }
                }
            }
        }
        for q in queues.iter_mut() {
            q.service(ctx, &epoll);
            q.check_deadline(ctx, &epoll);
        }
        // Keeps the used indexes fresh; state changes publish at once.
        if published.elapsed() > Duration::from_millis(100) {
            published = Instant::now();
            for q in &queues {
                q.publish(ctx);
            }
        }
    }
}
