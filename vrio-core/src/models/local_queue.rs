//! A queue whose rings live in local (shared) guest memory.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::device::DeviceModel;
use crate::memory::{LocalMemory, MemoryMap};
use crate::ring::{DescriptorChain, DeviceQueue, QueueError, RingFeatures, RingLayout};
use crate::sidecore::{PollOutcome, QueueFailure, ServedQueue};

/// What a device back-end gets from the VMM for one queue.
pub struct DeviceSide {
    pub name: String,
    pub mem: Arc<LocalMemory>,
    pub layout: RingLayout,
    pub features: RingFeatures,
    /// Written by the guest to kick (non-blocking).
    pub kick: EventFd,
    /// Written by the device to interrupt the guest.
    pub call: EventFd,
}

pub struct LocalQueue<D> {
    name: String,
    mem: Arc<LocalMemory>,
    map: MemoryMap,
    queue: DeviceQueue,
    device: D,
    kick: EventFd,
    call: EventFd,
    chain: DescriptorChain,
}

impl<D: DeviceModel> LocalQueue<D> {
    pub fn new(side: DeviceSide, device: D) -> Result<Self, QueueError> {
        let map = MemoryMap::of(&*side.mem)?;
        let queue = DeviceQueue::new(side.layout, side.features, &map)?;
        Ok(Self {
            name: side.name,
            mem: side.mem,
            map,
            queue,
            device,
            kick: side.kick,
            call: side.call,
            chain: DescriptorChain::default(),
        })
    }

    pub fn ring(&self) -> &DeviceQueue {
        &self.queue
    }

    fn fail(&self, e: impl std::fmt::Display) -> QueueFailure {
        QueueFailure {
            queue: self.name.clone(),
            reason: e.to_string(),
        }
    }
}

impl<D: DeviceModel> ServedQueue for LocalQueue<D> {
    fn poll(&mut self, budget: usize) -> Result<PollOutcome, QueueFailure> {
        let mut out = PollOutcome::default();
        let mem = &*self.mem;
        for _ in 0..budget {
            let (head, len) = match self.queue.pop(mem, &self.map, &mut self.chain) {
                Ok(false) => break,
                Ok(true) => {
                    let len = match self.device.process(mem, &self.chain) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!(queue = %self.name, head = self.chain.head, error = %e, "request failed");
                            out.errors += 1;
                            0
                        }
                    };
                    out.requests += 1;
                    out.bytes += self.chain.readable_len() + self.chain.writable_len();
                    (self.chain.head, len)
                }
                Err(QueueError::BadChain { head, source }) => {
                    tracing::warn!(queue = %self.name, head, error = %source, "bad descriptor chain");
                    out.errors += 1;
                    (head, 0)
                }
                Err(e) => return Err(self.fail(e)),
            };
            let (addr, elem) = self.queue.take_used_slot(head, len);
            crate::memory::GuestMemory::write(mem, addr, &elem).map_err(|e| self.fail(e))?;
        }
        if out.requests + out.errors > 0 {
            let idx = self.queue.next_used();
            self.queue
                .publish_used(mem, idx)
                .map_err(|e| self.fail(e))?;
            if self
                .queue
                .needs_notification(mem)
                .map_err(|e| self.fail(e))?
            {
                self.call.write(1).map_err(|e| self.fail(e))?;
            }
        }
        Ok(out)
    }

    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
        let mem = &*self.mem;
        if enabled {
            self.queue
                .enable_notification(mem)
                .map_err(|e| self.fail(e))
        } else {
            self.queue
                .disable_notification(mem)
                .map_err(|e| self.fail(e))?;
            Ok(false)
        }
    }

    fn kick_fd(&self) -> Option<RawFd> {
        Some(self.kick.as_raw_fd())
    }

    fn take_kick(&mut self) -> bool {
        // The kick fd is non-blocking: EAGAIN means no kick.
        self.kick.read().is_ok()
    }

    fn name(&self) -> &str {
        &self.name
    }
}
