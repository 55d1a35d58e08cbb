//! The driver side of a split virtqueue: what a guest does. It serves the
//! synthetic guests of tests, benchmarks and the demo, and it is the
//! property-test partner of the device side.
//!
//! The driver keeps its own shadow of which descriptors each head owns, so a
//! broken device cannot make it free descriptors it never handed out.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use super::descriptor::{Descriptor, Segment};
use super::layout::{
    vring_need_event, RingFeatures, RingLayout, DESC_SIZE, VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};
use crate::virtio::memory::{GuestMemory, MemoryError};

/// Why the driver side refused a chain or a used element.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// [`DriverQueue::add`] with no segments.
    #[error("a chain needs at least one segment")]
    Empty,
    /// [`DriverQueue::add`]: fewer free descriptors than the chain needs.
    #[error("not enough free descriptors: need {need}, have {free}")]
    NoSpace {
        /// Descriptors the chain needs.
        need: u16,
        /// Descriptors free.
        free: u16,
    },
    /// An indirect chain was asked for, but INDIRECT_DESC was not
    /// negotiated or the queue has no [`IndirectArea`].
    #[error("indirect descriptors not negotiated or no indirect area configured")]
    IndirectUnavailable,
    /// More segments than the queue size (or than an indirect table holds).
    #[error("{0} segments exceed the indirect table capacity")]
    TooManySegments(usize),
    /// [`DriverQueue::pop_used`]: the device returned an id that is not an
    /// outstanding head.
    #[error("device returned used id {id}, which is not outstanding")]
    BadUsedId {
        /// The id in the used element.
        id: u32,
    },
    /// [`DriverQueue::pop_used`]: used.idx moved by more than the chains
    /// outstanding.
    #[error("device moved used.idx by {0}, more than outstanding")]
    BadUsedIdx(u16),
    /// Reading or writing the rings failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Where the driver keeps indirect tables: `max_entries` descriptors for each
/// head, starting at `base`.
#[derive(Debug, Clone, Copy)]
pub struct IndirectArea {
    /// Guest address of head 0's table.
    pub base: u64,
    /// Descriptors per table (the longest indirect chain).
    pub max_entries: u16,
}

impl IndirectArea {
    /// Bytes an area needs for a queue of `size` heads.
    pub fn bytes_for(size: u16, max_entries: u16) -> u64 {
        u64::from(size) * u64::from(max_entries) * DESC_SIZE
    }
}

/// The driver side of one split virtqueue: adds chains, publishes them,
/// decides kicks and reaps used elements.
#[derive(Debug)]
pub struct DriverQueue {
    layout: RingLayout,
    features: RingFeatures,
    indirect: Option<IndirectArea>,
    /// Free descriptor indices.
    free: Vec<u16>,
    /// Per head: the descriptor indices it owns (empty when not outstanding).
    owned: Vec<Vec<u16>>,
    avail_shadow: Wrapping<u16>,
    /// avail.idx at the last kick decision.
    kicked_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
    outstanding: u16,
}

impl DriverQueue {
    /// A driver over rings at `layout`; call [`DriverQueue::init`] on fresh
    /// memory. `indirect` is where indirect tables go, if any.
    pub fn new(layout: RingLayout, features: RingFeatures, indirect: Option<IndirectArea>) -> Self {
        let size = layout.size;
        Self {
            layout,
            features,
            indirect,
            free: (0..size).rev().collect(),
            owned: vec![Vec::new(); usize::from(size)],
            avail_shadow: Wrapping(0),
            kicked_avail: Wrapping(0),
            last_used: Wrapping(0),
            outstanding: 0,
        }
    }

    /// Where the rings are.
    pub fn layout(&self) -> &RingLayout {
        &self.layout
    }
    /// Free descriptors in the ring's table.
    pub fn num_free(&self) -> u16 {
        self.free.len() as u16
    }
    /// Chains added and not yet reaped.
    pub fn outstanding(&self) -> u16 {
        self.outstanding
    }

