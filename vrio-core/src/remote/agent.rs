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

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrio_rdma::{
    Access, Completion, Domain, Endpoint, EndpointConfig, MemoryRegion, Opcode, RecvRequest,
    SendRequest, Sge, WcOpcode,
};

use crate::cputime::{clock_of, thread_cpu_ns};
use crate::proto::agent::{Action, HostQueue, HostQueueConfig};
pub use crate::proto::agent::{
    AgentError, AgentStats, LinkState, MoveReport, QueueStatus, QueueTarget,
};
use crate::proto::staging::StagingBuffer;
use crate::proto::wire::{
    Attach, AttachDevice, AttachReply, DeviceKind, Message, NotifyMode, WireRegion, MAX_MSG,
};
use crate::virtio::dirty_log::DirtyLog;
use crate::virtio::memory::{LocalMemory, MemoryMap};
use crate::virtio::ring::{RingFeatures, RingLayout};

/// One queue as the VMM negotiated it.
pub struct QueueAttach {
    /// Where the guest put the ring.
    pub layout: RingLayout,
    /// The ring features the driver negotiated.
    pub features: RingFeatures,
    /// The guest writes it to kick (non-blocking eventfd).
    pub kick: EventFd,
    /// The agent writes it to interrupt the guest.
    pub call: EventFd,
    /// Ring index to resume at: 0 for a fresh ring, the VMM's vring base
    /// for one that already ran (next avail == next used).
    pub start: u16,
}

/// A device to attach: its id, the guest's memory, and its queues.
pub struct DeviceAttach {
    /// The device's id on the wire (see `remote::device_key`).
    pub device_id: u64,
    /// The guest's RAM, registered with the fabric for the server.
    pub mem: Arc<LocalMemory>,
    /// Its queues, in device order.
    pub queues: Vec<QueueAttach>,
    /// The capability that lets it attach (`tenancy::Keyring::mint`):
    /// needed by servers that check credentials, sent with every attach,
    /// move and reconnect of its queues.
    pub credential: Option<String>,
}

/// How the agent attaches and serves a device's queues.
#[derive(Debug, Clone, Copy)]
pub struct AgentConfig {
    /// How the server learns of requests.
    pub mode: NotifyMode,
    /// Queue depths of each queue's endpoint.
    pub endpoint: EndpointConfig,
    /// Descriptors copied per chain into a doorbell (the server fetches
    /// the rest).
    pub chain_copy: usize,
    /// Readable bytes of a request sent inline in its doorbell (see
    /// `HostQueueConfig::inline_max`): 4 KiB by default, so a 4 KiB write
    /// needs no READ either.
    pub inline_max: usize,
    /// Attach replies and quiesce answers must arrive within this.
    pub timeout: Duration,
    /// Wire index of the device's first queue. A VMM that attaches its
    /// vrings one at a time attaches vring q as a one-queue device with
    /// `queue_base` q, so the server names it `dev<id>.q<q>` as the
    /// controller does.
    pub queue_base: u16,
    /// What the queues belong to; a net device names its port's MAC.
    pub device: DeviceKind,
    /// While the VMM migrates the guest, mark the data the servers wrote
    /// in its dirty log. Only the test that proves the marks matter turns
    /// this off (`vrio-client --test-unlogged-writes`).
    pub log_data: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            mode: NotifyMode::Doorbell,
            endpoint: EndpointConfig::default(),
            chain_copy: 8,
            inline_max: 4096,
            timeout: Duration::from_secs(10),
            queue_base: 0,
            device: DeviceKind::Blk,
            log_data: true,
        }
    }
}

const SEND_SLOTS: usize = 64;
const RECV_SLOTS: usize = 32;
const RECV_TAG: u64 = 1 << 63;
/// The epoll token of the agent's own wake eventfd (commands, stop).
const WAKE: u64 = u64::MAX;
/// Marks a guest kick fd's epoll token, so that a wake tells a kick from
/// news on the link. Below it, the queue index; above it, the
/// device's slot on the agent thread.
const KICK: u64 = 1 << 32;
const SLOT_SHIFT: u32 = 33;
/// Slots wrap at 2^30 (no agent lives through a billion attachments), so
/// a token never equals [`WAKE`].
const SLOT_MASK: u32 = (1 << 30) - 1;
/// How long the backlog of messages waiting for send slots may stand still
/// before the link is given up.
const SEND_WAIT: Duration = Duration::from_secs(10);
/// Messages a link may hold back for want of send slots (a guest kicks on
/// while its server does not acknowledge) before it is given up.
const BACKLOG_MAX: usize = 1024;
/// Every queue is looked at this often even without an event (timers, the
/// status the owner reads), and the thread's CPU clock published.
const SWEEP: Duration = Duration::from_millis(100);

/// The epoll token of queue `queue` of the device in `slot`.
fn token(slot: u32, queue: u16) -> u64 {
    (u64::from(slot) << SLOT_SHIFT) | u64::from(queue)
}

