//! The I/O server's side of one request/reply queue (virtio-blk, net TX),
//! without I/O: the runtime (`remote::RemoteQueue`) polls the endpoint,
//! feeds the completions in, calls [`RequestQueue::serve`] and posts what
//! the ring's outbox holds.
//!
//! Per batch of requests:
//! 1. learn of requests: doorbells already received (doorbell mode), or one
//!    READ of the avail ring (remote poll);
//! 2. walk and validate each chain over a
//!    [`Shadow`](crate::proto::shadow::Shadow); what is missing is fetched with
//!    READ (the whole table once, then indirect tables);
//! 3. every readable segment the doorbell did not carry inline is brought
//!    into staging by one wave of READs (none at all for a 4 KiB read or a
//!    small write in doorbell mode);
//! 4. the unchanged device model runs over the staged bytes;
//! 5. one wave of WRITEs returns the writable segments, the used elements
//!    and the used index, and READs the guest's suppression word; only if
//!    the guest wants an interrupt does a WRITE_WITH_IMM ask the VM host
//!    for one.
//!
//! Steps 1-2, the waves and the control messages are the shared
//! [`ServerRing`], which the virtio-net RX queue (`rx.rs`) uses too. Any
//! [`DeviceModel`] that turns one chain into one reply serves through this
//! queue: virtio-blk and virtio-net TX. No step waits: a sidecore serves
//! its other queues while a wave is in flight.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::ring::{Intake, ServerRing, Stage, Wake};
use crate::interpose::{
    Admit, Interposed, Interposer, Pipeline, QueueMeter, Refusal, Request, Stage as _,
};
use crate::proto::config::RemoteQueueConfig;
use crate::proto::queue_error::RemoteQueueError;
use crate::proto::staging::{StagedChain, Written};
use crate::proto::stats::RemoteStats;
use crate::proto::wire::Attach;
use crate::sidecore::PollOutcome;
use crate::virtio::device::DeviceModel;
use crate::virtio::memory::MemoryError;
use crate::virtio::ring::{ChainError, DescriptorChain};

/// One request/reply queue's batches: learn, walk, READ wave, device, reply
/// wave.
pub struct RequestQueue<D> {
    /// The ring it serves: indices, completions in, the outbox out.
    pub ring: ServerRing,
    device: D,
    batch: Vec<(u16, Result<DescriptorChain, ChainError>)>,
    bases: Vec<usize>,
    /// Per batch entry: too large to serve, failed with an error status.
    oversize: Vec<bool>,
    used: Vec<(u16, u32)>,
    /// What the device wrote of the chain it runs on, merged into
    /// `extents` (start, end in the writable part): only that goes back.
    written: Written,
    extents: Vec<(u64, u64)>,
    batch_rtts: u64,
    batch_out: PollOutcome,
    stage: Stage,
    spare_chains: Vec<DescriptorChain>,
    /// The device's interposition stages, if the server has any for it.
    interposed: Option<Interposed>,
    /// The queue's own I/O figures, when the server keeps them.
    meter: Option<Arc<QueueMeter>>,
    /// Runs metered requests through no stages.
    no_stages: Arc<Pipeline>,
    /// The VM host the queue's agent connects from (see `Request::vm_host`).
    vm_host: u64,
    /// The batch's admission through them (empty without stages).
    admission: Admission,
}

/// Where a batch is in its passage through the device's stages.
#[derive(Default)]
struct Admission {
    /// The pipeline the batch runs under (None: no stages, nothing to do).
    pipe: Option<Arc<Pipeline>>,
    /// Whether `pipe` and `reqs` were taken for this batch yet.
    started: bool,
    /// When the queue learnt of the batch.
    arrived: Option<Instant>,
    /// The same moment by the real clock: latencies are measured with it,
    /// as the ring's time stands still within one poll (an inline batch
    /// is taken in and answered in the same poll).
    took_in: Option<Instant>,
    /// Per batch entry: what the stages see of it (None: not a request).
    reqs: Vec<Option<Request>>,
    /// Per entry: stages it passed (see `Pipeline::admit`).
    passed: Vec<usize>,
    /// Per entry: a stage's refusal.
    refused: Vec<Option<Refusal>>,
    /// Per entry: the status it completed with.
    status: Vec<u8>,
    /// Entries before this one are admitted.
    next: usize,
    /// A stage holds the batch until then.
    held_until: Option<Instant>,
}

