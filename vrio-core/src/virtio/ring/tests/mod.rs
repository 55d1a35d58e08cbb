//! Unit tests of the ring engine: one file per concern.
//!
//! `spec` checks the virtio 1.2 §2.7 rules on well-formed rings, `hostile`
//! checks that each malformed-ring rule yields its own typed error, and
//! `driver` checks the synthetic guest's own guards.

mod driver;
mod hostile;
mod spec;

use super::layout::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use super::*;
use crate::virtio::memory::{anonymous_memory, GuestMemory, LocalMemory, MemoryMap};

/// Guest memory size of every rig.
const MEM: u64 = 0x10000;
/// Where the rings live.
const RING: u64 = 0x1000;
/// Where hand-written indirect tables go.
const TABLES: u64 = 0x4000;
/// Where data buffers point.
const BUF: u64 = 0x8000;

const N: u16 = VRING_DESC_F_NEXT;
const W: u16 = VRING_DESC_F_WRITE;
const I: u16 = VRING_DESC_F_INDIRECT;

/// A guest with one ring, and a device and a driver bound to it.
struct Rig {
    mem: LocalMemory,
    map: MemoryMap,
    layout: RingLayout,
    features: RingFeatures,
    dev: DeviceQueue,
    chain: DescriptorChain,
}

fn features(indirect: bool, event_idx: bool) -> RingFeatures {
    RingFeatures {
        indirect,
        event_idx,
    }
}

impl Rig {
    fn new(size: u16, features: RingFeatures) -> Self {
        let mem = anonymous_memory(MEM as usize).unwrap();
        let map = MemoryMap::of(&mem).unwrap();
        let (layout, _) = RingLayout::packed(size, RING).unwrap();
        let dev = DeviceQueue::new(layout, features, &map).unwrap();
        Self {
            mem,
            map,
            layout,
            features,
            dev,
            chain: DescriptorChain::default(),
        }
    }

    fn driver(&self, indirect: Option<IndirectArea>) -> DriverQueue {
        let d = DriverQueue::new(self.layout, self.features, indirect);
        d.init(&self.mem).unwrap();
        d
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor {
            addr,
            len,
            flags,
            next,
        };
        self.mem
            .write(self.layout.desc_addr(i), &d.to_bytes())
            .unwrap();
    }

    /// Writes an indirect table of `(addr, len, flags, next)` at `at`.
    fn table(&self, at: u64, entries: &[(u64, u32, u16, u16)]) {
        for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
            let d = Descriptor {
                addr,
                len,
                flags,
                next,
            };
            self.mem.write(at + 16 * i as u64, &d.to_bytes()).unwrap();
        }
    }

    /// Puts `heads` on the avail ring starting at slot `from` and publishes
    /// `from + heads.len()` as avail.idx.
    fn offer(&self, from: u16, heads: &[u16]) {
        for (k, &h) in heads.iter().enumerate() {
            let slot = self.layout.avail_ring(from.wrapping_add(k as u16));
            self.mem.write(slot, &h.to_le_bytes()).unwrap();
        }
        self.set_avail_idx(from.wrapping_add(heads.len() as u16));
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem.store_u16(self.layout.avail_idx(), idx).unwrap();
    }

    fn pop(&mut self) -> Result<bool, QueueError> {
        self.dev.pop(&self.mem, &self.map, &mut self.chain)
    }

    /// Pops one chain and returns the chain error it was refused with.
    fn pop_err(&mut self) -> ChainError {
        match self.pop() {
            Err(QueueError::BadChain { source, .. }) => source,
            other => panic!("expected BadChain, got {other:?}"),
        }
    }

    fn u16_at(&self, addr: u64) -> u16 {
        self.mem.load_u16(addr).unwrap()
    }
}

fn seg(addr: u64, len: u32) -> Segment {
    Segment { addr, len }
}
