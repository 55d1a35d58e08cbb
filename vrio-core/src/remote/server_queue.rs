//! The I/O server's side of one remote queue: a [`ServedQueue`] whose rings
//! and buffers are reached only through the fabric.
//!
//! Per batch of requests:
//! 1. learn of requests: doorbells already received (doorbell mode), or one
//!    READ of the avail ring (remote poll);
//! 2. walk and validate each chain over a [`Shadow`]; what is missing is
//!    fetched with READ (the whole table once, then indirect tables);
//! 3. one wave of READs brings every readable segment into staging;
//! 4. the unchanged device model runs over the staged bytes;
//! 5. one wave of WRITEs returns the writable segments and the used
//!    elements, closed by a WRITE_WITH_IMM carrying the new used index; the
//!    VM host publishes used.idx and interrupts the guest.

use std::cell::UnsafeCell;
use std::num::Wrapping;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vrio_rdma::{
    Access, Completion, Domain, Endpoint, MemoryRegion, Opcode, RecvRequest, SendRequest, Sge,
    WcOpcode, WcStatus,
};

use super::shadow::Shadow;
use super::staging::{StagedChain, StagingBuffer};
use super::stats::RemoteStats;
use super::wire::{Attach, DoorbellEntry, Message, NotifyMode, SetMode, WireRegion, MAX_MSG};
use crate::device::DeviceModel;
use crate::memory::{GuestRegion, MemoryError, MemoryMap};
use crate::ring::{ChainError, DescriptorChain, RingFeatures, RingLayout, Walker};
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};

#[derive(Debug, Clone, Copy)]
pub struct RemoteQueueConfig {
    /// Largest request (all segments) served; larger ones fail.
    pub max_request: usize,
    /// Requests per batch (also bounded by the sidecore's budget).
    pub max_batch: usize,
    /// Fetches allowed per chain before it is refused.
    pub max_fetches: u32,
    /// Adaptive: a batch at least this big counts as busy...
    pub busy_batch: usize,
    /// ...and this many busy batches in a row switch to remote polling.
    pub busy_polls: u32,
    /// Adaptive: this many empty remote polls switch back to doorbells.
    pub idle_polls: u32,
    /// Give up on the peer after this long without a completion.
    pub op_timeout: Duration,
}

impl Default for RemoteQueueConfig {
    fn default() -> Self {
        Self {
            max_request: 128 << 10,
            max_batch: 32,
            max_fetches: 4,
            busy_batch: 4,
            busy_polls: 8,
            idle_polls: 256,
            op_timeout: Duration::from_secs(10),
        }
    }
}

/// Offsets inside the staging buffer.
#[derive(Debug, Clone, Copy)]
struct Areas {
    desc: usize,
    avail: usize,
    used: usize,
    fetch: usize,
    send: usize,
    data: usize,
}

const FETCH_MAX: usize = 64 << 10;

/// Direction of a one-sided request, seen from the server.
#[derive(Debug, Clone, Copy)]
enum Dir {
    Read,
    Write,
    WriteImm(u32),
}

/// Where the current batch is: waiting for nothing, for its READ wave, or
/// for its reply wave (each names the signalled work request that ends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Idle,
    Reading(u64),
    Writing(u64),
}
const RECV_TAG: u64 = 1 << 63;

fn align(x: usize) -> usize {
    x.div_ceil(4096) * 4096
}

