//! Differential test against rust-vmm `virtio-queue` 0.18 on local memory.
//!
//! Two identical guest memories: vrio's `DeviceQueue` serves one, the
//! reference `virtio_queue::Queue` the other. Each ring is either built by
//! `DriverQueue` (one driver per memory, in lockstep) or written as a raw
//! table with arbitrary flags, `next` values, addresses and lengths.
//!
//! What must agree:
//! - the head of every popped chain, in order;
//! - for every chain vrio accepts, the exact descriptor sequence
//!   (addr, len, write flag) virtio-queue yields;
//! - for every chain vrio refuses, what vrio walked before refusing is a
//!   prefix of what virtio-queue yields (see "Where they differ");
//! - the used ring (and the whole guest memory) byte for byte after both add
//!   the same used entries, and the driver's kick decisions, which read what
//!   each device wrote for notification suppression;
//! - `enable_notification`, and `needs_notification` where comparable.
//!
//! Where they differ, on purpose (virtio-queue validates lazily while
//! iterating and stops silently; vrio validates at pop time and refuses the
//! chain with a typed error):
//! - buffers outside guest memory, readable-after-writable, INDIRECT+NEXT and
//!   indirect without VIRTIO_RING_F_INDIRECT_DESC: virtio-queue yields them
//!   (INDIRECT+NEXT: it follows the table and ignores NEXT); vrio refuses;
//! - loops: virtio-queue yields up to queue-size descriptors then stops;
//!   vrio reports `Loop`;
//! - `next` out of range, nested indirect, bad indirect length, unreadable
//!   tables: virtio-queue truncates the chain; vrio refuses it;
//! - indirect tables larger than the queue size: virtio-queue accepts up to
//!   65535 entries; vrio refuses (`IndirectTooLarge`);
//! - chains over 4 GiB in total: virtio-queue truncates; vrio accepts when
//!   every buffer is inside memory (the device model bounds its own I/O);
//! - `needs_notification` without EVENT_IDX: virtio-queue always says yes
//!   (it does not implement VRING_AVAIL_F_NO_INTERRUPT); vrio honours it.
//!   With EVENT_IDX vrio's first call always notifies (no previous state),
//!   later calls agree.
//! - `add_used` with a head >= queue size: virtio-queue refuses; vrio's
//!   device never does that (heads come from validated chains).

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vrio_core::memory::anonymous_memory;
use vrio_core::ring::layout::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vrio_core::ring::{
    ChainError, Descriptor, DescriptorChain, DeviceQueue, DriverError, DriverQueue, IndirectArea,
    QueueError, RingFeatures, RingLayout, RingState, Segment,
};
use vrio_core::{GuestMemory, LocalMemory, MemoryMap};

const MEM: u64 = 0x20000;
const RING: u64 = 0x1000;
const INDIRECT: u64 = 0x4000;
const MAX_INDIRECT: u16 = 8;
const DATA: u64 = 0xC000;
const RINGS: usize = 10_000;
/// Descriptors of random indirect-table material in raw rings.
const RAW_TABLES: u64 = 0x200;

/// (addr, len, write) as both sides see a descriptor.
type Seen = (u64, u32, bool);

#[derive(Default)]
struct Tally {
    rings: usize,
    accepted: usize,
    indirect_accepted: usize,
    refused: BTreeMap<&'static str, usize>,
    jumps: usize,
    notify_compared: usize,
}

fn kind(e: &ChainError) -> &'static str {
    match e {
        ChainError::HeadOutOfRange { .. } => "HeadOutOfRange",
        ChainError::NextOutOfRange { .. } => "NextOutOfRange",
        ChainError::Loop { .. } => "Loop",
        ChainError::TooLong { .. } => "TooLong",
        ChainError::IndirectNotNegotiated => "IndirectNotNegotiated",
        ChainError::NestedIndirect => "NestedIndirect",
        ChainError::IndirectWithNext => "IndirectWithNext",
        ChainError::IndirectBadLength { .. } => "IndirectBadLength",
        ChainError::IndirectTooLarge { .. } => "IndirectTooLarge",
        ChainError::ReadableAfterWritable => "ReadableAfterWritable",
        ChainError::BadBuffer { .. } => "BadBuffer",
        ChainError::BadIndirectTable { .. } => "BadIndirectTable",
        ChainError::Memory(_) => "Memory",
    }
}

