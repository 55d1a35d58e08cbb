//! The I/O server's side of a virtio-net receive queue.
//!
//! RX inverts the request path: the guest's chains are empty buffers, and
//! work exists only when a frame waits in the port's backlog *and* buffers
//! are held. So the queue learns of buffers exactly as [`RemoteQueue`] learns
//! of requests (doorbells or remote polls, over the shared `FabricRing`),
//! validates them and holds them in ring order. When the port has a frame
//! that fits, [`RxDevice::deliver`] writes header + frame into staging over
//! the held chains (several with MRG_RXBUF), and one wave of WRITEs returns
//! the filled bytes and the used elements, closed by the WRITE_WITH_IMM the
//! agent publishes used.idx from, as for any queue. No READs: a frame costs
//! one round trip.
//!
//! Waking: a sidecore sleeps on one fd per queue. This queue's is an epoll
//! set of the endpoint's completion fd (new buffers) and an eventfd the
//! port writes when a frame arrives while the queue is armed.
//!
//! Chains are used in the order they were made available, so the queue's
//! position stays one index; a bad chain completes, with length 0, every
//! chain held before it too (only a hostile guest loses buffers that way).
//!
//! [`RemoteQueue`]: super::request::RequestQueue
//!
//! Without I/O: the runtime (`remote::RemoteRxQueue`) owns the endpoint and
//! the fds a sidecore sleeps on, and pumps completions and the outbox.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::ring::{Intake, ServerRing, Stage, Wake};
use crate::net::{DropReason, Fit, FrameSource, Port, RxChainError, RxDevice, HDR_LEN};
use crate::proto::config::RemoteQueueConfig;
use crate::proto::queue_error::RemoteQueueError;
use crate::proto::staging::StagedChains;
use crate::proto::stats::RemoteStats;
use crate::proto::wire::Attach;
use crate::sidecore::PollOutcome;
use crate::virtio::ring::{ChainError, DescriptorChain};

/// Why a chain the guest offered cannot hold frames.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error(transparent)]
    Chain(ChainError),
    #[error(transparent)]
    Rx(RxChainError),
    #[error("RX buffer of {0} bytes")]
    TooLarge(u64),
}

/// A virtio-net receive queue's batches: buffers in, frames out.
pub struct RxQueue {
    /// The ring it serves: indices, completions in, the outbox out.
    pub ring: ServerRing,
    device: RxDevice,
    port: Arc<Port>,
    /// Buffers taken from the ring but not used yet, in ring order.
    held: VecDeque<DescriptorChain>,
    spare: Vec<DescriptorChain>,
    /// The chains of the frame being delivered.
    frame: Vec<DescriptorChain>,
    /// Chains whose used elements are in the wave in flight.
    sent: Vec<DescriptorChain>,
    used: Vec<(u16, u32)>,
    /// Chains an intake walked, before they are held.
    walked: Vec<(u16, Result<DescriptorChain, ChainError>)>,
    /// What an unfinished intake counted.
    intake_out: PollOutcome,
    stage: Stage,
    batch_out: PollOutcome,
}

impl RxQueue {
    /// The receive queue of `port`'s device from the agent's ATTACH. See
    /// [`ServerRing::new`] for what must happen before it serves.
    pub fn new(
        attach: &Attach,
        device: RxDevice,
        port: Arc<Port>,
        cfg: RemoteQueueConfig,
        stats: Arc<RemoteStats>,
        now: std::time::Instant,
    ) -> Result<Self, RemoteQueueError> {
        Ok(Self {
            ring: ServerRing::for_attach(attach, cfg, stats, now)?,
            device,
            port,
            held: VecDeque::new(),
            spare: Vec::new(),
            frame: Vec::new(),
            sent: Vec::new(),
            used: Vec::new(),
            walked: Vec::new(),
            intake_out: PollOutcome::default(),
            stage: Stage::Idle,
            batch_out: PollOutcome::default(),
        })
    }

    /// The port frames come from.
    pub fn port(&self) -> &Arc<Port> {
        &self.port
    }