pub struct RemoteQueue<D> {
    // Registrations first: fields drop in order, and a region must be
    // deregistered before its memory is unmapped.
    mr_staging: Box<dyn MemoryRegion>,
    mr_recv: Box<dyn MemoryRegion>,
    ep: Box<dyn Endpoint>,
    staging: UnsafeCell<StagingBuffer>,
    recv: StagingBuffer,
    name: String,
    cfg: RemoteQueueConfig,
    areas: Areas,
    mode: NotifyMode,
    polling_remote: bool,
    layout: RingLayout,
    features: RingFeatures,
    map: MemoryMap,
    regions: Vec<WireRegion>,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    known_avail: Wrapping<u16>,
    pending: Vec<Option<DoorbellEntry>>,
    device: D,
    walker: Walker,
    shadow: Shadow,
    batch: Vec<(u16, Result<DescriptorChain, ChainError>)>,
    bases: Vec<usize>,
    /// Per batch entry: too large to serve, failed with an error status.
    oversize: Vec<bool>,
    used_lens: Vec<u32>,
    batch_rtts: u64,
    batch_out: PollOutcome,
    stage: Stage,
    stage_started: Instant,
    /// Highest signalled work request known complete.
    done_wr: u64,
    spare_chains: Vec<DescriptorChain>,
    wrs: Vec<SendRequest>,
    cqes: Vec<Completion>,
    msg: Vec<u8>,
    wr_seq: u64,
    busy_run: u32,
    idle_run: u32,
    stats: Arc<RemoteStats>,
    failed: Option<String>,
    /// The agent asked for the queue back: finish the batch, start no other.
    quiescing: bool,
    /// Lives as long as the queue; the server's registry holds a weak
    /// reference to tell served queues from dropped ones.
    alive: Arc<()>,
}

fn fail(name: &str, reason: impl std::fmt::Display) -> QueueFailure {
    QueueFailure {
        queue: name.to_string(),
        reason: reason.to_string(),
    }
}

impl<D: DeviceModel> RemoteQueue<D> {
    /// Builds the server side of a queue from the agent's ATTACH, on an
    /// endpoint that already has `recv` buffers posted for its first SEND.
    pub fn new(
        domain: &dyn Domain,
        ep: Box<dyn Endpoint>,
        attach: &Attach,
        device: D,
        cfg: RemoteQueueConfig,
        stats: Arc<RemoteStats>,
    ) -> Result<Self, QueueFailure> {
        let name = super::queue_name(attach.device_id, attach.queue);
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
        )
        .map_err(|e| fail(&name, e))?;
        let layout = attach.layout;
        for (a, n) in [
            (layout.desc, layout.desc_table_bytes()),
            (layout.avail, layout.avail_bytes()),
            (layout.used, layout.used_bytes()),
        ] {
            map.check(a, n).map_err(|e| fail(&name, e))?;
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
        o = align(o + MAX_MSG);
        let data = o;
        let data_len = cfg.max_request * cfg.max_batch.max(1);
        let areas = Areas {
            desc,
            avail,
            used,
            fetch,
            send,
            data,
        };
        let staging = StagingBuffer::new(data + data_len).map_err(|e| fail(&name, e))?;
        let recv = StagingBuffer::new(size * MAX_MSG).map_err(|e| fail(&name, e))?;
        // SAFETY: both buffers are owned by the queue and outlive their
        // registrations (declared earlier, dropped earlier).
        let mr_staging =
            unsafe { domain.register(staging.as_ptr(), staging.len(), Access::LOCAL_ONLY) }
                .map_err(|e| fail(&name, e))?;
        // SAFETY: as above.
        let mr_recv = unsafe { domain.register(recv.as_ptr(), recv.len(), Access::LOCAL_ONLY) }
            .map_err(|e| fail(&name, e))?;
        let mut q = Self {
            mr_staging,
            mr_recv,
            ep,
            staging: UnsafeCell::new(staging),
            recv,
            name,
            cfg,
            areas,
            mode: attach.mode,
            polling_remote: attach.mode == NotifyMode::RemotePoll,
            layout,
            features: attach.features,
            map,
            regions,
            next_avail: Wrapping(attach.start),
            next_used: Wrapping(attach.start),
            known_avail: Wrapping(attach.start),
            pending: vec![None; size],
            device,
            walker: Walker::new(),
            shadow: Shadow::default(),
            batch: Vec::new(),
            bases: Vec::new(),
            oversize: Vec::new(),
            used_lens: Vec::new(),
            batch_rtts: 0,
            batch_out: PollOutcome::default(),
            stage: Stage::Idle,
            stage_started: Instant::now(),
            done_wr: 0,
            spare_chains: Vec::new(),
            wrs: Vec::new(),
            cqes: vec![
                Completion {
                    wr_id: 0,
                    status: WcStatus::Success,
                    opcode: WcOpcode::Send,
                    byte_len: 0,
                    imm: None,
                };
                64
            ],
            msg: Vec::with_capacity(MAX_MSG),
            wr_seq: 0,
            busy_run: 0,
            idle_run: 0,
            stats,
            failed: None,
            quiescing: false,
            alive: Arc::new(()),
        };
        let recvs: Vec<RecvRequest> = (0..size).map(|i| q.recv_wr(i)).collect();
        q.ep.post_recv(&recvs).map_err(|e| fail(&q.name, e))?;
        Ok(q)
    }