/// One queue's link to its server: the endpoint and its message buffers.
struct Conn {
    // Registration before the buffers it covers (drop order).
    mr: Box<dyn MemoryRegion>,
    ep: Box<dyn Endpoint>,
    bufs: StagingBuffer,
    free_send: Vec<usize>,
    /// Encoding space, reused for every message.
    scratch: Vec<u8>,
    /// Messages waiting for a send slot, encoded, oldest first. Nothing on
    /// the agent thread waits for a server: one that stops acknowledging
    /// must not stall the other devices the thread serves.
    backlog: VecDeque<Vec<u8>>,
    /// Since when the backlog has not moved.
    stuck_since: Option<Instant>,
}

/// What every queue of a device shares on the agent thread.
struct Ctx {
    /// The device's slot on the agent thread, and the way back to it for
    /// a link made off the thread.
    slot: u32,
    back: Back,
    domain: Arc<dyn Domain>,
    device_id: u64,
    wire: Vec<WireRegion>,
    cfg: AgentConfig,
    credential: Option<String>,
    mem: Arc<LocalMemory>,
    stats: Arc<AgentStats>,
    status: Arc<Mutex<Vec<QueueStatus>>>,
}

/// How a thread other than the agent's hands it something: a command,
/// then a wake.
#[derive(Clone)]
struct Back {
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
}

impl Back {
    fn send(&self, c: Command) -> Result<(), AgentError> {
        self.commands.send(c).map_err(|_| AgentError::Stopped)?;
        self.wake.write(1)?;
        Ok(())
    }
}

/// One queue on the agent thread: the protocol state machine, its link,
/// the guest's eventfds, and the move command waiting for its answer.
struct AgentQueue {
    proto: HostQueue,
    conn: Option<Conn>,
    kick: EventFd,
    call: EventFd,
    /// Its epoll token (its device's slot and its index).
    token: u64,
    /// The last round of the agent thread that serviced it (a queue is
    /// serviced at most once per round).
    round: u64,
    reply: Option<mpsc::Sender<Result<MoveReport, AgentError>>>,
    /// Told when a dirty-log switch is in effect on this queue.
    log_reply: Option<mpsc::Sender<u16>>,
    /// The dial whose link the queue waits for (see [`Dial`]), if any.
    linking: Option<u64>,
    /// Dials made so far (a late link from an older one is dropped).
    dials: u64,
    /// A dirty-log switch that came while the queue was being linked: made
    /// once it is (the ATTACH in flight carried the state before it).
    deferred_log: Option<(Option<Arc<DirtyLog>>, mpsc::Sender<u16>)>,
}

/// A device on the agent thread.
struct Device {
    // The queues (their links) before the registrations of guest memory
    // their servers reach through, and those before the memory (drop
    // order).
    queues: Vec<AgentQueue>,
    _regions: Vec<Box<dyn MemoryRegion>>,
    ctx: Ctx,
    /// Every line the agent logs for the device (resumes after a move or a
    /// failover, lost servers) carries it: operators act on device and
    /// queue. (A vhost-user vring is a device of one queue from its base.)
    span: tracing::Span,
}

enum Command {
    Add {
        slot: u32,
        device: Box<Device>,
        reply: mpsc::Sender<Result<(), AgentError>>,
    },
    Detach {
        slot: u32,
        reply: mpsc::Sender<()>,
    },
    Move {
        slot: u32,
        queue: u16,
        to: QueueTarget,
        reply: mpsc::Sender<Result<MoveReport, AgentError>>,
    },
    SetLog {
        slot: u32,
        log: Option<Arc<DirtyLog>>,
        reply: mpsc::Sender<u16>,
    },
    /// A dial made off the thread ended.
    Linked {
        slot: u32,
        queue: u16,
        dial: u64,
        result: Result<Conn, AgentError>,
    },
}

/// A VM host's agent: one thread that serves the queues of any number of
/// devices, as one local sidecore serves all of a host's guests.
///
/// Devices share its wakes: under load one wake finds kicks and
/// completions of several guests, where a thread per device would wake
/// once for each. [`attach`] gives a device an agent (a thread) of its own.
/// Cloning gives another handle to the same thread, which ends when the
/// last handle and the last device attached through it are dropped.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

struct AgentInner {
    wake: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
    commands: mpsc::Sender<Command>,
    join: Mutex<Option<JoinHandle<()>>>,
    cpu_ns: Arc<AtomicU64>,
    next_slot: AtomicU32,
}

