//! The VM-host agent, as a library a VMM links: it registers guest memory
//! (one protection domain per guest), attaches each queue to an I/O server,
//! forwards guest kicks as doorbells, and on each completion publishes
//! used.idx and raises the guest interrupt when the guest asks for one.
//! It never touches request data.

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::Arc;
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
    doorbell_entry_size, Attach, Doorbell, DoorbellEntry, Message, NotifyMode, WireRegion,
    DOORBELL_HEADER, MAX_MSG,
};
use crate::cputime::thread_cpu_ns;
use crate::memory::{GuestMemory, LocalMemory, MemoryMap};
use crate::ring::layout::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY};
use crate::ring::{DeviceQueue, RingFeatures, RingLayout};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    #[error("the I/O server refused queue {queue}: status {status}")]
    Refused { queue: u16, status: u16 },
    #[error("attach protocol: {0}")]
    Protocol(String),
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
}

pub struct DeviceAttach {
    pub device_id: u64,
    pub mem: Arc<LocalMemory>,
    pub queues: Vec<QueueAttach>,
}

#[derive(Debug, Clone, Copy)]
pub struct AgentConfig {
    pub mode: NotifyMode,
    pub endpoint: EndpointConfig,
    /// Descriptors copied per chain into a doorbell (the server fetches
    /// the rest).
    pub chain_copy: usize,
    pub timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            mode: NotifyMode::Doorbell,
            endpoint: EndpointConfig::default(),
            chain_copy: 8,
            timeout: Duration::from_secs(10),
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
}

const SEND_SLOTS: usize = 64;
const RECV_SLOTS: usize = 32;
const RECV_TAG: u64 = 1 << 63;

struct AgentQueue {
    // Registrations before the buffers they cover (drop order).
    mr: Box<dyn MemoryRegion>,
    ep: Box<dyn Endpoint>,
    bufs: StagingBuffer,
    index: u16,
    layout: RingLayout,
    features: RingFeatures,
    dq: DeviceQueue,
    kick: EventFd,
    call: EventFd,
    last_pushed: Wrapping<u16>,
    polled_by_server: bool,
    free_send: Vec<usize>,
    dead: bool,
}

/// A device attached to an I/O server; dropping it detaches.
pub struct AttachedDevice {
    stop: Arc<EventFd>,
    join: Option<JoinHandle<()>>,
    stats: Arc<AgentStats>,
    config: Vec<u8>,
}