fn snapshot(mem: &LocalMemory, addr: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    GuestMemory::read(mem, addr, &mut v).unwrap();
    v
}

/// One ring served by both implementations.
struct Pair {
    a: LocalMemory,
    b: LocalMemory,
    map: MemoryMap,
    layout: RingLayout,
    features: RingFeatures,
    dev: DeviceQueue,
    vq: Queue,
    chain: DescriptorChain,
    /// Popped heads not yet completed (same on both sides).
    in_flight: Vec<u16>,
    /// Whether each side has a previous needs_notification state.
    primed: bool,
}

impl Pair {
    fn new(a: LocalMemory, b: LocalMemory, size: u16, features: RingFeatures) -> Self {
        let map = MemoryMap::of(&a).unwrap();
        let (layout, bytes) = RingLayout::packed(size, RING).unwrap();
        assert!(RING + bytes <= INDIRECT);
        let dev = DeviceQueue::new(layout, features, &map).unwrap();
        let mut vq = Queue::new(size).unwrap();
        vq.try_set_desc_table_address(GuestAddress(layout.desc))
            .unwrap();
        vq.try_set_avail_ring_address(GuestAddress(layout.avail))
            .unwrap();
        vq.try_set_used_ring_address(GuestAddress(layout.used))
            .unwrap();
        vq.set_event_idx(features.event_idx);
        vq.set_ready(true);
        assert!(vq.is_valid(&b));
        Self {
            a,
            b,
            map,
            layout,
            features,
            dev,
            vq,
            chain: DescriptorChain::default(),
            in_flight: Vec::new(),
            primed: false,
        }
    }

    fn set_start(&mut self, next_avail: u16, next_used: u16) {
        self.dev.set_state(RingState {
            next_avail,
            next_used,
        });
        self.vq.set_next_avail(next_avail);
        self.vq.set_next_used(next_used);
    }

    /// Pops one entry on both sides and compares. Returns false when empty.
    fn pop(&mut self, t: &mut Tally) -> bool {
        let r = self.dev.pop(&self.a, &self.map, &mut self.chain);
        let vq_chain = self.vq.pop_descriptor_chain(&self.b);
        let head = match &r {
            Ok(false) => {
                assert!(vq_chain.is_none(), "vq popped from a ring vrio sees empty");
                return false;
            }
            Err(QueueError::AvailIndexJump { .. }) => {
                assert!(vq_chain.is_none(), "vq accepted an avail index jump");
                t.jumps += 1;
                return false;
            }
            Err(QueueError::BadChain { head, .. }) => *head,
            Ok(true) => self.chain.head,
            Err(e) => panic!("unexpected queue error {e}"),
        };
        let vq_chain = vq_chain.expect("vrio popped a chain, vq did not");
        assert_eq!(vq_chain.head_index(), head);
        let seen: Vec<Seen> = vq_chain
            .map(|d| (d.addr().0, d.len(), d.is_write_only()))
            .collect();
        let mine: Vec<Seen> = self
            .chain
            .readable
            .iter()
            .map(|s| (s.addr, s.len, false))
            .chain(self.chain.writable.iter().map(|s| (s.addr, s.len, true)))
            .collect();
        match r {
            Ok(_) => {
                let total: u64 = mine.iter().map(|s| u64::from(s.1)).sum();
                if total <= u64::from(u32::MAX) {
                    assert_eq!(seen, mine, "accepted chain differs at head {head}");
                } else {
                    assert!(mine.starts_with(&seen), "over-4GiB chain: vq must truncate");
                }
                assert_eq!(usize::from(self.chain.descriptors), mine.len());
                // What virtio-queue does not check, vrio must have.
                for &(addr, len, _) in &mine {
                    assert!(self.map.check(addr, u64::from(len)).is_ok());
                }
                t.accepted += 1;
                t.indirect_accepted += usize::from(self.chain.indirect);
            }
            Err(QueueError::BadChain { source, .. }) => {
                let total: u64 = mine.iter().map(|s| u64::from(s.1)).sum();
                if total <= u64::from(u32::MAX) {
                    assert!(
                        seen.starts_with(&mine),
                        "refused ({source}) at head {head}: vrio walked {mine:?}, vq yields {seen:?}"
                    );
                }
                *t.refused.entry(kind(&source)).or_default() += 1;
            }
            Err(_) => unreachable!(),
        }
        if head < self.layout.size {
            self.in_flight.push(head);
        }
        true
    }

