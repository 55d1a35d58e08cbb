//! A local receive queue: holds popped RX chains and fills them from its
//! port's backlog with [`RxDevice`].

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use super::port::Port;
use super::stats::DropReason;
use crate::models::local_ring::{LocalRing, Popped};
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};
use crate::virtio::device::DeviceSide;
use crate::virtio::net::rx::{Fit, FrameSource, RxDevice};
use crate::virtio::ring::{DescriptorChain, QueueError};

/// A local virtio-net receive queue, served as a [`ServedQueue`] by the
/// vhost-style worker or a sidecore.
pub struct NetRxQueue {
    ring: LocalRing,
    device: RxDevice,
    source: Arc<Port>,
    /// Chains popped but not used yet, in ring order.
    held: VecDeque<DescriptorChain>,
    spare: Vec<DescriptorChain>,
    used: Vec<(u16, u32)>,
    delivering: Vec<DescriptorChain>,
}

impl NetRxQueue {
    /// Serves `side` from `port`'s backlog; the port wakes this queue's
    /// kick eventfd when a frame arrives while the queue sleeps.
    pub fn new(side: DeviceSide, device: RxDevice, port: Arc<Port>) -> Result<Self, QueueError> {
        let ring = LocalRing::new(side)?;
        match ring.kick.try_clone() {
            Ok(fd) => port.set_waker(Some(fd)),
            Err(e) => {
                return Err(QueueError::Memory(
                    crate::virtio::memory::MemoryError::Access {
                        addr: 0,
                        reason: format!("cannot clone the kick eventfd: {e}"),
                    },
                ))
            }
        }
        Ok(Self {
            ring,
            device,
            source: port,
            held: VecDeque::new(),
            spare: Vec::new(),
            used: Vec::new(),
            delivering: Vec::new(),
        })
    }

    fn more_possible(&self) -> bool {
        self.held.len() < usize::from(self.ring.queue.layout().size)
    }

    fn fit(&self, len: usize, more: bool) -> Fit {
        self.device
            .fit(len, self.held.iter().map(|c| c.writable_len()), more)
    }

    /// Pops one more chain into `held`. False when the ring is empty.
    fn hold_one(&mut self, out: &mut PollOutcome) -> Result<bool, QueueFailure> {
        let mut c = self.spare.pop().unwrap_or_default();
        match self.ring.pop(&mut c)? {
            Popped::Empty => {
                self.spare.push(c);
                Ok(false)
            }
            Popped::Bad(head) => {
                self.source.dropped(DropReason::BadChain);
                out.errors += 1;
                self.ring.complete(head, 0)?;
                self.spare.push(c);
                Ok(true)
            }
            Popped::Chain => {
                if let Err(e) = RxDevice::check_chain(&c) {
                    tracing::warn!(queue = %self.ring.name, head = c.head, error = %e, "unusable RX chain");
                    self.source.dropped(DropReason::BadChain);
                    out.errors += 1;
                    self.ring.complete(c.head, 0)?;
                    self.spare.push(c);
                } else {
                    self.held.push_back(c);
                }
                Ok(true)
            }
        }
    }
}

impl ServedQueue for NetRxQueue {
    fn poll(&mut self, budget: usize, _now: Instant) -> Result<PollOutcome, QueueFailure> {
        let mut out = PollOutcome::default();
        'frames: for _ in 0..budget {
            let Some(len) = self.source.peek_len() else {
                break;
            };
            let n = loop {
                match self.fit(len, self.more_possible()) {
                    Fit::Fits(n) => break Some(n),
                    Fit::Never => break None,
                    Fit::NeedMore => {
                        if !self.hold_one(&mut out)? {
                            // No buffers: wait for the guest to add some.
                            break 'frames;
                        }
                    }
                }
            };
            // Only this queue pops this port.
            let Some(frame) = self.source.pop() else {
                break;
            };
            let Some(n) = n else {
                tracing::debug!(queue = %self.ring.name, len, "frame larger than the RX buffers");
                self.source.dropped(DropReason::RxTooLarge);
                out.errors += 1;
                continue;
            };
            self.delivering.clear();
            self.delivering.extend(self.held.drain(..n));
            self.used.clear();
            let mem = self.ring.mem.clone();
            if let Err(e) = self
                .device
                .deliver(&*mem, &frame, &self.delivering, &mut self.used)
            {
                return Err(self.ring.fail(e));
            }
            for i in 0..self.used.len() {
                let (head, l) = self.used[i];
                self.ring.complete(head, l)?;
            }
            self.spare.append(&mut self.delivering);
            self.source.delivered(frame.len());
            out.requests += 1;
            out.bytes += frame.len() as u64;
        }
        if out.requests + out.errors > 0 {
            self.ring.finish()?;
        }
        Ok(out)
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        if !enabled {
            self.source.disarm();
            return self.ring.set_kicks(false);
        }
        let ring = self.ring.set_kicks(true)?;
        let frames = self.source.arm();
        // Work is there only if a frame waits and it has somewhere to go;
        // anything less would make a waiting caller spin.
        Ok(frames
            && (ring
                || self
                    .source
                    .peek_len()
                    .is_some_and(|l| matches!(self.fit(l, false), Fit::Fits(_)))))
    }

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.ring.kick_fd())
    }

    fn take_kick(&mut self) -> bool {
        self.ring.kick.read().is_ok()
    }

    fn name(&self) -> &str {
        &self.ring.name
    }
}

impl Drop for NetRxQueue {
    fn drop(&mut self) {
        self.source.set_waker(None);
    }
}