impl AttachedDevice {
    pub fn stats(&self) -> &Arc<AgentStats> {
        &self.stats
    }
    /// The device config space the I/O server reported.
    pub fn config_space(&self) -> &[u8] {
        &self.config
    }
    /// Detaches: stops forwarding, closes the endpoints, deregisters memory.
    pub fn detach(&mut self) {
        let _ = self.stop.write(1);
        if let Some(j) = self.join.take() {
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
    let map = MemoryMap::of(&*dev.mem).map_err(|e| AgentError::Protocol(e.to_string()))?;
    let mut queues = Vec::new();
    let mut config = Vec::new();
    for (i, q) in dev.queues.into_iter().enumerate() {
        let bufs = StagingBuffer::new((SEND_SLOTS + RECV_SLOTS) * MAX_MSG)?;
        // SAFETY: `bufs` is owned by the queue next to its registration and
        // outlives it (declared later, dropped later).
        let mr = unsafe { domain.register(bufs.as_ptr(), bufs.len(), Access::LOCAL_ONLY) }?;
        let ep = domain.connect(server, cfg.endpoint)?;
        let dq = DeviceQueue::new(q.layout, q.features, &map)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let mut aq = AgentQueue {
            mr,
            ep,
            bufs,
            index: i as u16,
            layout: q.layout,
            features: q.features,
            dq,
            kick: q.kick,
            call: q.call,
            last_pushed: Wrapping(0),
            polled_by_server: cfg.mode == NotifyMode::RemotePoll,
            free_send: (0..SEND_SLOTS).collect(),
            dead: false,
        };
        let recvs: Vec<RecvRequest> = (0..RECV_SLOTS).map(|s| aq.recv_wr(s)).collect();
        aq.ep.post_recv(&recvs)?;
        aq.send(&Message::Attach(Attach {
            device_id: dev.device_id,
            queue: i as u16,
            layout: q.layout,
            features: q.features,
            mode: cfg.mode,
            regions: wire.clone(),
        }))?;
        config = aq.wait_reply(cfg.timeout)?;
        if aq.polled_by_server {
            aq.set_kicks(&dev.mem, false);
        } else {
            aq.set_kicks(&dev.mem, true);
        }
        queues.push(aq);
    }
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let stats = Arc::new(AgentStats::default());
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        stop.as_raw_fd(),
        EpollEvent::new(EventSet::IN, u64::MAX),
    )?;
    for (i, q) in queues.iter_mut().enumerate() {
        epoll.ctl(
            ControlOperation::Add,
            q.kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            q.ep.notify_fd(),
            EpollEvent::new(EventSet::IN, i as u64),
        )?;
        q.ep.arm()?;
    }
    let (st, mem) = (stats.clone(), dev.mem.clone());
    let chain_copy = cfg.chain_copy;
    let join = std::thread::Builder::new()
        .name(format!("vrio-agent-{}", dev.device_id))
        .spawn(move || {
            run(queues, mem, epoll, &st, chain_copy);
            st.cpu_ns.store(thread_cpu_ns(), Relaxed);
            drop(regions);
            drop(domain);
        })?;
    Ok(AttachedDevice {
        stop,
        join: Some(join),
        stats,
        config,
    })
}

impl AgentQueue {
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
        let mut buf = Vec::with_capacity(256);
        m.encode(&mut buf)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.free_send.is_empty() {
            self.reap_sends_only()?;
            if Instant::now() > deadline {
                return Err(AgentError::Protocol("send queue stuck".into()));
            }
        }
        let slot = self.free_send.pop().unwrap_or(0);
        self.bufs
            .put(slot * MAX_MSG, &buf)
            .map_err(|e| AgentError::Protocol(e.to_string()))?;
        self.ep.post_send(&[SendRequest {
            wr_id: slot as u64,
            opcode: Opcode::Send,
            local: Sge {
                lkey: self.mr.lkey(),
                addr: self.bufs.addr() + (slot * MAX_MSG) as u64,
                len: buf.len() as u32,
            },
            signaled: true,
        }])?;
        Ok(())
    }

    /// Only used while the send ring is full and before the thread runs.
    fn reap_sends_only(&mut self) -> Result<(), AgentError> {
        let mut c = [empty_cqe(); 16];
        let n = self.ep.poll(&mut c)?;
        for c in &c[..n] {
            if c.wr_id & RECV_TAG == 0 {
                if !c.status.is_ok() {
                    return Err(AgentError::Protocol(format!("send failed: {:?}", c.status)));
                }
                self.free_send.push(c.wr_id as usize);
            }
        }
        Ok(())
    }