    /// Completes a random subset of in-flight heads on both sides.
    fn complete(&mut self, rng: &mut SmallRng, t: &mut Tally) {
        if self.in_flight.is_empty() {
            return;
        }
        self.in_flight.shuffle(rng);
        let k = rng.gen_range(1..=self.in_flight.len());
        for head in self.in_flight.drain(..k) {
            let len = rng.gen();
            self.dev.add_used(&self.a, head, len).unwrap();
            self.vq.add_used(&self.b, head, len).unwrap();
        }
        let ua = snapshot(&self.a, self.layout.used, self.layout.used_bytes());
        let ub = snapshot(&self.b, self.layout.used, self.layout.used_bytes());
        assert_eq!(ua, ub, "used rings differ");
        if rng.gen_bool(0.5) {
            self.notify(t);
        }
    }

    fn notify(&mut self, t: &mut Tally) {
        let mine = self.dev.needs_notification(&self.a).unwrap();
        let theirs = self.vq.needs_notification(&self.b).unwrap();
        if self.features.event_idx {
            if self.primed {
                assert_eq!(mine, theirs, "needs_notification with EVENT_IDX");
                t.notify_compared += 1;
            } else {
                assert!(mine, "first check always notifies");
            }
            self.primed = true;
        } else {
            assert!(theirs);
            let flags = self.a.load_u16(self.layout.avail_flags()).unwrap();
            assert_eq!(mine, flags & VRING_AVAIL_F_NO_INTERRUPT == 0);
            t.notify_compared += 1;
        }
    }

    fn toggle_notification(&mut self, rng: &mut SmallRng) {
        if rng.gen_bool(0.5) {
            let mine = self.dev.enable_notification(&self.a);
            let theirs = self.vq.enable_notification(&self.b);
            if let Ok(m) = mine {
                assert_eq!(m, theirs.unwrap(), "enable_notification");
            }
        } else {
            self.dev.disable_notification(&self.a).unwrap();
            self.vq.disable_notification(&self.b).unwrap();
        }
    }

    fn assert_same_memory(&self) {
        assert!(
            snapshot(&self.a, 0, MEM) == snapshot(&self.b, 0, MEM),
            "guest memories differ"
        );
    }
}

fn random_segment(rng: &mut SmallRng) -> Segment {
    let addr = rng.gen_range(DATA..MEM);
    let len = rng.gen_range(0..=(MEM - addr).min(0x1000)) as u32;
    Segment { addr, len }
}

fn random_size(rng: &mut SmallRng) -> u16 {
    1 << rng.gen_range(0..=8)
}

fn random_features(rng: &mut SmallRng) -> RingFeatures {
    RingFeatures {
        indirect: rng.gen(),
        event_idx: rng.gen(),
    }
}