impl Agent {
    /// Starts the agent thread, named `name`.
    pub fn new(name: &str) -> Result<Self, AgentError> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let stopping = Arc::new(AtomicBool::new(false));
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let (commands, rx) = mpsc::channel();
        let (w, sp, c) = (wake.clone(), stopping.clone(), cpu_ns.clone());
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run(epoll, &w, &sp, &rx, &c))?;
        Ok(Self {
            inner: Arc::new(AgentInner {
                wake,
                stopping,
                commands,
                join: Mutex::new(Some(join)),
                cpu_ns,
                next_slot: AtomicU32::new(0),
            }),
        })
    }

    /// CPU time of the agent thread so far, in ns (read from its clock
    /// while it runs; what it used in all once it ended).
    pub fn cpu_ns(&self) -> u64 {
        let live = self
            .inner
            .join
            .lock()
            .ok()
            .and_then(|j| j.as_ref().and_then(clock_of));
        live.unwrap_or_else(|| self.inner.cpu_ns.load(Relaxed))
    }

    /// Registers the guest's memory in `domain` (which should be this
    /// guest's alone) and attaches every queue to the I/O server at
    /// `server`; the agent thread serves them from the return on.
    pub fn attach(
        &self,
        domain: Arc<dyn Domain>,
        server: &str,
        dev: DeviceAttach,
        cfg: AgentConfig,
    ) -> Result<AttachedDevice, AgentError> {
        let targets = vec![QueueTarget::any(server); dev.queues.len()];
        self.attach_placed(domain, targets, dev, cfg)
    }

    /// Like [`Agent::attach`], with each queue placed on its own server and
    /// sidecore (`targets[i]` for queue `i`), as a controller decided.
    pub fn attach_placed(
        &self,
        domain: Arc<dyn Domain>,
        targets: Vec<QueueTarget>,
        dev: DeviceAttach,
        cfg: AgentConfig,
    ) -> Result<AttachedDevice, AgentError> {
        let slot = self.inner.next_slot.fetch_add(1, Relaxed) & SLOT_MASK;
        let back = Back {
            commands: self.inner.commands.clone(),
            wake: self.inner.wake.clone(),
        };
        let (device, attached) = build(slot, back, domain, targets, dev, cfg)?;
        let (stats, status) = (device.ctx.stats.clone(), device.ctx.status.clone());
        let (reply, rx) = mpsc::channel();
        self.command(Command::Add {
            slot,
            device: Box::new(device),
            reply,
        })?;
        rx.recv().map_err(|_| AgentError::Stopped)??;
        Ok(AttachedDevice {
            agent: Mutex::new(Some(self.clone())),
            slot,
            stats,
            status,
            config: attached.config,
            features: attached.features,
            timeout: cfg.timeout,
        })
    }

    fn command(&self, c: Command) -> Result<(), AgentError> {
        self.inner
            .commands
            .send(c)
            .map_err(|_| AgentError::Stopped)?;
        self.inner.wake.write(1)?;
        Ok(())
    }
}

impl Drop for AgentInner {
    fn drop(&mut self) {
        self.stopping.store(true, Relaxed);
        let _ = self.wake.write(1);
        let join = self.join.lock().ok().and_then(|mut j| j.take());
        if let Some(j) = join {
            let _ = j.join();
        }
    }
}

/// A device attached to I/O servers; dropping it detaches.
pub struct AttachedDevice {
    /// The agent serving it; `None` once detached.
    agent: Mutex<Option<Agent>>,
    slot: u32,
    stats: Arc<AgentStats>,
    status: Arc<Mutex<Vec<QueueStatus>>>,
    config: Vec<u8>,
    features: u64,
    timeout: Duration,
}

impl AttachedDevice {
    /// What the agent did so far, for all queues of the device.
    pub fn stats(&self) -> &Arc<AgentStats> {
        &self.stats
    }
    /// The device config space the I/O server reported.
    pub fn config_space(&self) -> &[u8] {
        &self.config
    }
    /// Device feature bits the I/O server imposes (`VIRTIO_BLK_F_RO` for
    /// a volume attached read-only): the VMM must offer them to the guest.
    pub fn device_features(&self) -> u64 {
        self.features
    }
    /// Where each queue is served, as of the agent's last event.
    pub fn queues(&self) -> Vec<QueueStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
    /// The agent serving the device, unless it was detached.
    fn agent(&self) -> Result<Agent, AgentError> {
        self.agent
            .lock()
            .ok()
            .and_then(|a| a.clone())
            .ok_or(AgentError::Stopped)
    }
    /// Moves `queue` to `to` while the guest keeps running: a handover from
    /// a live server, or a failover if its server is gone. Blocks until the
    /// queue is served again (or the move failed; the queue is then
    /// orphaned and a later move can place it).
    pub fn move_queue(&self, queue: u16, to: QueueTarget) -> Result<MoveReport, AgentError> {
        let (tx, rx) = mpsc::channel();
        self.agent()?.command(Command::Move {
            slot: self.slot,
            queue,
            to,
            reply: tx,
        })?;
        // A quiesce and an attach, each bounded by the timeout.
        match rx.recv_timeout(self.timeout * 2 + Duration::from_secs(1)) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(AgentError::MoveUnfinished(queue)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(AgentError::Stopped),
        }
    }
    /// Starts (`Some`) or stops logging the I/O servers' writes into the
    /// guest in the VMM's dirty log (live migration). Blocks until every
    /// queue's server confirmed, so that from the return on no write of
    /// theirs escapes the log; a queue whose server does not answer within
    /// the timeout loses its link (and is re-attached with the log state).
    pub fn set_log(&self, log: Option<Arc<DirtyLog>>) -> Result<(), AgentError> {
        let queues = self.status.lock().map(|s| s.len()).unwrap_or(0);
        let (tx, rx) = mpsc::channel();
        self.agent()?.command(Command::SetLog {
            slot: self.slot,
            log,
            reply: tx,
        })?;
        let deadline = Instant::now() + self.timeout + Duration::from_secs(1);
        for _ in 0..queues {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(AgentError::NoLogAnswer),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(AgentError::Stopped),
            }
        }
        Ok(())
    }
    /// Detaches: stops forwarding, closes the endpoints, deregisters memory.
    /// Blocks until the agent thread let go of the device; an agent of the
    /// device's own ([`attach`]) ends with it.
    pub fn detach(&self) {
        let agent = self.agent.lock().ok().and_then(|mut a| a.take());
        if let Some(agent) = agent {
            let (reply, rx) = mpsc::channel();
            if agent
                .command(Command::Detach {
                    slot: self.slot,
                    reply,
                })
                .is_ok()
            {
                // An error means the thread is gone, and the device with it.
                let _ = rx.recv();
            }
        }
    }
}