    /// Zeroes the three ring parts (a fresh device).
    pub fn init<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), DriverError> {
        let l = &self.layout;
        for (a, n) in [
            (l.desc, l.desc_table_bytes()),
            (l.avail, l.avail_bytes()),
            (l.used, l.used_bytes()),
        ] {
            mem.write(a, &vec![0u8; n as usize])?;
        }
        Ok(())
    }

    /// Adds one chain (not yet visible to the device: see [`Self::publish`])
    /// and returns its head. With `use_indirect` the segments go to the
    /// head's indirect table and take one ring descriptor.
    pub fn add<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        readable: &[Segment],
        writable: &[Segment],
        use_indirect: bool,
    ) -> Result<u16, DriverError> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(DriverError::Empty);
        }
        let segs = readable
            .iter()
            .map(|s| (s, 0))
            .chain(writable.iter().map(|s| (s, VRING_DESC_F_WRITE)));
        let head;
        if use_indirect {
            let area = match (self.features.indirect, self.indirect) {
                (true, Some(a)) => a,
                _ => return Err(DriverError::IndirectUnavailable),
            };
            // §2.7.5.3.1: no chain longer than the queue, indirect or not.
            if n > usize::from(area.max_entries) || n > usize::from(self.layout.size) {
                return Err(DriverError::TooManySegments(n));
            }
            head = self.take(1)?[0];
            let table = area.base + u64::from(head) * u64::from(area.max_entries) * DESC_SIZE;
            for (i, (s, wf)) in segs.enumerate() {
                let d = link(s, wf, (i + 1 < n).then_some(i as u16 + 1));
                mem.write(table + DESC_SIZE * i as u64, &d.to_bytes())?;
            }
            let d = Descriptor {
                addr: table,
                len: (n as u64 * DESC_SIZE) as u32,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            };
            mem.write(self.layout.desc_addr(head), &d.to_bytes())?;
        } else {
            if n > usize::from(self.layout.size) {
                return Err(DriverError::TooManySegments(n));
            }
            let idx = self.take(n as u16)?;
            head = idx[0];
            for (i, (s, wf)) in segs.enumerate() {
                let d = link(s, wf, idx.get(i + 1).copied());
                mem.write(self.layout.desc_addr(idx[i]), &d.to_bytes())?;
            }
        }
        mem.write(
            self.layout.avail_ring(self.avail_shadow.0),
            &head.to_le_bytes(),
        )?;
        self.avail_shadow += 1;
        self.outstanding += 1;
        Ok(head)
    }

    fn take(&mut self, n: u16) -> Result<Vec<u16>, DriverError> {
        if self.free.len() < usize::from(n) {
            return Err(DriverError::NoSpace {
                need: n,
                free: self.num_free(),
            });
        }
        let at = self.free.len() - usize::from(n);
        let idx: Vec<u16> = self.free.drain(at..).rev().collect();
        self.owned[usize::from(idx[0])].clone_from(&idx);
        Ok(idx)
    }

    /// Makes added chains visible: release-stores avail.idx (§2.7.13.3).
    pub fn publish<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), DriverError> {
        mem.store_u16(self.layout.avail_idx(), self.avail_shadow.0)?;
        Ok(())
    }

    /// §2.7.13.4: whether the device wants a kick for what was published
    /// since the last call.
    pub fn should_kick<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<bool, DriverError> {
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.kicked_avail, self.avail_shadow);
        if self.features.event_idx {
            let event = mem.load_u16(self.layout.avail_event())?;
            Ok(vring_need_event(event, self.avail_shadow.0, old.0))
        } else {
            Ok(mem.load_u16(self.layout.used_flags())? & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Reaps one used element: `(head, written length)`.
    pub fn pop_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<(u16, u32)>, DriverError> {
        let idx = Wrapping(mem.load_u16(self.layout.used_idx())?);
        let ready = (idx - self.last_used).0;
        if ready == 0 {
            return Ok(None);
        }
        if ready > self.outstanding {
            return Err(DriverError::BadUsedIdx(ready));
        }
        let mut b = [0u8; 8];
        mem.read(self.layout.used_ring(self.last_used.0), &mut b)?;
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let owned = usize::try_from(id)
            .ok()
            .and_then(|i| self.owned.get_mut(i))
            .filter(|o| !o.is_empty())
            .ok_or(DriverError::BadUsedId { id })?;
        self.free.extend(owned.drain(..).rev());
        self.last_used += 1;
        self.outstanding -= 1;
        Ok(Some((id as u16, len)))
    }

    /// Asks for interrupts again; true when used entries are already waiting.
    pub fn enable_interrupts<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, DriverError> {
        if self.features.event_idx {
            mem.store_u16(self.layout.used_event(), self.last_used.0)?;
        } else {
            let f = mem.load_u16(self.layout.avail_flags())?;
            mem.store_u16(self.layout.avail_flags(), f & !VRING_AVAIL_F_NO_INTERRUPT)?;
        }
        fence(Ordering::SeqCst);
        Ok(mem.load_u16(self.layout.used_idx())? != self.last_used.0)
    }

    /// Suppresses interrupts (the guest polls the used ring itself).
    pub fn disable_interrupts<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), DriverError> {
        if self.features.event_idx {
            // Park used_event half a ring-space behind so no index crosses it soon.
            mem.store_u16(
                self.layout.used_event(),
                self.last_used.0.wrapping_sub(0x8000),
            )?;
        } else {
            let f = mem.load_u16(self.layout.avail_flags())?;
            mem.store_u16(self.layout.avail_flags(), f | VRING_AVAIL_F_NO_INTERRUPT)?;
        }
        Ok(())
    }
}

/// The descriptor for segment `s` (`flags` carries WRITE), chained to
/// `next` if there is one.
fn link(s: &Segment, flags: u16, next: Option<u16>) -> Descriptor {
    Descriptor {
        addr: s.addr,
        len: s.len,
        flags: flags | if next.is_some() { VRING_DESC_F_NEXT } else { 0 },
        next: next.unwrap_or(0),
    }
}