/// A ring built by two drivers in lockstep, several rounds deep.
fn valid_ring(pair: &mut Pair, rng: &mut SmallRng, t: &mut Tally) {
    let area = IndirectArea {
        base: INDIRECT,
        max_entries: MAX_INDIRECT,
    };
    let size = pair.layout.size;
    let mut da = DriverQueue::new(pair.layout, pair.features, Some(area));
    let mut db = DriverQueue::new(pair.layout, pair.features, Some(area));
    let rounds = rng.gen_range(1..=6);
    for _ in 0..rounds {
        // The drivers add a batch and decide on a kick from what each device wrote.
        for _ in 0..rng.gen_range(1..=size.min(12)) {
            let indirect = pair.features.indirect && rng.gen_bool(0.4);
            let cap = if indirect {
                size.min(MAX_INDIRECT)
            } else {
                size.min(6)
            };
            let n = rng.gen_range(1..=cap);
            let split = rng.gen_range(0..=n);
            let segs: Vec<Segment> = (0..n).map(|_| random_segment(rng)).collect();
            let (r, w) = segs.split_at(usize::from(split));
            let ra = da.add(&pair.a, r, w, indirect);
            let rb = db.add(&pair.b, r, w, indirect);
            assert_eq!(ra, rb);
            if let Err(DriverError::NoSpace { .. }) = ra {
                break;
            }
            ra.unwrap();
        }
        da.publish(&pair.a).unwrap();
        db.publish(&pair.b).unwrap();
        assert_eq!(
            da.should_kick(&pair.a).unwrap(),
            db.should_kick(&pair.b).unwrap(),
            "kick decision differs"
        );
        if rng.gen_bool(0.3) {
            if rng.gen() {
                da.disable_interrupts(&pair.a).unwrap();
                db.disable_interrupts(&pair.b).unwrap();
            } else {
                assert_eq!(
                    da.enable_interrupts(&pair.a).unwrap(),
                    db.enable_interrupts(&pair.b).unwrap()
                );
            }
        }
        device_steps(pair, rng, t);
        while let Some(x) = da.pop_used(&pair.a).unwrap() {
            assert_eq!(Some(x), db.pop_used(&pair.b).unwrap());
        }
        assert_eq!(db.pop_used(&pair.b).unwrap(), None);
    }
    // Finish everything and check nothing leaked on either driver.
    while pair.pop(t) {}
    pair.complete_all(rng, t);
    while let Some(x) = da.pop_used(&pair.a).unwrap() {
        assert_eq!(Some(x), db.pop_used(&pair.b).unwrap());
    }
    assert_eq!(da.num_free(), size);
    assert_eq!(db.num_free(), size);
}

impl Pair {
    fn complete_all(&mut self, rng: &mut SmallRng, t: &mut Tally) {
        while !self.in_flight.is_empty() {
            self.complete(rng, t);
        }
    }
}

/// A random mix of pops, completions and notification calls.
fn device_steps(pair: &mut Pair, rng: &mut SmallRng, t: &mut Tally) {
    for _ in 0..rng.gen_range(1..=8) {
        match rng.gen_range(0..4) {
            0 | 1 => {
                for _ in 0..rng.gen_range(1..=6) {
                    if !pair.pop(t) {
                        break;
                    }
                }
            }
            2 => pair.complete(rng, t),
            _ => pair.toggle_notification(rng),
        }
    }
}

fn raw_desc(rng: &mut SmallRng, table_len: u16, size: u16) -> Descriptor {
    let addr = match rng.gen_range(0..20) {
        0..=11 => rng.gen_range(DATA..MEM),
        12..=15 => INDIRECT + 16 * rng.gen_range(0..RAW_TABLES), // an indirect table
        16 => rng.gen_range(0..MEM),
        17 => MEM - rng.gen_range(0..0x20),
        18 => u64::MAX - rng.gen_range(0..0x20),
        _ => rng.gen(),
    };
    let len = match rng.gen_range(0..20) {
        0..=13 => rng.gen_range(0..0x400),
        14..=16 => 16 * rng.gen_range(0..=u32::from(size) + 2),
        17 => rng.gen_range(0..0x40),
        18 => u32::MAX - rng.gen_range(0..0x10),
        _ => rng.gen(),
    };
    let mut flags = 0;
    if rng.gen_bool(0.5) {
        flags |= VRING_DESC_F_NEXT;
    }
    if rng.gen_bool(0.4) {
        flags |= VRING_DESC_F_WRITE;
    }
    if rng.gen_bool(0.15) {
        flags |= VRING_DESC_F_INDIRECT;
    }
    if rng.gen_bool(0.05) {
        flags |= rng.gen::<u16>() & !0x7;
    }
    let next = if rng.gen_bool(0.9) {
        rng.gen_range(0..table_len)
    } else {
        rng.gen()
    };
    Descriptor {
        addr,
        len,
        flags,
        next,
    }
}