impl Admission {
    fn reset(&mut self) {
        self.pipe = None;
        self.started = false;
        self.arrived = None;
        self.took_in = None;
        self.reqs.clear();
        self.passed.clear();
        self.refused.clear();
        self.status.clear();
        self.next = 0;
        self.held_until = None;
    }
}

impl<D: DeviceModel> RequestQueue<D> {
    /// The server side of the queue the agent's ATTACH describes, serving
    /// `device`. See [`ServerRing::new`] for what must happen before it
    /// serves.
    pub fn new(
        attach: &Attach,
        device: D,
        cfg: RemoteQueueConfig,
        stats: Arc<RemoteStats>,
        now: std::time::Instant,
    ) -> Result<Self, RemoteQueueError> {
        Ok(Self {
            ring: ServerRing::for_attach(attach, cfg, stats, now)?,
            device,
            batch: Vec::new(),
            bases: Vec::new(),
            oversize: Vec::new(),
            used: Vec::new(),
            written: Written::default(),
            extents: Vec::new(),
            batch_rtts: 0,
            batch_out: PollOutcome::default(),
            stage: Stage::Idle,
            spare_chains: Vec::new(),
            interposed: None,
            meter: None,
            no_stages: Arc::new(Pipeline::empty()),
            vm_host: 0,
            admission: Admission::default(),
        })
    }

    /// Keeps the queue's own I/O figures in `m` (requests, bytes and
    /// status by op, latency, requests in flight).
    pub fn set_meter(&mut self, m: Arc<QueueMeter>) {
        self.meter = Some(m);
    }

    /// Runs the device's requests through `i`'s stages (live: a policy
    /// set on it later applies from the next batch); `vm_host` is what
    /// stages see as the requests' [`Request::vm_host`].
    pub fn set_interposer(&mut self, i: Arc<Interposer>, vm_host: u64) {
        self.interposed = Some(Interposed::new(i));
        self.vm_host = vm_host;
    }

    /// What the sidecore must do before the queue may sleep (see
    /// `ServedQueue::set_notifications`).
    pub fn set_notifications(&mut self, enabled: bool) -> Result<Wake, RemoteQueueError> {
        let busy = self.stage != Stage::Idle;
        self.ring.set_notifications(enabled, busy)
    }

    /// What a wake-up needs (see `ServedQueue::take_kick`).
    pub fn take_kick(&self) -> Wake {
        self.ring.take_kick(self.stage != Stage::Idle)
    }

    /// Advances this queue's batch without blocking on the fabric: a
    /// sidecore visits its other queues while a wave is in flight, so round
    /// trips overlap across queues.
    pub fn serve(&mut self, budget: usize) -> Result<PollOutcome, RemoteQueueError> {
        let mut out = PollOutcome::default();
        loop {
            match self.stage {
                Stage::Idle if self.ring.quiescing => return self.ring.hand_back(),
                Stage::Idle | Stage::Intake => {
                    if self.start_batch(budget)? {
                        out.pending = 1;
                    }
                    return Ok(out);
                }
                Stage::Reading(target) | Stage::Writing(target)
                    if self.ring.in_flight(target)? =>
                {
                    out.pending = 1;
                    return Ok(out);
                }
                Stage::Reading(_) => {
                    // Held by a stage: no work to report (so the sidecore
                    // backs off), but the queue stays busy and is polled.
                    if !self.admit_batch() {
                        return Ok(out);
                    }
                    self.process_and_reply()?;
                    out.pending = 1;
                    return Ok(out);
                }
                Stage::Writing(_) => {
                    self.ring.after_reply()?;
                    let done = self.finish_batch();
                    out.requests += done.requests;
                    out.errors += done.errors;
                    out.bytes += done.bytes;
                    // Go on with the next batch in the same visit.
                }
            }
        }
    }