    fn wait_reply(&mut self, timeout: Duration) -> Result<Vec<u8>, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut c = [empty_cqe(); 16];
        loop {
            let n = self.ep.poll(&mut c)?;
            for c in &c[..n] {
                if !c.status.is_ok() {
                    return Err(AgentError::Protocol(format!(
                        "attach failed: completion {:?}",
                        c.status
                    )));
                }
                if c.wr_id & RECV_TAG == 0 {
                    self.free_send.push(c.wr_id as usize);
                    continue;
                }
                let s = (c.wr_id & !RECV_TAG) as usize;
                let mut b = vec![0u8; (c.byte_len as usize).min(MAX_MSG)];
                self.bufs
                    .get((SEND_SLOTS + s) * MAX_MSG, &mut b)
                    .map_err(|e| AgentError::Protocol(e.to_string()))?;
                let wr = self.recv_wr(s);
                self.ep.post_recv(&[wr])?;
                return match Message::decode(&b) {
                    Ok(Message::AttachReply(r)) if r.status == 0 => Ok(r.config),
                    Ok(Message::AttachReply(r)) => Err(AgentError::Refused {
                        queue: self.index,
                        status: r.status,
                    }),
                    other => Err(AgentError::Protocol(format!(
                        "expected an attach reply, got {other:?}"
                    ))),
                };
            }
            if Instant::now() > deadline {
                return Err(AgentError::Protocol(
                    "no attach reply from the server".into(),
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
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
            let avail = Wrapping(
                mem.load_u16(self.layout.avail_idx())
                    .map_err(|e| AgentError::Protocol(e.to_string()))?,
            );
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
            let flags = u16::from_le_bytes([b[12], b[13]]);
            if flags & VRING_DESC_F_INDIRECT != 0 {
                let mut a = [0u8; 8];
                a.copy_from_slice(&b[0..8]);
                let table = u64::from_le_bytes(a);
                let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
                let n = (len / 16).min(max.saturating_sub(e.descs.len()));
                for i in 0..n {
                    let ga = table.wrapping_add(16 * i as u64);
                    let mut t = [0u8; 16];
                    if mem.read(ga, &mut t).is_err() {
                        break;
                    }
                    e.descs.push((ga, t));
                }
                break;
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            idx = u16::from_le_bytes([b[14], b[15]]);
        }
        e
    }

    /// Completions: used-index updates, mode changes, send slots.
    fn on_completions(
        &mut self,
        mem: &LocalMemory,
        stats: &AgentStats,
        chain_copy: usize,
    ) -> Result<(), AgentError> {
        let mut c = [empty_cqe(); 32];
        loop {
            let n = self.ep.poll(&mut c)?;
            for c in &c[..n] {
                if !c.status.is_ok() {
                    return Err(AgentError::Protocol(format!(
                        "fabric completion {:?} (wr {:#x})",
                        c.status, c.wr_id
                    )));
                }
                if c.wr_id & RECV_TAG == 0 {
                    self.free_send.push(c.wr_id as usize);
                    continue;
                }
                let s = (c.wr_id & !RECV_TAG) as usize;
                if s >= RECV_SLOTS {
                    return Err(AgentError::Protocol("receive id out of range".into()));
                }
                if c.opcode == WcOpcode::RecvWithImm {
                    let wr = self.recv_wr(s);
                    self.ep.post_recv(&[wr])?;
                    let idx = c.imm.unwrap_or(0) as u16;
                    // The used elements landed before the immediate (RC
                    // ordering); publishing the index releases them.
                    self.dq
                        .publish_used(mem, idx)
                        .map_err(|e| AgentError::Protocol(e.to_string()))?;
                    stats.completions.fetch_add(1, Relaxed);
                    if self
                        .dq
                        .needs_notification(mem)
                        .map_err(|e| AgentError::Protocol(e.to_string()))?
                    {
                        let _ = self.call.write(1);
                        stats.interrupts.fetch_add(1, Relaxed);
                    }
                    continue;
                }
                let mut b = vec![0u8; (c.byte_len as usize).min(MAX_MSG)];
                self.bufs
                    .get((SEND_SLOTS + s) * MAX_MSG, &mut b)
                    .map_err(|e| AgentError::Protocol(e.to_string()))?;
                let wr = self.recv_wr(s);
                self.ep.post_recv(&[wr])?;
                match Message::decode(&b) {
                    Ok(Message::SetMode(m)) if m.poll => {
                        self.polled_by_server = true;
                        self.set_kicks(mem, false);
                    }
                    Ok(Message::SetMode(m)) => {
                        self.polled_by_server = false;
                        self.last_pushed = Wrapping(m.next_avail);
                        self.set_kicks(mem, true);
                        self.push(mem, stats, chain_copy)?;
                    }
                    other => {
                        return Err(AgentError::Protocol(format!(
                            "unexpected message from server: {other:?}"
                        )))
                    }
                }
            }
            if n < c.len() {
                return Ok(());
            }
        }
    }
}

fn empty_cqe() -> Completion {
    Completion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Send,
        byte_len: 0,
        imm: None,
    }
}

fn run(
    mut queues: Vec<AgentQueue>,
    mem: Arc<LocalMemory>,
    epoll: Epoll,
    stats: &AgentStats,
    chain_copy: usize,
) {
    let mut events = vec![EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(1000, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "agent epoll failed");
                return;
            }
        };
        if events[..n].iter().any(|e| e.data() == u64::MAX) {
            return;
        }
        for q in queues.iter_mut().filter(|q| !q.dead) {
            let r = (|| {
                q.on_completions(&mem, stats, chain_copy)?;
                let kicked = q.kick.read().is_ok();
                if kicked {
                    stats.kicks.fetch_add(1, Relaxed);
                }
                if kicked && !q.polled_by_server {
                    q.push(&mem, stats, chain_copy)?;
                }
                q.ep.arm()?;
                // Completions that raced with arming.
                q.on_completions(&mem, stats, chain_copy)
            })();
            if let Err(e) = r {
                tracing::error!(queue = q.index, error = %e, "queue detached after an error");
                q.dead = true;
            }
        }
    }
}
