//! The I/O server's side of a virtio-net receive queue: the runtime around
//! [`RxQueue`] (`proto::server`), which holds the protocol.
//!
//! Waking: a sidecore sleeps on one fd per queue. This queue's is an epoll
//! set of the endpoint's completion fd (new buffers) and an eventfd the
//! port writes when a frame arrives while the queue is armed.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrio_rdma::{Domain, Endpoint};

use super::link::Link;
use crate::net::{Port, RxDevice};
use crate::proto::config::RemoteQueueConfig;
use crate::proto::queue_error::RemoteQueueError;
use crate::proto::server::RxQueue;
use crate::proto::stats::RemoteStats;
use crate::proto::wire::Attach;
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};

/// A virtio-net receive queue served by a remote sidecore.
pub struct RemoteRxQueue {
    // The link before the core: its registrations go before the buffers.
    link: Link,
    core: RxQueue,
    /// Written by the port when a frame arrives while armed.
    wake: EventFd,
    /// `wake` and the endpoint's completion fd: the one fd a sidecore
    /// sleeps on for this queue.
    epoll: Epoll,
    alive: Arc<()>,
}

impl RemoteRxQueue {
    /// Builds the receive queue of `port`'s device from the agent's ATTACH.
    pub fn new(
        domain: &dyn Domain,
        ep: Box<dyn Endpoint>,
        attach: &Attach,
        device: RxDevice,
        port: Arc<Port>,
        cfg: RemoteQueueConfig,
        stats: Arc<RemoteStats>,
    ) -> Result<Self, QueueFailure> {
        let name = crate::proto::queue_name(attach.device_id, attach.queue);
        let open = || -> Result<Self, RemoteQueueError> {
            let mut core = RxQueue::new(attach, device, port, cfg, stats, Instant::now())?;
            let link = Link::open(domain, ep, &mut core.ring)?;
            let (wake, epoll) = Self::wake_set(&link, core.port())?;
            Ok(Self {
                link,
                core,
                wake,
                epoll,
                alive: Arc::new(()),
            })
        };
        open().map_err(|e| e.at(&name))
    }

    /// The one fd a sidecore sleeps on for this queue: an epoll set of the
    /// endpoint's completion fd and an eventfd `port` writes when a frame
    /// arrives while the queue is armed.
    fn wake_set(link: &Link, port: &Port) -> Result<(EventFd, Epoll), RemoteQueueError> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        for fd in [link.ep.notify_fd(), wake.as_raw_fd()] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )?;
        }
        port.set_waker(Some(wake.try_clone()?));
        Ok((wake, epoll))
    }

    /// Answers the agent's ATTACH.
    pub fn reply_attach(&mut self, config: Vec<u8>) -> Result<(), QueueFailure> {
        self.link.reply_attach(&mut self.core.ring, config, 0)
    }
    /// A token that lives exactly as long as the queue.
    pub fn liveness(&self) -> std::sync::Weak<()> {
        Arc::downgrade(&self.alive)
    }
    /// Buffers held for frames to come.
    pub fn held(&self) -> usize {
        self.core.held()
    }

    fn serve(&mut self, budget: usize, now: Instant) -> Result<PollOutcome, RemoteQueueError> {
        self.link.pump(&mut self.core.ring, now)?;
        let r = self.core.serve(budget);
        self.link.flush(&mut self.core.ring)?;
        r
    }
}

impl ServedQueue for RemoteRxQueue {
    fn poll(&mut self, budget: usize, now: Instant) -> Result<PollOutcome, QueueFailure> {
        self.core.ring.check()?;
        let r = self.serve(budget, now);
        self.core.ring.latch(r)
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        let r = self.core.set_notifications(enabled).and_then(|(w, frame)| {
            let news = self.link.wake(&mut self.core.ring, w)?;
            Ok(frame || news)
        });
        r.map_err(|e| self.core.ring.failure(e))
    }

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn take_kick(&mut self) -> bool {
        // Empty after a read or when nothing was written: either is fine.
        let _ = self.wake.read();
        let (w, frame) = self.core.take_kick();
        match self.link.wake(&mut self.core.ring, w) {
            Ok(news) => frame || news,
            Err(e) => {
                // Reported (and the queue dropped) by the poll this asks for.
                self.core.ring.fail(e);
                true
            }
        }
    }

    fn name(&self) -> &str {
        &self.core.ring.name
    }
}

impl Drop for RemoteRxQueue {
    fn drop(&mut self) {
        self.core.port().set_waker(None);
    }
}
