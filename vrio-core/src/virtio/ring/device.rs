//! The device side of a split virtqueue (§2.7): read the avail ring, walk
//! chains, write used elements, and suppress notifications both ways.
//!
//! `DeviceQueue` is a state machine over [`GuestMemory`]; it never blocks
//! and never signals anyone. Callers decide what "notify" means (an eventfd,
//! a fabric message, nothing).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use super::descriptor::DescriptorChain;
use super::error::QueueError;
use super::layout::{
    vring_need_event, RingFeatures, RingLayout, VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY,
};
use super::walker::Walker;
use crate::virtio::memory::{GuestMemory, MemoryMap};

/// The ring position to hand over when a queue moves between sidecores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingState {
    /// The next avail ring entry the device will pop.
    pub next_avail: u16,
    /// The next used ring entry the device will fill.
    pub next_used: u16,
}

/// The device side of one split virtqueue: pops validated chains, fills
/// used elements and decides notifications both ways. Does no I/O of its
/// own beyond loads and stores to guest memory.
#[derive(Debug)]
pub struct DeviceQueue {
    layout: RingLayout,
    features: RingFeatures,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    /// Last avail.idx read; saves a read while entries remain.
    avail_cache: Wrapping<u16>,
    /// used idx at the last interrupt, for EVENT_IDX.
    signalled_used: Option<Wrapping<u16>>,
    walker: Walker,
}

impl DeviceQueue {
    /// A queue whose rings have been checked against `map`.
    pub fn new(
        layout: RingLayout,
        features: RingFeatures,
        map: &MemoryMap,
    ) -> Result<Self, QueueError> {
        map.check(layout.desc, layout.desc_table_bytes())
            .and_then(|_| map.check(layout.avail, layout.avail_bytes()))
            .and_then(|_| map.check(layout.used, layout.used_bytes()))
            .map_err(QueueError::RingOutOfBounds)?;
        Ok(Self {
            layout,
            features,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            avail_cache: Wrapping(0),
            signalled_used: None,
            walker: Walker::new(),
        })
    }

    /// Where the rings are.
    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }
    /// The negotiated ring features.
    pub fn features(&self) -> RingFeatures {
        self.features
    }
    /// The position to hand over (see [`DeviceQueue::set_state`]).
    pub fn state(&self) -> RingState {
        RingState {
            next_avail: self.next_avail.0,
            next_used: self.next_used.0,
        }
    }
    /// Resumes at a handed-over position (queue moves, reconnects).
    pub fn set_state(&mut self, s: RingState) {
        self.next_avail = Wrapping(s.next_avail);
        self.avail_cache = Wrapping(s.next_avail);
        self.next_used = Wrapping(s.next_used);
        self.signalled_used = None;
    }
    /// The next avail ring entry to pop.
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }
    /// The next used ring entry to fill.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Reads avail.idx and checks it did not jump by more than the queue size.
    pub fn avail_idx<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, QueueError> {
        let idx = Wrapping(mem.load_u16(self.layout.avail_idx())?);
        self.check_avail(idx)?;
        self.avail_cache = idx;
        Ok(idx.0)
    }

    /// Accepts an avail index learned some other way (a doorbell message).
    pub fn check_avail(&self, idx: Wrapping<u16>) -> Result<(), QueueError> {
        if (idx - self.next_avail).0 > self.layout.size {
            return Err(QueueError::AvailIndexJump {
                last: self.next_avail.0,
                idx: idx.0,
                size: self.layout.size,
            });
        }
        Ok(())
    }

    /// Entries the driver made available that we have not popped yet.
    pub fn pending<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, QueueError> {
        let idx = Wrapping(self.avail_idx(mem)?);
        Ok((idx - self.next_avail).0)
    }

    /// Pops the next chain into `out`. `Ok(false)` when the ring is empty.
    ///
    /// A malformed chain is consumed and reported as
    /// [`QueueError::BadChain`] with its head, so the caller can fail that
    /// request (add it to the used ring with length 0) and carry on.
    pub fn pop<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        map: &MemoryMap,
        out: &mut DescriptorChain,
    ) -> Result<bool, QueueError> {
        if self.avail_cache == self.next_avail {
            self.avail_idx(mem)?;
            if self.avail_cache == self.next_avail {
                return Ok(false);
            }
        }
        let head = mem.load_u16(self.layout.avail_ring(self.next_avail.0))?;
        let r = self
            .walker
            .walk(mem, map, &self.layout, self.features, head, out);
        if let Err(e) = &r {
            if e.needs_fetch().is_some() {
                // Not consumed: the caller fetches the range and retries.
                return Err(QueueError::BadChain {
                    head,
                    source: e.clone(),
                });
            }
        }
        self.next_avail += 1;
        r.map(|_| true)
            .map_err(|source| QueueError::BadChain { head, source })
    }

    /// The used element for `head` as (guest address, bytes); the position is
    /// taken. Remote servers WRITE these bytes; local callers use
    /// [`DeviceQueue::add_used`].
    pub fn take_used_slot(&mut self, head: u16, len: u32) -> (u64, [u8; 8]) {
        let addr = self.layout.used_ring(self.next_used.0);
        self.next_used += 1;
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        b[4..].copy_from_slice(&len.to_le_bytes());
        (addr, b)
    }

    /// Writes the used element and publishes used.idx (§2.7.8.2: the element
    /// is visible before the index).
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let (addr, b) = self.take_used_slot(head, len);
        mem.write(addr, &b)?;
        mem.store_u16(self.layout.used_idx(), self.next_used.0)?;
        Ok(())
    }

    /// Publishes a used index written elsewhere (the VM-host agent does this
    /// for remote queues, after the element WRITEs have landed).
    pub fn publish_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        idx: u16,
    ) -> Result<(), QueueError> {
        self.next_used = Wrapping(idx);
        mem.store_u16(self.layout.used_idx(), idx)?;
        Ok(())
    }

    /// §2.7.7.2 / §2.7.10: whether the driver wants an interrupt for the
    /// used entries published since the last one. Updates the event state.
    pub fn needs_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        // The used.idx store must be visible before we read the driver's
        // suppression state, or both sides can miss each other.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        if self.features.event_idx {
            let event = mem.load_u16(self.layout.used_event())?;
            let old = self.signalled_used.replace(new);
            Ok(match old {
                None => true,
                Some(old) => old != new && vring_need_event(event, new.0, old.0),
            })
        } else {
            let flags = mem.load_u16(self.layout.avail_flags())?;
            Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver to kick again, then re-checks the ring. Returns true
    /// when entries arrived meanwhile: the caller must keep processing, or a
    /// request posted during the switch would be stranded.
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        if self.features.event_idx {
            mem.store_u16(self.layout.avail_event(), self.next_avail.0)?;
        } else {
            let f = mem.load_u16(self.layout.used_flags())?;
            mem.store_u16(self.layout.used_flags(), f & !VRING_USED_F_NO_NOTIFY)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.pending(mem)? != 0)
    }

    /// Tells the driver not to kick (polling mode). With EVENT_IDX the
    /// driver only kicks when it passes avail_event, so leaving avail_event
    /// behind suppresses kicks without a write.
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), QueueError> {
        if !self.features.event_idx {
            let f = mem.load_u16(self.layout.used_flags())?;
            mem.store_u16(self.layout.used_flags(), f | VRING_USED_F_NO_NOTIFY)?;
        }
        Ok(())
    }
}