    /// Buffers held for frames to come.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn ring_size(&self) -> usize {
        usize::from(self.ring.layout.size)
    }

    fn fit(&self, len: usize, more: bool) -> Fit {
        self.device
            .fit(len, self.held.iter().map(|c| c.writable_len()), more)
    }

    /// Takes newly available buffers: validated, then held. False while a
    /// READ the intake needs is in flight.
    fn intake(&mut self, out: &mut PollOutcome) -> Result<bool, RemoteQueueError> {
        let room = self.ring_size().saturating_sub(self.held.len());
        let mut walked = std::mem::take(&mut self.walked);
        let r = self.ring.intake(room, &mut walked, &mut self.spare);
        let r = match r {
            Ok(Intake::Waiting) => Ok(false),
            Ok(Intake::Nothing | Intake::Ready { .. }) => {
                self.take_walked(&mut walked, out);
                Ok(true)
            }
            Err(e) => Err(e),
        };
        self.walked = walked;
        r
    }

    /// Holds the usable chains of an intake; completes the others (and, to
    /// keep ring order, every chain held before them) with length 0.
    fn take_walked(
        &mut self,
        walked: &mut Vec<(u16, Result<DescriptorChain, ChainError>)>,
        out: &mut PollOutcome,
    ) {
        let max = self.ring.cfg.max_request as u64;
        for (head, r) in walked.drain(..) {
            let (bad, c) = match r {
                Err(e) => (Some(Unusable::Chain(e)), None),
                Ok(c) => match RxDevice::check_chain(&c) {
                    Err(e) => (Some(Unusable::Rx(e)), Some(c)),
                    Ok(()) if c.writable_len() > max => {
                        (Some(Unusable::TooLarge(c.writable_len())), Some(c))
                    }
                    Ok(()) => (None, Some(c)),
                },
            };
            let Some(why) = bad else {
                if let Some(c) = c {
                    self.held.push_back(c);
                }
                continue;
            };
            tracing::warn!(queue = %self.ring.name, head, error = %why, "unusable RX chain");
            self.port.dropped(DropReason::BadChain);
            out.errors += 1;
            // Used in ring order: what was held before it goes first.
            for h in self.held.drain(..) {
                self.used.push((h.head, 0));
                self.sent.push(h);
            }
            let mut c = c.unwrap_or_else(|| self.spare.pop().unwrap_or_default());
            c.head = head;
            self.used.push((head, 0));
            self.sent.push(c);
        }
    }

    /// Stages as many waiting frames as fit the held buffers and the
    /// staging area, and queues their WRITEs.
    fn deliver(&mut self, budget: usize, out: &mut PollOutcome) -> Result<(), RemoteQueueError> {
        let mut off = self.ring.areas.data;
        // SAFETY: reading the length only; no fabric operation or other
        // reference touches the buffer while the sidecore runs this queue.
        let end = unsafe { &*self.ring.staging.get() }.len();
        for _ in 0..budget {
            let Some(len) = self.port.peek_len() else {
                break;
            };
            let n = match self.fit(len, self.held.len() < self.ring_size()) {
                Fit::NeedMore => break,
                Fit::Never => {
                    if self.port.pop().is_some() {
                        tracing::debug!(queue = %self.ring.name, len, "frame larger than the RX buffers");
                        self.port.dropped(DropReason::RxTooLarge);
                        out.errors += 1;
                    }
                    continue;
                }
                Fit::Fits(n) => n,
            };
            let need = HDR_LEN + len;
            if off + need > end {
                break;
            }
            // Only this queue pops this port.
            let Some(frame) = self.port.pop() else {
                break;
            };
            self.frame.clear();
            self.frame.extend(self.held.drain(..n));
            self.ring.staging().zero(off, need)?;
            let first = self.used.len();
            let view = StagedChains {
                buf: &self.ring.staging,
                chains: &self.frame,
                base: off,
                limit: off + need,
            };
            match self
                .device
                .deliver(&view, &frame, &self.frame, &mut self.used)
            {
                Ok(()) => {
                    let mut base = off;
                    for (c, &(_, l)) in self.frame.iter().zip(&self.used[first..]) {
                        self.ring.queue_writes(&c.writable, base, u64::from(l))?;
                        base += c.writable_len() as usize;
                    }
                    self.port.delivered(len);
                    out.requests += 1;
                    out.bytes += len as u64;
                }
                Err(e) => {
                    // Only overlapping or changing buffers get here.
                    tracing::warn!(queue = %self.ring.name, error = %e, "RX buffers refused the frame");
                    self.used.truncate(first);
                    self.used.extend(self.frame.iter().map(|c| (c.head, 0)));
                    self.port.dropped(DropReason::BadChain);
                    out.errors += 1;
                }
            }
            self.sent.append(&mut self.frame);
            off += need;
        }
        Ok(())
    }

    /// Advances the queue's batch without waiting on the fabric.
    pub fn serve(&mut self, budget: usize) -> Result<PollOutcome, RemoteQueueError> {
        let mut res = PollOutcome::default();
        loop {
            match self.stage {
                Stage::Idle if self.ring.quiescing => return self.ring.hand_back(),
                Stage::Idle | Stage::Intake => {
                    let mut out = std::mem::take(&mut self.intake_out);
                    if !self.intake(&mut out)? {
                        // Errors seen so far are reported with the batch.
                        self.intake_out = out;
                        self.stage = Stage::Intake;
                        res.pending = 1;
                        return Ok(res);
                    }
                    self.stage = Stage::Idle;
                    self.deliver(budget.min(self.ring.cfg.max_batch), &mut out)?;
                    if self.used.is_empty() {
                        res.errors += out.errors;
                        return Ok(res);
                    }
                    self.ring.queue_used(&self.used)?;
                    self.used.clear();
                    // Counted before posting, as in `RemoteQueue`.
                    let st = &self.ring.stats;
                    st.batches.fetch_add(1, Relaxed);
                    st.requests.fetch_add(u64::from(out.requests), Relaxed);
                    st.bad_requests.fetch_add(u64::from(out.errors), Relaxed);
                    // The buffers were learned earlier: the WRITE wave is
                    // each frame's only round trip.
                    st.critical_rtts.fetch_add(u64::from(out.requests), Relaxed);
                    let target = self.ring.post_wave()?.unwrap_or(0);
                    self.batch_out = out;
                    self.stage = Stage::Writing(target);
                    res.pending = 1;
                    return Ok(res);
                }
                Stage::Reading(t) | Stage::Writing(t) if self.ring.in_flight(t)? => {
                    res.pending = 1;
                    return Ok(res);
                }
                Stage::Reading(_) | Stage::Writing(_) => {
                    self.ring.after_reply()?;
                    let done = std::mem::take(&mut self.batch_out);
                    res.requests += done.requests;
                    res.errors += done.errors;
                    res.bytes += done.bytes;
                    for mut c in self.sent.drain(..) {
                        c.clear();
                        self.spare.push(c);
                    }
                    self.stage = Stage::Idle;
                }
            }
        }
    }

    /// What the sidecore must do before the queue may sleep (see
    /// `ServedQueue::set_notifications`); the port is armed (or disarmed)
    /// too. The bool: a waiting frame fits the held buffers.
    pub fn set_notifications(&mut self, enabled: bool) -> Result<(Wake, bool), RemoteQueueError> {
        let w = self
            .ring
            .set_notifications(enabled, self.stage != Stage::Idle)?;
        if !enabled {
            self.port.disarm();
            return Ok((w, false));
        }
        // Arm the port whatever the ring said: frames must wake us.
        Ok((w, self.frame_ready()))
    }

    /// What a wake-up needs, and whether a waiting frame fits (see
    /// `ServedQueue::take_kick`).
    pub fn take_kick(&self) -> (Wake, bool) {
        (
            self.ring.take_kick(self.stage != Stage::Idle),
            self.frame_ready(),
        )
    }

    /// Arms the port; true when a waiting frame fits the held buffers.
    fn frame_ready(&self) -> bool {
        self.port.arm()
            && self
                .port
                .peek_len()
                .is_some_and(|l| matches!(self.fit(l, false), Fit::Fits(_)))
    }
}