impl Drop for AttachedDevice {
    fn drop(&mut self) {
        self.detach();
    }
}

/// Registers the guest's memory in `domain` (which should be this guest's
/// alone) and attaches every queue to the I/O server at `server`, served
/// by an agent thread of the device's own ([`Agent`] shares one thread
/// among devices).
pub fn attach(
    domain: Arc<dyn Domain>,
    server: &str,
    dev: DeviceAttach,
    cfg: AgentConfig,
) -> Result<AttachedDevice, AgentError> {
    // The device holds the only handle: its detach ends the thread.
    own_agent(&dev)?.attach(domain, server, dev, cfg)
}

/// Like [`attach`], with each queue placed on its own server and sidecore
/// (`targets[i]` for queue `i`), as a controller decided.
pub fn attach_placed(
    domain: Arc<dyn Domain>,
    targets: Vec<QueueTarget>,
    dev: DeviceAttach,
    cfg: AgentConfig,
) -> Result<AttachedDevice, AgentError> {
    own_agent(&dev)?.attach_placed(domain, targets, dev, cfg)
}

/// An agent thread for `dev` alone.
fn own_agent(dev: &DeviceAttach) -> Result<Agent, AgentError> {
    Agent::new(&format!("vrio-agent-{}", dev.device_id))
}

