//! The I/O server's side of one request/reply queue (virtio-blk, net TX):
//! a [`ServedQueue`] whose rings and buffers are reached only through the
//! fabric. The protocol is [`RequestQueue`] (`proto::server`); this is the
//! runtime around it: the endpoint, the registrations, the sidecore seam.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use vrio_rdma::{Domain, Endpoint};

use super::link::Link;
use crate::proto::config::RemoteQueueConfig;
use crate::proto::queue_error::RemoteQueueError;
use crate::proto::server::RequestQueue;
use crate::proto::stats::RemoteStats;
use crate::proto::wire::{Attach, NotifyMode};
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};
use crate::virtio::device::DeviceModel;

/// A request/reply queue served by a remote sidecore.
pub struct RemoteQueue<D> {
    // The link before the core: its registrations go before the buffers.
    link: Link,
    core: RequestQueue<D>,
    /// Lives as long as the queue; the server's registry holds a weak
    /// reference to tell served queues from dropped ones.
    alive: Arc<()>,
    /// When a batch held by a stage last looked at its endpoint.
    held_look: Instant,
}

/// How often a queue whose batch a stage holds back (a QoS limit) looks at
/// its endpoint for a QUIESCE or a failure: not every sidecore round, which
/// would cost its neighbours a syscall each time.
const HELD_LOOK: std::time::Duration = std::time::Duration::from_millis(1);

impl<D: DeviceModel> RemoteQueue<D> {
    /// Builds the server side of a queue from the agent's ATTACH, on an
    /// endpoint that already received it.
    pub fn new(
        domain: &dyn Domain,
        ep: Box<dyn Endpoint>,
        attach: &Attach,
        device: D,
        cfg: RemoteQueueConfig,
        stats: Arc<RemoteStats>,
    ) -> Result<Self, QueueFailure> {
        let name = crate::proto::queue_name(attach.device_id, attach.queue);
        let open = || -> Result<Self, RemoteQueueError> {
            let mut core = RequestQueue::new(attach, device, cfg, stats, Instant::now())?;
            let link = Link::open(domain, ep, &mut core.ring)?;
            Ok(Self {
                link,
                core,
                alive: Arc::new(()),
                held_look: Instant::now(),
            })
        };
        open().map_err(|e| e.at(&name))
    }

    /// Answers the agent's ATTACH.
    pub fn reply_attach(&mut self, config: Vec<u8>, features: u64) -> Result<(), QueueFailure> {
        self.link
            .reply_attach(&mut self.core.ring, config, features)
    }

    /// Runs the queue's requests through `i`'s interposition stages, as
    /// coming from VM host `vm_host` (see `interpose::Request::vm_host`).
    pub fn set_interposer(&mut self, i: Arc<crate::interpose::Interposer>, vm_host: u64) {
        self.core.set_interposer(i, vm_host);
    }

    /// Keeps the queue's own I/O figures in `m`.
    pub fn set_meter(&mut self, m: Arc<crate::interpose::QueueMeter>) {
        self.core.set_meter(m);
    }

    /// The queue's name (`dev<key>.q<queue>`).
    pub fn name(&self) -> &str {
        &self.core.ring.name
    }
    /// How the queue learns of requests.
    pub fn mode(&self) -> NotifyMode {
        self.core.ring.mode
    }
    /// Whether it polls the guest's avail ring now (adaptive or remote poll).
    pub fn is_polling_remote(&self) -> bool {
        self.core.ring.polling_remote
    }
    /// A token that lives exactly as long as the queue.
    pub fn liveness(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.alive)
    }
    /// The next avail index the queue serves (== next used when idle).
    pub fn position(&self) -> (u16, u16) {
        self.core.ring.position()
    }

    fn serve(&mut self, budget: usize, now: Instant) -> Result<PollOutcome, RemoteQueueError> {
        if let Some(until) = self.core.held_until() {
            if now < until && now.saturating_duration_since(self.held_look) < HELD_LOOK {
                return Ok(PollOutcome::default());
            }
            self.held_look = now;
        }
        self.link.pump(&mut self.core.ring, now)?;
        let r = self.core.serve(budget);
        // Post what was queued even when the batch failed: a QUIESCED
        // answer, say, goes out before the queue retires.
        self.link.flush(&mut self.core.ring)?;
        r
    }
}

impl<D: DeviceModel> ServedQueue for RemoteQueue<D> {
    fn poll(&mut self, budget: usize, now: Instant) -> Result<PollOutcome, QueueFailure> {
        self.core.ring.check()?;
        let r = self.serve(budget, now);
        self.core.ring.latch(r)
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        let r = self
            .core
            .set_notifications(enabled)
            .and_then(|w| self.link.wake(&mut self.core.ring, w));
        r.map_err(|e| self.core.ring.failure(e))
    }

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.link.ep.notify_fd())
    }

    fn take_kick(&mut self) -> bool {
        let w = self.core.take_kick();
        match self.link.wake(&mut self.core.ring, w) {
            Ok(news) => news,
            Err(e) => {
                // Reported (and the queue dropped) by the poll this asks for.
                self.core.ring.fail(e);
                true
            }
        }
    }

    fn advise_remote_poll(&mut self, remote_poll: bool) -> Option<bool> {
        let ring = &mut self.core.ring;
        if ring.mode != NotifyMode::Adaptive {
            return None;
        }
        ring.advice = Some(remote_poll);
        Some(!self.link.ep.one_sided_costs_peer_cpu())
    }

    fn name(&self) -> &str {
        &self.core.ring.name
    }
}
