//! The device side of one local ring: the ring in local guest memory and
//! its kick and call eventfds. [`LocalQueue`](super::LocalQueue) serves a
//! chain at a time over it; the net RX queue, which fills several chains
//! per frame, uses it directly.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::sidecore::QueueFailure;
use crate::virtio::device::DeviceSide;
use crate::virtio::memory::{GuestMemory, LocalMemory, MemoryMap};
use crate::virtio::ring::{DescriptorChain, DeviceQueue, QueueError};

pub(crate) struct LocalRing {
    pub name: String,
    pub mem: Arc<LocalMemory>,
    pub map: MemoryMap,
    pub queue: DeviceQueue,
    pub kick: EventFd,
    pub call: EventFd,
}

impl LocalRing {
    pub fn new(side: DeviceSide) -> Result<Self, QueueError> {
        let map = MemoryMap::of(&*side.mem)?;
        let queue = DeviceQueue::new(side.layout, side.features, &map)?;
        Ok(Self {
            name: side.name,
            mem: side.mem,
            map,
            queue,
            kick: side.kick,
            call: side.call,
        })
    }

    pub fn fail(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> QueueFailure {
        QueueFailure {
            queue: self.name.clone(),
            reason: e.into(),
            routine: false,
        }
    }

    /// Pops the next chain. `Popped::Bad(head)` for a chain the walker
    /// refused (already consumed: complete it with length 0).
    pub fn pop(&mut self, out: &mut DescriptorChain) -> Result<Popped, QueueFailure> {
        match self.queue.pop(&*self.mem, &self.map, out) {
            Ok(true) => Ok(Popped::Chain),
            Ok(false) => Ok(Popped::Empty),
            Err(QueueError::BadChain { head, source }) => {
                tracing::warn!(queue = %self.name, head, error = %source, "bad descriptor chain");
                Ok(Popped::Bad(head))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Writes one used element (published by [`LocalRing::finish`]).
    pub fn complete(&mut self, head: u16, len: u32) -> Result<(), QueueFailure> {
        let (addr, elem) = self.queue.take_used_slot(head, len);
        GuestMemory::write(&*self.mem, addr, &elem).map_err(|e| self.fail(e))
    }

    /// Publishes used.idx and interrupts the guest if it wants it.
    pub fn finish(&mut self) -> Result<(), QueueFailure> {
        let mem = &*self.mem;
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
        Ok(())
    }

    /// Kicks on (returns whether chains arrived meanwhile) or off.
    pub fn set_kicks(&mut self, enabled: bool) -> Result<bool, QueueFailure> {
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

    pub fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }
}

pub(crate) enum Popped {
    Chain,
    Empty,
    Bad(u16),
}