    /// Learns of requests, validates their chains and posts the READ wave;
    /// or, while a READ the intake needs is in flight, waits for it
    /// (`Stage::Intake`). False when there is nothing to do.
    fn start_batch(&mut self, budget: usize) -> Result<bool, RemoteQueueError> {
        // 1-2. Chains, validated over the shadow.
        let max = budget.min(self.ring.cfg.max_batch);
        let rtts = match self
            .ring
            .intake(max, &mut self.batch, &mut self.spare_chains)?
        {
            Intake::Nothing => {
                self.stage = Stage::Idle;
                return Ok(false);
            }
            Intake::Waiting => {
                self.stage = Stage::Intake;
                return Ok(true);
            }
            Intake::Ready { rtts } => rtts,
        };
        self.admission.arrived = Some(self.ring.now());
        self.admission.took_in = Some(Instant::now());
        if let Some(m) = &self.meter {
            m.in_flight.store(self.batch.len() as u64, Relaxed);
        }
        self.oversize.clear();
        let max_request = self.ring.cfg.max_request as u64;
        for (_, r) in self.batch.iter_mut() {
            let mut oversize = false;
            if let Ok(chain) = r {
                let need = StagedChain::bytes_needed(chain);
                if need > max_request {
                    // Too large to stage: fail it with the device's error
                    // status, written to the chain's last byte, never silently.
                    match chain.writable.last().copied().filter(|s| s.len > 0) {
                        Some(last) => {
                            chain.readable.clear();
                            chain.writable.clear();
                            chain.writable.push(crate::virtio::ring::Segment {
                                addr: last.addr + u64::from(last.len) - 1,
                                len: 1,
                            });
                            oversize = true;
                        }
                        None => {
                            *r = Err(ChainError::BadBuffer {
                                addr: 0,
                                len: u32::MAX,
                                source: MemoryError::OutOfBounds { addr: 0, len: need },
                            });
                        }
                    }
                }
            }
            self.oversize.push(oversize);
        }

        // 3. One wave of READs for every readable segment.
        let mut off = self.ring.areas.data;
        let batch = std::mem::take(&mut self.batch);
        self.bases.clear();
        for (_, c) in &batch {
            self.bases.push(off);
            let Ok(c) = c else { continue };
            for s in &c.readable {
                if s.len == 0 {
                    continue;
                }
                // Inline in the doorbell, or READ in this wave.
                self.ring.stage_readable(s.addr, off, s.len as usize)?;
                off += s.len as usize;
            }
            // Not zeroed: only what the device writes goes back.
            off += c.writable_len() as usize;
        }
        self.batch = batch;
        self.batch_rtts = rtts;
        match self.ring.post_wave()? {
            Some(target) => {
                self.batch_rtts += 1;
                self.stage = Stage::Reading(target);
            }
            // Nothing to read (everything came inline, or only bad
            // chains): reply at once, one round trip in all.
            None => {
                self.stage = Stage::Reading(0);
                if self.admit_batch() {
                    self.process_and_reply()?;
                }
            }
        }
        Ok(true)
    }

    /// Passes the staged batch through the device's stages, from where it
    /// stopped last time. False while a stage holds a request back (the
    /// batch waits, in order; nothing is dropped).
    fn admit_batch(&mut self) -> bool {
        let a = &mut self.admission;
        if !a.started {
            a.started = true;
            // No stages: one atomic load, no reference taken.
            let pipe = self.interposed.as_mut().and_then(|ip| {
                let device = ip.device();
                let p = ip.current();
                (!p.is_empty()).then(|| (device, p.clone()))
            });
            let metered = self.meter.is_some();
            if pipe.is_none() && !metered {
                return true;
            }
            let device = match &pipe {
                Some((d, _)) => *d,
                None => self.ring.device_id(),
            };
            let arrived = a.arrived.unwrap_or_else(|| self.ring.now());
            for ((_, c), base) in self.batch.iter().zip(&self.bases) {
                let req = c.as_ref().ok().and_then(|chain| {
                    let view = StagedChain {
                        buf: &self.ring.staging,
                        chain,
                        base: *base,
                        written: &self.written,
                    };
                    let mut r = self.device.describe(&view, chain, device, arrived)?;
                    r.vm_host = self.vm_host;
                    Some(r)
                });
                a.reqs.push(req);
                a.passed.push(0);
                a.refused.push(None);
                a.status.push(0);
            }
            a.pipe = Some(match pipe {
                Some((_, p)) => p,
                None => self.no_stages.clone(),
            });
        }
        let Some(pipe) = a.pipe.as_ref() else {
            return true;
        };
        let now = self.ring.now();
        while a.next < a.reqs.len() {
            let i = a.next;
            if let (Some(req), false) = (&a.reqs[i], self.oversize.get(i).copied().unwrap_or(false))
            {
                match pipe.admit(req, now, &mut a.passed[i]) {
                    Admit::Go => {}
                    // A queue asked to hand over (a move) is not held
                    // hostage by a low limit: its batch goes now, so the
                    // move completes in time.
                    Admit::Wait(_) if self.ring.quiescing => {}
                    Admit::Wait(t) => {
                        a.held_until = Some(t);
                        return false;
                    }
                    Admit::Refuse(r) => a.refused[i] = Some(r),
                }
            }
            a.next += 1;
        }
        a.held_until = None;
        true
    }