/// A ring whose tables hold arbitrary bytes-level descriptors.
fn raw_ring(pair: &mut Pair, rng: &mut SmallRng, t: &mut Tally) {
    let size = pair.layout.size;
    let mut table = Vec::with_capacity(16 * usize::from(size));
    for _ in 0..size {
        table.extend_from_slice(&raw_desc(rng, size, size).to_bytes());
    }
    // Indirect area: short tables mostly linking within themselves.
    let mut area = Vec::with_capacity(16 * RAW_TABLES as usize);
    for _ in 0..RAW_TABLES {
        let tl = rng.gen_range(1..=8);
        area.extend_from_slice(&raw_desc(rng, tl, size).to_bytes());
    }
    for m in [&pair.a, &pair.b] {
        GuestMemory::write(m, pair.layout.desc, &table).unwrap();
        GuestMemory::write(m, INDIRECT, &area).unwrap();
    }
    let start: u16 = if rng.gen_bool(0.5) { rng.gen() } else { 0 };
    let used_start: u16 = start.wrapping_sub(rng.gen_range(0..=size));
    pair.set_start(start, used_start);
    let count = if rng.gen_bool(0.03) {
        size + rng.gen_range(1..=100)
    } else {
        rng.gen_range(0..=size)
    };
    for k in 0..count {
        let h: u16 = if rng.gen_bool(0.95) {
            rng.gen_range(0..size)
        } else {
            rng.gen()
        };
        for m in [&pair.a, &pair.b] {
            GuestMemory::write(
                m,
                pair.layout.avail_ring(start.wrapping_add(k)),
                &h.to_le_bytes(),
            )
            .unwrap();
        }
    }
    let used_event: u16 = rng.gen();
    let flags = if rng.gen_bool(0.3) {
        VRING_AVAIL_F_NO_INTERRUPT
    } else {
        0
    };
    for m in [&pair.a, &pair.b] {
        m.store_u16(pair.layout.used_event(), used_event).unwrap();
        m.store_u16(pair.layout.avail_flags(), flags).unwrap();
        m.store_u16(pair.layout.used_idx(), used_start).unwrap();
        m.store_u16(pair.layout.avail_idx(), start.wrapping_add(count))
            .unwrap();
    }
    device_steps(pair, rng, t);
    while pair.pop(t) {}
    pair.complete_all(rng, t);
}

#[test]
fn vrio_matches_virtio_queue_on_random_rings() {
    let mut rng = SmallRng::seed_from_u64(0x7672_696f);
    let a = anonymous_memory(MEM as usize).unwrap();
    let b = anonymous_memory(MEM as usize).unwrap();
    let zero = vec![0u8; MEM as usize];
    let mut t = Tally::default();
    for ring in 0..RINGS {
        a.write_slice(&zero, GuestAddress(0)).unwrap();
        b.write_slice(&zero, GuestAddress(0)).unwrap();
        let size = random_size(&mut rng);
        let features = random_features(&mut rng);
        let mut pair = Pair::new(a.clone(), b.clone(), size, features);
        if ring % 2 == 0 {
            valid_ring(&mut pair, &mut rng, &mut t);
        } else {
            raw_ring(&mut pair, &mut rng, &mut t);
        }
        pair.assert_same_memory();
        t.rings += 1;
    }
    println!(
        "{} rings: {} chains accepted by both ({} indirect), {} avail-index jumps refused by both, {} notification checks",
        t.rings, t.accepted, t.indirect_accepted, t.jumps, t.notify_compared
    );
    println!("chains vrio refused (virtio-queue yields a superset or truncation):");
    for (k, n) in &t.refused {
        println!("  {k:<24} {n}");
    }
    assert_eq!(t.rings, RINGS);
    assert!(
        t.accepted > 10 * RINGS,
        "too few valid chains: {}",
        t.accepted
    );
    assert!(t.indirect_accepted > RINGS);
    assert!(t.jumps > 0);
    // The raw tables must reach every refusal vrio can produce here.
    for k in [
        "HeadOutOfRange",
        "NextOutOfRange",
        "Loop",
        "IndirectNotNegotiated",
        "NestedIndirect",
        "IndirectWithNext",
        "IndirectBadLength",
        "IndirectTooLarge",
        "TooLong",
        "ReadableAfterWritable",
        "BadBuffer",
        "BadIndirectTable",
    ] {
        assert!(
            t.refused.get(k).copied().unwrap_or(0) > 0,
            "no {k} case generated"
        );
    }
}