/// Registers the device's memory and attaches its queues (on the caller's
/// thread: attaching blocks on the servers' replies).
fn build(
    slot: u32,
    back: Back,
    domain: Arc<dyn Domain>,
    targets: Vec<QueueTarget>,
    dev: DeviceAttach,
    cfg: AgentConfig,
) -> Result<(Device, AttachReply), AgentError> {
    if targets.len() != dev.queues.len() {
        return Err(AgentError::TargetCount {
            targets: targets.len(),
            queues: dev.queues.len(),
        });
    }
    let mut regions = Vec::new();
    let mut wire = Vec::new();
    for r in dev.mem.iter() {
        let (ptr, len) = (r.as_ptr(), r.len() as usize);
        // SAFETY: the region is guest RAM mapped by `dev.mem`, which the
        // device keeps alive (an Arc in its `Ctx`, dropped after the
        // registrations) for as long as the registration; when it has a
        // file, it is a shared mapping of that file from `start`
        // (vm-memory's FileOffset), so a fabric that hands the file to the
        // server (shm) gives it the same memory.
        let mr = unsafe {
            match r.file_offset() {
                Some(f) => {
                    use std::os::fd::AsFd;
                    domain.register_fd(ptr, len, Access::GUEST_RAM, f.file().as_fd(), f.start())
                }
                None => domain.register(ptr, len, Access::GUEST_RAM),
            }
        }?;
        wire.push(WireRegion {
            gpa: r.start_addr().0,
            remote: mr.remote(),
        });
        regions.push(mr);
    }
    let map = MemoryMap::of(&*dev.mem)?;
    let ctx = Ctx {
        slot,
        back,
        domain,
        device_id: dev.device_id,
        wire,
        cfg,
        credential: dev.credential.clone(),
        mem: dev.mem.clone(),
        stats: Arc::new(AgentStats::default()),
        status: Arc::new(Mutex::new(Vec::new())),
    };
    let mut queues = Vec::new();
    let mut reply = AttachReply::default();
    for ((i, q), target) in dev.queues.into_iter().enumerate().zip(targets) {
        let index = i as u16;
        let (conn, r) =
            Dial::new(&ctx, index, q.layout, q.features, &target, q.start, false).dial()?;
        reply = r;
        let host_cfg = HostQueueConfig {
            mode: cfg.mode,
            chain_copy: cfg.chain_copy,
            inline_max: cfg.inline_max,
            timeout: cfg.timeout,
            log_data: cfg.log_data,
        };
        let mut proto = HostQueue::new(
            index,
            q.layout,
            q.features,
            &map,
            q.start,
            target,
            host_cfg,
            ctx.stats.clone(),
        )?;
        proto.start(&*ctx.mem);
        queues.push(AgentQueue {
            proto,
            conn: Some(conn),
            kick: q.kick,
            call: q.call,
            token: token(slot, index),
            round: 0,
            reply: None,
            log_reply: None,
            linking: None,
            dials: 0,
            deferred_log: None,
        });
    }
    if let Ok(mut s) = ctx.status.lock() {
        *s = queues.iter().map(|q| q.proto.status()).collect();
    }
    // Its own root, as it was on a thread of its own: not a child of
    // whatever the attaching caller was doing.
    let span = tracing::info_span!(
        parent: None,
        "agent",
        device = format_args!("{:#x}", dev.device_id),
        queue_base = cfg.queue_base
    );
    Ok((
        Device {
            queues,
            _regions: regions,
            ctx,
            span,
        },
        reply,
    ))
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
            backlog: VecDeque::new(),
            stuck_since: None,
        };
        let recvs: Vec<RecvRequest> = (0..RECV_SLOTS).map(|s| c.recv_wr(s)).collect();
        c.ep.post_recv(&recvs)?;
        Ok(c)
    }

    /// Puts the link's notify fd in the agent's epoll under `token`,
    /// edge-triggered, and arms it. Edge-triggered: the endpoint then
    /// need not read its fd at every wake, one system call less per wake;
    /// `service` arms and polls it after every event, which is all an
    /// edge-triggered fd asks.
    fn enlist(&mut self, epoll: &Epoll, token: u64) -> Result<(), AgentError> {
        epoll.ctl(
            ControlOperation::Add,
            self.ep.notify_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token),
        )?;
        self.ep.set_edge_triggered();
        self.ep.arm()?;
        Ok(())
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

    /// Sends `m`, or keeps it for [`Conn::flush`] when every send slot is
    /// taken (or older messages wait): never blocks.
    fn send(&mut self, m: &Message) -> Result<(), AgentError> {
        m.encode(&mut self.scratch).map_err(AgentError::Encode)?;
        if self.backlog.is_empty() {
            if let Some(slot) = self.free_send.pop() {
                let msg = std::mem::take(&mut self.scratch);
                let r = self.post(slot, &msg);
                self.scratch = msg;
                return r;
            }
        }
        if self.backlog.len() >= BACKLOG_MAX {
            return Err(AgentError::SendQueueStuck);
        }
        self.backlog.push_back(self.scratch.clone());
        self.stuck_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Posts encoded message `msg` from send slot `slot`.
    fn post(&mut self, slot: usize, msg: &[u8]) -> Result<(), AgentError> {
        self.bufs.put(slot * MAX_MSG, msg)?;
        self.ep.post_send(&[SendRequest {
            wr_id: slot as u64,
            opcode: Opcode::Send,
            local: Sge {
                lkey: self.mr.lkey(),
                addr: self.bufs.addr() + (slot * MAX_MSG) as u64,
                len: msg.len() as u32,
            },
            signaled: true,
        }])?;
        Ok(())
    }

    /// Sends held-back messages, in order, as far as slots are free; fails
    /// the link when the backlog stood still for [`SEND_WAIT`].
    fn flush(&mut self, now: Instant) -> Result<(), AgentError> {
        let mut moved = false;
        while !self.backlog.is_empty() {
            let Some(slot) = self.free_send.pop() else {
                break;
            };
            if let Some(msg) = self.backlog.pop_front() {
                self.post(slot, &msg)?;
                moved = true;
            }
        }
        if self.backlog.is_empty() {
            self.stuck_since = None;
        } else if moved {
            self.stuck_since = Some(now);
        } else if self
            .stuck_since
            .is_some_and(|t| now.saturating_duration_since(t) >= SEND_WAIT)
        {
            return Err(AgentError::SendQueueStuck);
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

    fn wait_reply(&mut self, queue: u16, timeout: Duration) -> Result<AttachReply, AgentError> {
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
                    Message::AttachReply(r) if r.status == 0 => Ok(r),
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

/// What attaching a queue takes, owned, so that a move or a failover can
/// attach off the agent thread (a server that is slow to answer must not
/// stall the other devices the thread serves).
struct Dial {
    domain: Arc<dyn Domain>,
    server: String,
    endpoint: EndpointConfig,
    timeout: Duration,
    index: u16,
    message: Message,
}

impl Dial {
    /// Attaching queue `index` at `to`, resuming at `start` (with the agent
    /// logging dirty pages if `logging`).
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &Ctx,
        index: u16,
        layout: RingLayout,
        features: RingFeatures,
        to: &QueueTarget,
        start: u16,
        logging: bool,
    ) -> Self {
        let attach = Attach {
            device_id: ctx.device_id,
            queue: ctx.cfg.queue_base.wrapping_add(index),
            layout,
            features,
            mode: ctx.cfg.mode,
            start,
            sidecore: to.sidecore,
            logging,
            regions: ctx.wire.clone(),
        };
        let message = match (ctx.cfg.device, &ctx.credential) {
            // Plain ATTACH means blk (what every server understands).
            (DeviceKind::Blk, None) => Message::Attach(attach),
            (device, credential) => Message::AttachDevice(AttachDevice {
                attach,
                device,
                credential: credential.clone(),
            }),
        };
        Self {
            domain: ctx.domain.clone(),
            server: to.server.clone(),
            endpoint: ctx.cfg.endpoint,
            timeout: ctx.cfg.timeout,
            index,
            message,
        }
    }

    /// Connects and attaches; returns the link and the server's reply
    /// (config space, features). Blocks up to the timeout.
    fn dial(&self) -> Result<(Conn, AttachReply), AgentError> {
        let mut conn = Conn::open(&*self.domain, &self.server, self.endpoint)?;
        conn.send(&self.message)?;
        let reply = conn.wait_reply(self.index, self.timeout)?;
        Ok((conn, reply))
    }
}

impl AgentQueue {
    /// Updates this queue's entry of the device's status (before any move
    /// reply, so a caller sees the state the reply describes).
    fn publish(&self, ctx: &Ctx) {
        if let Ok(mut s) = ctx.status.lock() {
            if let Some(e) = s.get_mut(usize::from(self.proto.index())) {
                *e = self.proto.status();
            }
        }
    }

    /// Whether it must be serviced though no fd of its is ready: it must
    /// push again, or waits for a timer.
    fn needs_attention(&self) -> bool {
        self.proto.needs_push() || self.proto.is_moving() || self.proto.log_switching()
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

    /// A move command from the device's owner.
    fn on_move(
        &mut self,
        ctx: &Ctx,
        epoll: &Epoll,
        to: QueueTarget,
        reply: mpsc::Sender<Result<MoveReport, AgentError>>,
    ) {
        if self.proto.is_moving() {
            let _ = reply.send(Err(AgentError::Busy(self.proto.index())));
            return;
        }
        self.reply = Some(reply);
        self.proto.on_move(to, Instant::now());
        self.act(ctx, epoll);
    }

    /// Dial `dial` ended with `result`: the queue is served on its link,
    /// or waits for another placement.
    fn linked(&mut self, ctx: &Ctx, epoll: &Epoll, dial: u64, result: Result<Conn, AgentError>) {
        if self.linking != Some(dial) {
            return; // an older dial's: its link closes here
        }
        self.linking = None;
        let r = result.and_then(|mut conn| {
            conn.enlist(epoll, self.token)?;
            Ok(conn)
        });
        let now = Instant::now();
        match r {
            Ok(conn) => {
                self.conn = Some(conn);
                self.proto.attached(&*ctx.mem, now);
            }
            Err(e) => self.proto.attach_failed(e, now),
        }
        if let Some((log, reply)) = self.deferred_log.take() {
            self.log_reply = Some(reply);
            self.proto.set_log(log, now);
        }
        self.act(ctx, epoll);
    }

    /// A dirty-log switch: now, or once the link being made is up.
    fn set_log(
        &mut self,
        ctx: &Ctx,
        epoll: &Epoll,
        log: Option<Arc<DirtyLog>>,
        reply: &mpsc::Sender<u16>,
    ) {
        if self.linking.is_some() {
            // A switch this one overrides is as good as done.
            if let Some((_, older)) = self.deferred_log.replace((log, reply.clone())) {
                let _ = older.send(self.proto.index());
            }
            return;
        }
        self.log_reply = Some(reply.clone());
        self.proto.set_log(log, Instant::now());
        self.act(ctx, epoll);
    }

    /// Carries out what the protocol asked for.
    fn act(&mut self, ctx: &Ctx, epoll: &Epoll) {
        while let Some(a) = self.proto.poll_action() {
            match a {
                Action::Send(m) => {
                    let r = match &mut self.conn {
                        Some(c) => c.send(&m),
                        None => Err(AgentError::NoServer),
                    };
                    self.proto.recycle(m);
                    if let Err(e) = r {
                        self.proto.on_link_error(e, Instant::now());
                    }
                }
                Action::CloseLink => {
                    self.drop_conn(epoll);
                    self.publish(ctx);
                }
                Action::Attach { to } => {
                    self.drop_conn(epoll);
                    // The old link is closed: the used index is final now.
                    let start = self.proto.resume_index(&*ctx.mem);
                    let l = *self.proto.layout();
                    let dial = Dial::new(
                        ctx,
                        self.proto.index(),
                        l,
                        self.proto.features(),
                        &to,
                        start,
                        self.proto.logging(),
                    );
                    self.dials += 1;
                    let (id, back, slot, queue) =
                        (self.dials, ctx.back.clone(), ctx.slot, self.proto.index());
                    // Off the thread: connecting and the server's answer can
                    // take up to the timeout. The protocol waits for it in
                    // its Attaching state; `linked` takes the answer.
                    let spawned = std::thread::Builder::new()
                        .name("vrio-agent-dial".into())
                        .spawn(move || {
                            let result = dial.dial().map(|(conn, _)| conn);
                            // Gone (detached, stopped): the link closes here.
                            let _ = back.send(Command::Linked {
                                slot,
                                queue,
                                dial: id,
                                result,
                            });
                        });
                    match spawned {
                        Ok(_) => self.linking = Some(id),
                        Err(e) => self.proto.attach_failed(e.into(), Instant::now()),
                    }
                }
                Action::Interrupt => {
                    let _ = self.call.write(1);
                }
                Action::MoveDone(r) => {
                    self.publish(ctx);
                    if let Some(reply) = self.reply.take() {
                        let _ = reply.send(r);
                    }
                }
                Action::LogSwitched => {
                    if let Some(reply) = self.log_reply.take() {
                        let _ = reply.send(self.proto.index());
                    }
                }
            }
        }
    }

    /// Handles this queue's events (`kicked`: epoll reported a write to its
    /// kick fd since the last report); errors end its link.
    fn service(&mut self, ctx: &Ctx, epoll: &Epoll, kicked: bool) {
        let now = Instant::now();
        if self.linking.is_some() || self.conn.is_none() {
            // Orphaned, or its next link is being made: kicks are
            // remembered by the ring itself.
            if self.linking.is_some() {
                // The protocol waits for the link (`AgentQueue::linked`).
                return;
            }
        } else {
            if let Err(e) = self.completions(ctx) {
                self.proto.on_link_error(e, now);
            }
            if let Some(Err(e)) = self.conn.as_mut().map(|c| c.flush(now)) {
                self.proto.on_link_error(e, now);
            }
            if kicked || self.proto.needs_push() {
                self.proto.on_kick(&*ctx.mem, now);
            }
            if let Some(c) = &mut self.conn {
                if let Err(e) = c.ep.arm() {
                    self.proto.on_link_error(e.into(), now);
                }
            }
            // Completions that raced with arming.
            if let Err(e) = self.completions(ctx) {
                self.proto.on_link_error(e, now);
            }
        }
        self.proto.on_timer(now);
        self.act(ctx, epoll);
    }

    /// Feeds the link's completions to the protocol: used-index updates,
    /// messages, send slots.
    fn completions(&mut self, ctx: &Ctx) -> Result<(), AgentError> {
        let mut c = [Completion::EMPTY; 32];
        loop {
            let Some(conn) = &mut self.conn else {
                return Ok(());
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
                    return Ok(());
                };
                if c.wr_id & RECV_TAG == 0 {
                    conn.free_send.push(c.wr_id as usize);
                    continue;
                }
                let s = (c.wr_id & !RECV_TAG) as usize;
                let now = Instant::now();
                if c.opcode == WcOpcode::RecvWithImm {
                    if s >= RECV_SLOTS {
                        return Err(AgentError::RecvOutOfRange);
                    }
                    let wr = conn.recv_wr(s);
                    conn.ep.post_recv(&[wr])?;
                    self.proto.on_used(&*ctx.mem, c.imm.unwrap_or(0), now);
                } else {
                    let m = conn.take_message(s, c.byte_len)?;
                    self.proto.on_message(&*ctx.mem, m, now);
                }
                if self.proto.link_closing() {
                    return Ok(());
                }
            }
            if n < c.len() {
                return Ok(());
            }
        }
    }
}

impl Device {
    /// Puts the device's fds in the agent's epoll and arms its links. Kick
    /// fds are edge-triggered: a kick is news of the ring, not a count to
    /// consume, so they are never read (a read per kick was one more
    /// system call on the VM host for every QD-1 request). The count they
    /// keep is harmless: eventfds count to 2^64 - 2, and whoever takes the
    /// fd next reads it once.
    fn enlist(&mut self, epoll: &Epoll) -> Result<(), AgentError> {
        for q in self.queues.iter_mut() {
            epoll.ctl(
                ControlOperation::Add,
                q.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, q.token | KICK),
            )?;
            if let Some(c) = &mut q.conn {
                c.enlist(epoll, q.token)?;
            }
        }
        Ok(())
    }

    /// Takes the device's fds out of the agent's epoll and closes its
    /// links. The kick fds must go explicitly: the guest's side keeps them
    /// open, and epoll would go on reporting them.
    fn delist(&mut self, epoll: &Epoll) {
        for q in self.queues.iter_mut() {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                q.kick.as_raw_fd(),
                EpollEvent::default(),
            );
            q.drop_conn(epoll);
        }
    }
}

/// Carries out a command of a device's owner.
fn command(c: Command, devices: &mut HashMap<u32, Device>, epoll: &Epoll) {
    match c {
        Command::Add {
            slot,
            mut device,
            reply,
        } => match device.enlist(epoll) {
            Ok(()) => {
                devices.insert(slot, *device);
                let _ = reply.send(Ok(()));
            }
            Err(e) => {
                device.delist(epoll);
                let _ = reply.send(Err(e));
            }
        },
        Command::Detach { slot, reply } => {
            if let Some(mut d) = devices.remove(&slot) {
                d.delist(epoll);
                // For an agent of the device's own, its whole thread.
                d.ctx.stats.cpu_ns.store(thread_cpu_ns(), Relaxed);
            }
            let _ = reply.send(());
        }
        Command::Move {
            slot,
            queue,
            to,
            reply,
        } => {
            let Some(d) = devices.get_mut(&slot) else {
                let _ = reply.send(Err(AgentError::Stopped));
                return;
            };
            let _span = d.span.enter();
            match d.queues.get_mut(usize::from(queue)) {
                Some(q) => q.on_move(&d.ctx, epoll, to, reply),
                None => {
                    let _ = reply.send(Err(AgentError::NoSuchQueue(queue)));
                }
            }
        }
        Command::SetLog { slot, log, reply } => {
            let Some(d) = devices.get_mut(&slot) else {
                return;
            };
            let _span = d.span.enter();
            for q in d.queues.iter_mut() {
                q.set_log(&d.ctx, epoll, log.clone(), &reply);
            }
        }
        Command::Linked {
            slot,
            queue,
            dial,
            result,
        } => {
            // A device detached meanwhile: the link closes here.
            let Some(d) = devices.get_mut(&slot) else {
                return;
            };
            let _span = d.span.enter();
            if let Some(q) = d.queues.get_mut(usize::from(queue)) {
                q.linked(&d.ctx, epoll, dial, result);
            }
        }
    }
}

/// The agent thread: waits for kicks, completions and commands, and
/// services the queues they concern (plus those that wait for a timer or
/// must push again, and every queue each [`SWEEP`]).
fn run(
    epoll: Epoll,
    wake: &EventFd,
    stopping: &AtomicBool,
    commands: &mpsc::Receiver<Command>,
    cpu_ns: &AtomicU64,
) {
    let mut devices: HashMap<u32, Device> = HashMap::new();
    let mut events = vec![EpollEvent::default(); 64];
    // (slot, queue, kicked) of the queues this round's events concern.
    let mut ready: Vec<(u32, u16, bool)> = Vec::with_capacity(64);
    let mut swept = Instant::now();
    let mut round = 0u64;
    loop {
        let (mut repush, mut moving) = (false, false);
        for q in devices.values().flat_map(|d| &d.queues) {
            repush |= q.proto.needs_push();
            moving |= q.proto.is_moving() || q.proto.log_switching();
        }
        let timeout = if repush {
            0
        } else if moving {
            20
        } else {
            SWEEP.as_millis() as i32
        };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "agent epoll failed");
                break;
            }
        };
        round += 1;
        ready.clear();
        let mut woken = false;
        for e in &events[..n] {
            let t = e.data();
            if t == WAKE {
                woken = true;
                continue;
            }
            let (slot, queue, kicked) = ((t >> SLOT_SHIFT) as u32, t as u16, t & KICK != 0);
            match ready.iter_mut().find(|r| r.0 == slot && r.1 == queue) {
                Some(r) => r.2 |= kicked,
                None => ready.push((slot, queue, kicked)),
            }
        }
        if woken {
            let _ = wake.read();
            if stopping.load(Relaxed) {
                break;
            }
            while let Ok(c) = commands.try_recv() {
                command(c, &mut devices, &epoll);
            }
        }
        for &(slot, queue, kicked) in &ready {
            let Some(d) = devices.get_mut(&slot) else {
                continue; // detached this round
            };
            if let Some(q) = d.queues.get_mut(usize::from(queue)) {
                let _span = d.span.enter();
                q.round = round;
                q.service(&d.ctx, &epoll, kicked);
            }
        }
        let sweep = swept.elapsed() >= SWEEP;
        for d in devices.values_mut() {
            for q in d.queues.iter_mut() {
                if q.round != round && (sweep || q.needs_attention()) {
                    let _span = d.span.enter();
                    q.round = round;
                    q.service(&d.ctx, &epoll, false);
                }
            }
        }
        if sweep {
            // Keeps the used indexes fresh; state changes publish at once.
            swept = Instant::now();
            for d in devices.values() {
                for q in &d.queues {
                    q.publish(&d.ctx);
                }
            }
        }
    }
    cpu_ns.store(thread_cpu_ns(), Relaxed);
    for (_, mut d) in devices.drain() {
        d.delist(&epoll);
        d.ctx.stats.cpu_ns.store(thread_cpu_ns(), Relaxed);
    }
}