    /// Until when a stage holds the batch back, if one does: the runtime
    /// need not look at the queue before then (but may, to notice a
    /// QUIESCE or a dead link).
    pub fn held_until(&self) -> Option<Instant> {
        self.admission.held_until
    }

    /// 4-5. Runs the device model over the staged bytes and posts the reply
    /// wave: data, used elements, then the immediate.
    fn process_and_reply(&mut self) -> Result<(), RemoteQueueError> {
        let batch = std::mem::take(&mut self.batch);
        let bases = std::mem::take(&mut self.bases);
        let mut out = PollOutcome::default();
        self.used.clear();
        for (i, ((head, c), base)) in batch.iter().zip(&bases).enumerate() {
            self.written.clear();
            let len = match c {
                Ok(chain) if self.oversize.get(i).copied().unwrap_or(false) => {
                    let view = StagedChain {
                        buf: &self.ring.staging,
                        chain,
                        base: *base,
                        written: &self.written,
                    };
                    tracing::warn!(queue = %self.ring.name, head, max = self.ring.cfg.max_request, "request too large; failed with the device's error status");
                    out.errors += 1;
                    self.device.fail_request(&view, chain).unwrap_or(0)
                }
                Ok(chain) => {
                    let view = StagedChain {
                        buf: &self.ring.staging,
                        chain,
                        base: *base,
                        written: &self.written,
                    };
                    out.requests += 1;
                    out.bytes += chain.readable_len() + chain.writable_len();
                    let a = &mut self.admission;
                    let staged = match (&a.pipe, a.reqs.get(i).copied().flatten()) {
                        (Some(pipe), Some(req)) => match a.refused.get(i).copied().flatten() {
                            Some(r) => {
                                a.status[i] = r.status;
                                self.device.reject(&view, chain, &r)
                            }
                            None => self
                                .device
                                .process_interposed(&view, chain, &req, pipe)
                                .map(|(len, status)| {
                                    a.status[i] = status;
                                    len
                                }),
                        },
                        _ => self.device.process(&view, chain),
                    };
                    match staged {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(queue = %self.ring.name, head, error = %e, "request failed");
                            out.errors += 1;
                            if let Some(s) = a.status.get_mut(i) {
                                *s = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
                            }
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %self.ring.name, head, error = %e, "bad descriptor chain");
                    out.errors += 1;
                    0
                }
            };
            self.used.push((*head, len));
            if let Ok(c) = c {
                self.written.merged_into(&mut self.extents);
                let o = *base + c.readable_len() as usize;
                for &(start, end) in &self.extents {
                    self.ring.queue_write_range(&c.writable, o, start, end)?;
                }
            }
        }
        let n = batch.len();
        self.ring.queue_used(&self.used)?;
        self.batch_rtts += 1;
        // Count before posting: the guest may see these completions (and a
        // test read the counters) as soon as the wave is out.
        self.report_completions();
        let st = &self.ring.stats;
        st.batches.fetch_add(1, Relaxed);
        st.requests.fetch_add(n as u64, Relaxed);
        st.bad_requests.fetch_add(u64::from(out.errors), Relaxed);
        st.critical_rtts
            .fetch_add(self.batch_rtts * n as u64, Relaxed);
        let target = self.ring.post_wave()?.unwrap_or(0);
        self.batch = batch;
        self.bases = bases;
        self.batch_out = out;
        self.stage = Stage::Writing(target);
        Ok(())
    }

    /// Tells the stages (and the queue's meter) how the batch's requests
    /// ended, as their reply is posted: latency runs from the intake to
    /// here, one fabric write short of the guest seeing it.
    fn report_completions(&self) {
        if let Some(m) = &self.meter {
            m.in_flight.store(0, Relaxed);
        }
        let a = &self.admission;
        let Some(pipe) = &a.pipe else { return };
        let latency = a.took_in.map(|t| t.elapsed()).unwrap_or_default();
        for (req, status) in a.reqs.iter().zip(&a.status) {
            if let Some(req) = req {
                pipe.completed(req, *status, latency);
                if let Some(m) = &self.meter {
                    m.meter.completed(req, *status, latency);
                }
            }
        }
    }

    /// The reply wave landed: the batch is complete.
    fn finish_batch(&mut self) -> PollOutcome {
        let out = std::mem::take(&mut self.batch_out);
        self.admission.reset();
        for (_, c) in self.batch.drain(..) {
            if let Ok(mut c) = c {
                c.clear();
                self.spare_chains.push(c);
            }
        }
        self.stage = Stage::Idle;
        out
    }
}