    /// Answers the agent's ATTACH.
    pub fn reply_attach(&mut self, config: Vec<u8>) -> Result<(), QueueFailure> {
        self.send(&Message::AttachReply(super::wire::AttachReply {
            status: 0,
            config,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn mode(&self) -> NotifyMode {
        self.mode
    }
    pub fn is_polling_remote(&self) -> bool {
        self.polling_remote
    }
    /// A token that lives exactly as long as the queue.
    pub fn liveness(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.alive)
    }
    /// The next avail index the queue serves (== next used when idle).
    pub fn position(&self) -> (u16, u16) {
        (self.next_avail.0, self.next_used.0)
    }

    fn recv_wr(&self, i: usize) -> RecvRequest {
        RecvRequest {
            wr_id: RECV_TAG | i as u64,
            local: Sge {
                lkey: self.mr_recv.lkey(),
                addr: self.recv.addr() + (i * MAX_MSG) as u64,
                len: MAX_MSG as u32,
            },
        }
    }

    fn staging(&mut self) -> &mut StagingBuffer {
        self.staging.get_mut()
    }

    fn sge(&self, off: usize, len: usize) -> Sge {
        Sge {
            lkey: self.mr_staging.lkey(),
            addr: self.staging_addr() + off as u64,
            len: len as u32,
        }
    }

    fn staging_addr(&self) -> u64 {
        // SAFETY: reading the pointer value only; no reference to the
        // contents is created.
        unsafe { &*self.staging.get() }.addr()
    }

    /// Remote address and rkey of a validated guest range.
    fn translate(&self, gpa: u64, len: u64) -> Result<(u64, u32), MemoryError> {
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
    fn queue_wr(&mut self, dir: Dir, gpa: u64, off: usize, len: usize) -> Result<(), MemoryError> {
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

    fn next_wr(&mut self) -> u64 {
        self.wr_seq += 1;
        self.wr_seq
    }

    /// Posts the queued work requests and waits for the last one. One call
    /// is one round trip; used only off the common path (remote polls,
    /// fetches, control messages).
    fn flush_and_wait(&mut self) -> Result<(), QueueFailure> {
        let Some(target) = self.post_wave()? else {
            return Ok(());
        };
        let deadline = Instant::now() + self.cfg.op_timeout;
        let mut spins = 0u32;
        loop {
            if self.drain_cq(Some(target))? {
                return Ok(());
            }
            spins += 1;
            if spins > 64 {
                if Instant::now() > deadline {
                    return Err(fail(&self.name, "fabric operation timed out"));
                }
                std::thread::yield_now();
            }
        }
    }

    /// Handles completions; true when `target` completed.
    fn drain_cq(&mut self, target: Option<u64>) -> Result<bool, QueueFailure> {
        loop {
            let mut cqes = std::mem::take(&mut self.cqes);
            let n = self.ep.poll(&mut cqes);
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.cqes = cqes;
                    return Err(fail(&self.name, e));
                }
            };
            let mut res = Ok(());
            for c in &cqes[..n] {
                if !c.status.is_ok() {
                    let why = match c.status {
                        WcStatus::Flushed | WcStatus::RetryExceeded => {
                            format!("the VM host disconnected ({:?})", c.status)
                        }
                        s => format!("fabric completion {:?} for wr {:#x}", s, c.wr_id),
                    };
                    res = Err(fail(&self.name, why));
                    break;
                }
                if c.wr_id & RECV_TAG != 0 {
                    if let Err(e) =
                        self.on_recv((c.wr_id & !RECV_TAG) as usize, c.byte_len as usize)
                    {
                        res = Err(e);
                        break;
                    }
                } else {
                    // RC completes in order: a signalled request done means
                    // every earlier one is done too.
                    self.done_wr = self.done_wr.max(c.wr_id);
                }
            }
            self.cqes = cqes;
            res?;
            if n < self.cqes.len() {
                return Ok(target.is_some_and(|t| self.done_wr >= t));
            }
        }
    }

    fn on_recv(&mut self, i: usize, len: usize) -> Result<(), QueueFailure> {
        if i >= usize::from(self.layout.size) || len > MAX_MSG {
            return Err(fail(&self.name, "receive completion out of range"));
        }
        let mut buf = std::mem::take(&mut self.msg);
        buf.resize(len, 0);
        let r = self.recv.get(i * MAX_MSG, &mut buf);
        let decoded = r.map_err(|e| fail(&self.name, e)).and_then(|_| {
            Message::decode(&buf)
                .map_err(|e| fail(&self.name, format!("bad message from agent: {e}")))
        });
        self.msg = buf;
        let wr = self.recv_wr(i);
        self.ep.post_recv(&[wr]).map_err(|e| fail(&self.name, e))?;
        match decoded? {
            Message::Doorbell(d) => {
                self.stats.doorbells.fetch_add(1, Relaxed);
                let idx = Wrapping(d.avail_idx);
                if (idx - self.next_avail).0 > self.layout.size {
                    return Err(fail(
                        &self.name,
                        format!(
                            "avail index jumped from {} to {}",
                            self.next_avail.0, d.avail_idx
                        ),
                    ));
                }
                if (idx - self.next_avail).0 > (self.known_avail - self.next_avail).0 {
                    self.known_avail = idx;
                }
                for e in d.entries {
                    // Entries already consumed, or not yet announced, are stale.
                    let ahead = (Wrapping(e.pos) - self.next_avail).0;
                    if ahead < (idx - self.next_avail).0 {
                        let slot = usize::from(e.pos % self.layout.size);
                        self.pending[slot] = Some(e);
                    }
                }
                Ok(())
            }
            Message::Quiesce => {
                self.quiescing = true;
                Ok(())
            }
            other => Err(fail(
                &self.name,
                format!("unexpected message from agent: {other:?}"),
            )),
        }
    }

    /// The batch in flight has landed: tell the agent where we stopped and
    /// retire. Idle means next avail == next used (in-order service).
    fn hand_back(&mut self) -> Result<PollOutcome, QueueFailure> {
        let next = self.next_used.0;
        // Counted first: the agent may close the link as soon as it reads
        // the answer, before our send completes.
        self.stats.handovers.fetch_add(1, Relaxed);
        self.send(&Message::Quiesced(super::wire::Quiesced { next }))?;
        tracing::info!(queue = %self.name, next, "queue handed back to the VM host");
        Err(fail(
            &self.name,
            format!("handed back to the VM host at {next}"),
        ))
    }

    fn send(&mut self, m: &Message) -> Result<(), QueueFailure> {
        let mut buf = std::mem::take(&mut self.msg);
        let r = m.encode(&mut buf).map_err(|e| fail(&self.name, e));
        let off = self.areas.send;
        let r = r.and_then(|_| {
            self.staging()
                .put(off, &buf)
                .map_err(|e| fail(&self.name, e))
        });
        let len = buf.len();
        self.msg = buf;
        r?;
        let wr_id = self.next_wr();
        let local = self.sge(off, len);
        self.wrs.push(SendRequest {
            wr_id,
            opcode: Opcode::Send,
            local,
            signaled: false,
        });
        self.flush_and_wait()
    }

    /// READs the avail ring (flags, idx, ring) in one operation.
    fn read_avail(&mut self) -> Result<(), QueueFailure> {
        let len = 4 + 2 * usize::from(self.layout.size);
        self.queue_wr(Dir::Read, self.layout.avail, self.areas.avail, len)
            .map_err(|e| fail(&self.name, e))?;
        self.flush_and_wait()?;
        self.stats.remote_polls.fetch_add(1, Relaxed);
        let mut b = [0u8; 2];
        let base = self.areas.avail;
        self.staging()
            .get(base + 2, &mut b)
            .map_err(|e| fail(&self.name, e))?;
        let idx = Wrapping(u16::from_le_bytes(b));
        if (idx - self.next_avail).0 > self.layout.size {
            return Err(fail(
                &self.name,
                format!("avail index jumped from {} to {}", self.next_avail.0, idx.0),
            ));
        }
        self.known_avail = idx;
        let mut p = self.next_avail;
        while p != idx {
            let slot = usize::from(p.0 % self.layout.size);
            self.staging()
                .get(base + 4 + 2 * slot, &mut b)
                .map_err(|e| fail(&self.name, e))?;
            self.pending[slot] = Some(DoorbellEntry {
                pos: p.0,
                head: u16::from_le_bytes(b),
                descs: Vec::new(),
            });
            p += 1;
        }
        Ok(())
    }

    /// READs `len` guest bytes at `gpa` into the shadow.
    fn fetch(&mut self, gpa: u64, len: u64, whole_table: bool) -> Result<(), ChainError> {
        let (off, max) = if whole_table {
            (self.areas.desc, 16 * usize::from(self.layout.size))
        } else {
            (self.areas.fetch, FETCH_MAX)
        };
        if len as usize > max {
            return Err(ChainError::IndirectTooLarge {
                entries: (len / 16) as u32,
                limit: self.layout.size,
            });
        }
        self.queue_wr(Dir::Read, gpa, off, len as usize)
            .map_err(|source| ChainError::BadBuffer {
                addr: gpa,
                len: len as u32,
                source,
            })?;
        self.stats.fetches.fetch_add(1, Relaxed);
        self.flush_and_wait().map_err(|e| {
            ChainError::Memory(MemoryError::Access {
                addr: gpa,
                reason: e.reason,
            })
        })?;
        let mut tmp = vec![0u8; len as usize];
        self.staging()
            .get(off, &mut tmp)
            .map_err(ChainError::Memory)?;
        self.shadow.insert(gpa, &tmp);
        Ok(())
    }

    fn walk(&mut self, head: u16, chain: &mut DescriptorChain) -> (Result<(), ChainError>, u32) {
        let mut rtts = 0;
        let mut table_fetched = false;
        for _ in 0..=self.cfg.max_fetches {
            let r = self.walker.walk(
                &self.shadow,
                &self.map,
                &self.layout,
                self.features,
                head,
                chain,
            );
            let Err(e) = &r else { return (r, rtts) };
            let Some((addr, len)) = e.needs_fetch() else {
                return (r, rtts);
            };
            let l = self.layout;
            let in_table = addr >= l.desc && addr < l.desc + l.desc_table_bytes();
            let res = if in_table && !table_fetched {
                table_fetched = true;
                self.fetch(l.desc, l.desc_table_bytes(), true)
            } else if let ChainError::BadIndirectTable { addr, len, .. } = e {
                self.fetch(*addr, u64::from(*len), false)
            } else {
                self.fetch(addr, len, false)
            };
            rtts += 1;
            if let Err(e) = res {
                return (Err(e), rtts);
            }
        }
        (
            Err(ChainError::TooLong {
                limit: self.layout.size,
            }),
            rtts,
        )
    }

    /// Advances this queue's batch without blocking on the fabric: a
    /// sidecore visits its other queues while a wave is in flight, so round
    /// trips overlap across queues.
    fn serve(&mut self, budget: usize) -> Result<PollOutcome, QueueFailure> {
        self.drain_cq(None)?;
        let mut out = PollOutcome::default();
        loop {
            match self.stage {
                Stage::Idle if self.quiescing => return self.hand_back(),
                Stage::Idle => {
                    if self.start_batch(budget)? {
                        out.pending = 1;
                    }
                    return Ok(out);
                }
                Stage::Reading(target) | Stage::Writing(target) if self.done_wr < target => {
                    if self.stage_started.elapsed() > self.cfg.op_timeout {
                        return Err(fail(&self.name, "fabric operation timed out"));
                    }
                    out.pending = 1;
                    return Ok(out);
                }
                Stage::Reading(_) => {
                    self.process_and_reply()?;
                    out.pending = 1;
                    return Ok(out);
                }
                Stage::Writing(_) => {
                    let done = self.finish_batch();
                    out.requests += done.requests;
                    out.errors += done.errors;
                    out.bytes += done.bytes;
                    // Go on with the next batch in the same visit.
                }
            }
        }
    }

    /// Posts a wave without waiting; returns its signalled target.
    fn post_wave(&mut self) -> Result<Option<u64>, QueueFailure> {
        if self.wrs.is_empty() {
            return Ok(None);
        }
        let last = self.wrs.len() - 1;
        self.wrs[last].signaled = true;
        let target = self.wrs[last].wr_id;
        self.stats
            .fabric_ops
            .fetch_add(self.wrs.len() as u64, Relaxed);
        let r = self.ep.post_send(&self.wrs);
        self.wrs.clear();
        r.map_err(|e| fail(&self.name, e))?;
        self.stage_started = Instant::now();
        Ok(Some(target))
    }

    /// Learns of requests, validates their chains and posts the READ wave.
    /// False when there is nothing to do.
    fn start_batch(&mut self, budget: usize) -> Result<bool, QueueFailure> {
        let mut rtts: u64 = 0;
        if self.polling_remote {
            self.read_avail()?;
            rtts += 1;
        }
        let avail = (self.known_avail - self.next_avail).0 as usize;
        let n = avail.min(budget).min(self.cfg.max_batch);
        self.adapt(n)?;
        if n == 0 {
            if rtts > 0 {
                self.stats.idle_rtts.fetch_add(rtts, Relaxed);
            }
            return Ok(false);
        }
        // 1-2. Chains, validated over the shadow.
        self.shadow.clear();
        self.oversize.clear();
        let mut heads = Vec::with_capacity(n);
        for k in 0..n {
            let pos = self.next_avail + Wrapping(k as u16);
            let slot = usize::from(pos.0 % self.layout.size);
            let e = match self.pending[slot].take().filter(|e| e.pos == pos.0) {
                Some(e) => e,
                None => {
                    // Announced but not delivered: read the ring once.
                    self.read_avail()?;
                    rtts += 1;
                    match self.pending[slot].take().filter(|e| e.pos == pos.0) {
                        Some(e) => e,
                        None => return Err(fail(&self.name, "avail entry vanished")),
                    }
                }
            };
            for (gpa, d) in &e.descs {
                self.shadow.insert(*gpa, d);
            }
            heads.push(e.head);
        }
        let mut walk_rtts = 0;
        for head in heads {
            let mut chain = self.spare_chains.pop().unwrap_or_default();
            let (r, w) = self.walk(head, &mut chain);
            walk_rtts = walk_rtts.max(w);
            let need = StagedChain::bytes_needed(&chain);
            let mut oversize = false;
            let r = r.and_then(|_| {
                if need <= self.cfg.max_request as u64 {
                    return Ok(());
                }
                // Too large to stage: fail it with the device's error status,
                // written to the chain's last byte, never silently.
                let last = chain.writable.last().copied().filter(|s| s.len > 0);
                let Some(last) = last else {
                    return Err(ChainError::BadBuffer {
                        addr: 0,
                        len: u32::MAX,
                        source: MemoryError::OutOfBounds { addr: 0, len: need },
                    });
                };
                chain.readable.clear();
                chain.writable.clear();
                chain.writable.push(crate::ring::Segment {
                    addr: last.addr + u64::from(last.len) - 1,
                    len: 1,
                });
                oversize = true;
                Ok(())
            });
            self.batch.push((head, r.map(|_| chain)));
            self.oversize.push(oversize);
        }
        // Fetches of different chains happen one after another.
        rtts += walk_rtts as u64;
        self.next_avail += Wrapping(n as u16);

        // 3. One wave of READs for every readable segment.
        let mut off = self.areas.data;
        let batch = std::mem::take(&mut self.batch);
        self.bases.clear();
        for (_, c) in &batch {
            self.bases.push(off);
            let Ok(c) = c else { continue };
            for s in &c.readable {
                if s.len == 0 {
                    continue;
                }
                self.queue_wr(Dir::Read, s.addr, off, s.len as usize)
                    .map_err(|e| fail(&self.name, e))?;
                off += s.len as usize;
            }
            // Writable bytes start zeroed, so nothing stale leaks back.
            let wl = c.writable_len() as usize;
            self.staging()
                .zero(off, wl)
                .map_err(|e| fail(&self.name, e))?;
            off += wl;
        }
        self.batch = batch;
        self.batch_rtts = rtts;
        match self.post_wave()? {
            Some(target) => {
                self.batch_rtts += 1;
                self.stage = Stage::Reading(target);
            }
            // Nothing to read (only bad chains): reply at once.
            None => {
                self.stage = Stage::Reading(0);
                self.process_and_reply()?;
            }
        }
        Ok(true)
    }

    /// 4-5. Runs the device model over the staged bytes and posts the reply
    /// wave: data, used elements, then the immediate.
    fn process_and_reply(&mut self) -> Result<(), QueueFailure> {
        let batch = std::mem::take(&mut self.batch);
        let bases = std::mem::take(&mut self.bases);
        let mut out = PollOutcome::default();
        self.used_lens.clear();
        for (i, ((head, c), base)) in batch.iter().zip(&bases).enumerate() {
            let len = match c {
                Ok(chain) if self.oversize.get(i).copied().unwrap_or(false) => {
                    let view = StagedChain {
                        buf: &self.staging,
                        chain,
                        base: *base,
                    };
                    tracing::warn!(queue = %self.name, head, max = self.cfg.max_request, "request too large; failed with the device's error status");
                    out.errors += 1;
                    self.device.fail_request(&view, chain).unwrap_or(0)
                }
                Ok(chain) => {
                    let view = StagedChain {
                        buf: &self.staging,
                        chain,
                        base: *base,
                    };
                    out.requests += 1;
                    out.bytes += chain.readable_len() + chain.writable_len();
                    match self.device.process(&view, chain) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(queue = %self.name, head, error = %e, "request failed");
                            out.errors += 1;
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %self.name, head, error = %e, "bad descriptor chain");
                    out.errors += 1;
                    0
                }
            };
            self.used_lens.push(len);
        }
        for ((_, c), base) in batch.iter().zip(&bases) {
            let Ok(c) = c else { continue };
            let mut o = *base + c.readable_len() as usize;
            for s in &c.writable {
                if s.len > 0 {
                    self.queue_wr(Dir::Write, s.addr, o, s.len as usize)
                        .map_err(|e| fail(&self.name, e))?;
                }
                o += s.len as usize;
            }
        }
        let n = batch.len();
        let first = self.next_used;
        for (i, (head, _)) in batch.iter().enumerate() {
            let len = self.used_lens[i];
            let slot = usize::from(self.next_used.0 % self.layout.size);
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&u32::from(*head).to_le_bytes());
            b[4..].copy_from_slice(&len.to_le_bytes());
            let at = self.areas.used + 8 * slot;
            self.staging()
                .put(at, &b)
                .map_err(|e| fail(&self.name, e))?;
            self.next_used += 1;
        }
        // Used elements, split where the ring wraps.
        let mut start = first;
        let mut left = n;
        while left > 0 {
            let slot = usize::from(start.0 % self.layout.size);
            let run = left.min(usize::from(self.layout.size) - slot);
            let gpa = self.layout.used_ring(start.0);
            self.queue_wr(Dir::Write, gpa, self.areas.used + 8 * slot, 8 * run)
                .map_err(|e| fail(&self.name, e))?;
            start += Wrapping(run as u16);
            left -= run;
        }
        let imm = Dir::WriteImm(u32::from(self.next_used.0));
        self.queue_wr(imm, self.layout.used_idx(), self.areas.send, 0)
            .map_err(|e| fail(&self.name, e))?;
        let target = self.post_wave()?.unwrap_or(0);
        self.batch_rtts += 1;
        // Count now: the guest may see these completions before this queue
        // is polled again.
        let st = &self.stats;
        st.batches.fetch_add(1, Relaxed);
        st.requests.fetch_add(n as u64, Relaxed);
        st.bad_requests.fetch_add(u64::from(out.errors), Relaxed);
        st.critical_rtts
            .fetch_add(self.batch_rtts * n as u64, Relaxed);
        self.batch = batch;
        self.bases = bases;
        self.batch_out = out;
        self.stage = Stage::Writing(target);
        Ok(())
    }

    /// The reply wave landed: the batch is complete.
    fn finish_batch(&mut self) -> PollOutcome {
        let out = std::mem::take(&mut self.batch_out);
        for (_, c) in self.batch.drain(..) {
            if let Ok(mut c) = c {
                c.clear();
                self.spare_chains.push(c);
            }
        }
        self.stage = Stage::Idle;
        out
    }

    /// Adaptive mode: remote polling while busy, doorbells while quiet.
    fn adapt(&mut self, n: usize) -> Result<(), QueueFailure> {
        if self.mode != NotifyMode::Adaptive {
            return Ok(());
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
                self.busy_run = 0;
                self.idle_run = 0;
                self.polling_remote = true;
                self.stats.mode_switches.fetch_add(1, Relaxed);
                self.send(&Message::SetMode(SetMode {
                    poll: true,
                    next_avail: self.next_avail.0,
                }))?;
            }
        } else {
            self.busy_run = 0;
        }
        Ok(())
    }

