//! One switch port: a guest's virtio-net device or the uplink.
//!
//! A guest port owns a bounded backlog of frames waiting for the guest's RX
//! buffers. Producers (any thread forwarding a frame) never block and never
//! grow it past its capacity: a full backlog drops and counts. The RX side
//! is woken through an eventfd only when it asked to be ([`Port::arm`]), so
//! a polling sidecore costs producers no syscall.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::stats::{DropReason, PortStats};
use super::uplink::Uplink;
use crate::virtio::net::mac::MacAddr;
use crate::virtio::net::rx::FrameSource;

/// A port's index in its switch; a removed port's id is not reused.
pub type PortId = usize;

/// What is behind a port.
pub enum PortKind {
    /// A guest device: it may only send from `mac`.
    Guest {
        /// The device's configured address.
        mac: MacAddr,
    },
    /// A way out of the server (a TAP): any source address, frames sent at
    /// once rather than queued.
    Uplink(Arc<dyn Uplink>),
}

/// One port of a [`Switch`](super::Switch): its identity, its counters,
/// and for a guest the backlog its RX queue drains (as a
/// [`FrameSource`]).
pub struct Port {
    id: PortId,
    name: String,
    kind: PortKind,
    backlog: Mutex<VecDeque<Vec<u8>>>,
    /// Frames in `backlog`, readable without the lock.
    queued: AtomicUsize,
    capacity: usize,
    /// The RX side waits for a frame: the next producer writes `waker`.
    armed: AtomicBool,
    waker: Mutex<Option<EventFd>>,
    stats: PortStats,
}

impl Port {
    pub(crate) fn new(id: PortId, name: String, kind: PortKind, capacity: usize) -> Self {
        Self {
            id,
            name,
            kind,
            backlog: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            queued: AtomicUsize::new(0),
            capacity: capacity.max(1),
            armed: AtomicBool::new(false),
            waker: Mutex::new(None),
            stats: PortStats::default(),
        }
    }

    /// The port's id in its switch.
    pub fn id(&self) -> PortId {
        self.id
    }
    /// The name given when it was added (for logs).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// What is behind the port.
    pub fn kind(&self) -> &PortKind {
        &self.kind
    }
    /// The configured address of a guest port.
    pub fn mac(&self) -> Option<MacAddr> {
        match self.kind {
            PortKind::Guest { mac } => Some(mac),
            PortKind::Uplink(_) => None,
        }
    }
    /// The port's counters.
    pub fn stats(&self) -> &PortStats {
        &self.stats
    }
    /// Frames waiting in the backlog.
    pub fn backlog_len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The eventfd written when a frame arrives while the RX side is armed
    /// (for local queues, a clone of the RX queue's kick eventfd, so that a
    /// worker or sidecore sleeping on kicks wakes for frames too).
    pub fn set_waker(&self, fd: Option<EventFd>) {
        *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }

    /// Hands a frame to the port: queued for a guest, sent for an uplink.
    pub(crate) fn enqueue(&self, frame: Vec<u8>) -> bool {
        if let PortKind::Uplink(u) = &self.kind {
            return match u.transmit(&frame) {
                Ok(()) => {
                    self.stats.delivered(frame.len());
                    true
                }
                Err(e) => {
                    tracing::debug!(port = %self.name, error = %e, "uplink refused a frame");
                    self.stats.dropped(DropReason::UplinkError);
                    false
                }
            };
        }
        {
            let mut q = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
            if q.len() >= self.capacity {
                drop(q);
                self.stats.dropped(DropReason::BacklogFull);
                return false;
            }
            q.push_back(frame);
            self.queued.store(q.len(), Ordering::Release);
        }
        // Pairs with `arm`: either the RX side sees the frame when it
        // re-checks, or we see `armed` and wake it.
        if self.armed.swap(false, Ordering::SeqCst) {
            if let Some(w) = self
                .waker
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                if let Err(e) = w.write(1) {
                    tracing::warn!(port = %self.name, error = %e, "cannot wake the RX side");
                }
            }
        }
        true
    }
}

impl FrameSource for Port {
    fn peek_len(&self) -> Option<usize> {
        if self.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let q = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        q.front().map(Vec::len)
    }

    fn pop(&self) -> Option<Vec<u8>> {
        let mut q = self.backlog.lock().unwrap_or_else(|e| e.into_inner());
        let f = q.pop_front();
        self.queued.store(q.len(), Ordering::Release);
        f
    }

    fn arm(&self) -> bool {
        self.armed.store(true, Ordering::SeqCst);
        self.queued.load(Ordering::SeqCst) > 0
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    fn delivered(&self, bytes: usize) {
        self.stats.delivered(bytes);
    }

    fn dropped(&self, reason: DropReason) {
        self.stats.dropped(reason);
    }
}