    /// Hands discovery back to the agent. It pushes everything from our
    /// `next_avail` on, so a request posted during the switch is not
    /// stranded.
    fn switch_to_doorbells(&mut self) -> Result<(), QueueFailure> {
        self.polling_remote = false;
        self.idle_run = 0;
        self.stats.mode_switches.fetch_add(1, Relaxed);
        // Forget what polling learned: the agent re-announces it.
        self.known_avail = self.next_avail;
        self.send(&Message::SetMode(SetMode {
            poll: false,
            next_avail: self.next_avail.0,
        }))
    }
}

impl<D: DeviceModel> ServedQueue for RemoteQueue<D> {
    fn poll(&mut self, budget: usize) -> Result<PollOutcome, QueueFailure> {
        if let Some(r) = &self.failed {
            return Err(fail(&self.name, r));
        }
        let r = self.serve(budget);
        if let Err(e) = &r {
            self.failed = Some(e.reason.clone());
        }
        r
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        if enabled && (self.stage != Stage::Idle || self.quiescing) {
            // A batch is in flight: keep polling until it lands.
            return Ok(true);
        }
        match (self.mode, enabled) {
            // A remote-poll queue has no notifications: keep polling.
            (NotifyMode::RemotePoll, _) => Ok(true),
            (NotifyMode::Adaptive, true) if self.polling_remote => {
                self.switch_to_doorbells()?;
                Ok(false)
            }
            (_, true) => {
                self.drain_cq(None)?;
                let _ = self.ep.arm();
                self.drain_cq(None)?;
                Ok(self.known_avail != self.next_avail || self.quiescing)
            }
            (_, false) => Ok(false),
        }
    }

    fn kick_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.ep.notify_fd())
    }

    fn take_kick(&mut self) -> bool {
        if self.polling_remote || self.stage != Stage::Idle {
            return true;
        }
        if self.drain_cq(None).is_err() {
            // Let poll() report the failure.
            return true;
        }
        let _ = self.ep.arm();
        let _ = self.drain_cq(None);
        self.known_avail != self.next_avail || self.quiescing
    }

    fn name(&self) -> &str {
        &self.name
    }
}
