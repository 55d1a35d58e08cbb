//! Property tests: chains built by `DriverQueue` and consumed by
//! `DeviceQueue` come back intact, used entries come back to the driver
//! intact, descriptors are recycled, and no notification is ever lost.
//!
//! proptest picks the shape of each run (queue size, features, placement,
//! batch limits, request count); a seeded RNG inside the run picks each
//! chain, batch size and completion order, so a failure reproduces from the
//! printed case.

use std::collections::VecDeque;

use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use vrio_core::memory::anonymous_memory;
use vrio_core::ring::{
    DescriptorChain, DeviceQueue, DriverError, DriverQueue, IndirectArea, RingFeatures, RingLayout,
    Segment,
};
use vrio_core::{GuestMemory, LocalMemory, MemoryMap};

const MEM: u64 = 1 << 20;
const INDIRECT_AREA: u64 = 0x10000;
const DATA: u64 = 0x40000;
const MAX_INDIRECT: u16 = 16;

#[derive(Debug, Clone)]
struct Shape {
    size: u16,
    features: RingFeatures,
    ring_base: u64,
    /// Most segments in one chain.
    max_segs: u16,
    max_batch: u16,
    requests: u32,
    seed: u64,
}

/// What the driver put in one chain.
#[derive(Debug, Clone, PartialEq)]
struct Sent {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    indirect: bool,
}

fn random_segment(rng: &mut SmallRng) -> Segment {
    let addr = rng.gen_range(DATA..MEM);
    let room = (MEM - addr).min(0x2000);
    let len = if rng.gen_bool(0.05) {
        0
    } else {
        rng.gen_range(0..=room) as u32
    };
    Segment { addr, len }
}

struct Run {
    mem: LocalMemory,
    map: MemoryMap,
    drv: DriverQueue,
    dev: DeviceQueue,
    rng: SmallRng,
    shape: Shape,
    /// Chains the driver published and the device has not popped: FIFO.
    published: VecDeque<(u16, Sent)>,
    /// Chains the device popped and has not completed.
    in_flight: Vec<u16>,
    /// Used entries the device wrote and the driver has not reaped: FIFO.
    used: VecDeque<(u16, u32)>,
    device_asleep: bool,
    driver_asleep: bool,
    added: u32,
    chain: DescriptorChain,
}

impl Run {
    fn new(shape: Shape) -> Self {
        let mem = anonymous_memory(MEM as usize).unwrap();
        let map = MemoryMap::of(&mem).unwrap();
        let (layout, bytes) = RingLayout::packed(shape.size, shape.ring_base).unwrap();
        assert!(shape.ring_base + bytes <= INDIRECT_AREA);
        let area = IndirectArea {
            base: INDIRECT_AREA,
            max_entries: MAX_INDIRECT,
        };
        assert!(INDIRECT_AREA + IndirectArea::bytes_for(shape.size, MAX_INDIRECT) <= DATA);
        let drv = DriverQueue::new(layout, shape.features, Some(area));
        drv.init(&mem).unwrap();
        let dev = DeviceQueue::new(layout, shape.features, &map).unwrap();
        Self {
            mem,
            map,
            drv,
            dev,
            rng: SmallRng::seed_from_u64(shape.seed),
            shape,
            published: VecDeque::new(),
            in_flight: Vec::new(),
            used: VecDeque::new(),
            device_asleep: false,
            driver_asleep: false,
            added: 0,
            chain: DescriptorChain::default(),
        }
    }

    /// The driver adds a batch, publishes it and decides whether to kick.
    fn driver_submit(&mut self) {
        let batch = self.rng.gen_range(1..=self.shape.max_batch);
        let mut n_added = 0;
        for _ in 0..batch {
            if self.added == self.shape.requests {
                break;
            }
            let indirect = self.shape.features.indirect && self.rng.gen_bool(0.5);
            let cap = if indirect {
                self.shape.max_segs.min(MAX_INDIRECT)
            } else {
                self.shape.max_segs
            };
            let n = self.rng.gen_range(1..=cap);
            let split = self.rng.gen_range(0..=n);
            let segs: Vec<Segment> = (0..n).map(|_| random_segment(&mut self.rng)).collect();
            let (r, w) = segs.split_at(usize::from(split));
            let free = self.drv.num_free();
            match self.drv.add(&self.mem, r, w, indirect) {
                Ok(head) => {
                    self.published.push_back((
                        head,
                        Sent {
                            readable: r.to_vec(),
                            writable: w.to_vec(),
                            indirect,
                        },
                    ));
                    self.added += 1;
                    n_added += 1;
                }
                Err(DriverError::NoSpace { need, free: f }) => {
                    assert_eq!(f, free);
                    assert!(need > free);
                    assert_eq!(need, if indirect { 1 } else { n });
                    break;
                }
                Err(e) => panic!("add failed: {e}"),
            }
        }
        if n_added == 0 {
            return;
        }
        self.drv.publish(&self.mem).unwrap();
        let kick = self.drv.should_kick(&self.mem).unwrap();
        if self.device_asleep {
            assert!(kick, "lost kick: device sleeps and the driver published");
        }
        if kick {
            self.device_asleep = false;
            self.dev.disable_notification(&self.mem).unwrap();
        }
    }

    /// The device pops up to a budget of chains and checks each one.
    fn device_poll(&mut self) {
        if self.device_asleep {
            return;
        }
        let budget = self.rng.gen_range(1..=self.shape.max_batch);
        for _ in 0..budget {
            if !self.dev.pop(&self.mem, &self.map, &mut self.chain).unwrap() {
                break;
            }
            let (head, sent) = self
                .published
                .pop_front()
                .expect("device popped more than was published");
            let c = &self.chain;
            assert_eq!(c.head, head, "heads in avail order");
            assert_eq!(c.readable, sent.readable);
            assert_eq!(c.writable, sent.writable);
            assert_eq!(c.indirect, sent.indirect);
            assert_eq!(
                usize::from(c.descriptors),
                sent.readable.len() + sent.writable.len()
            );
            self.in_flight.push(head);
        }
        if self.published.is_empty() && !self.dev.enable_notification(&self.mem).unwrap() {
            self.device_asleep = true;
        }
    }

    /// The device completes a random subset of what it holds, in random order.
    fn device_complete(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        let k = self.rng.gen_range(1..=self.in_flight.len());
        for _ in 0..k {
            let i = self.rng.gen_range(0..self.in_flight.len());
            let head = self.in_flight.swap_remove(i);
            let len = self.rng.gen();
            self.dev.add_used(&self.mem, head, len).unwrap();
            self.used.push_back((head, len));
        }
        let irq = self.dev.needs_notification(&self.mem).unwrap();
        if self.driver_asleep {
            assert!(
                irq,
                "lost interrupt: driver sleeps and the device used entries"
            );
        }
        if irq {
            self.driver_asleep = false;
        }
    }

    /// The awake driver reaps used entries; with none left it re-enables
    /// interrupts and sleeps unless entries raced in.
    fn driver_reap(&mut self) {
        if self.driver_asleep {
            return;
        }
        self.drv.disable_interrupts(&self.mem).unwrap();
        while let Some((head, len)) = self.drv.pop_used(&self.mem).unwrap() {
            assert_eq!(
                Some((head, len)),
                self.used.pop_front(),
                "used entry intact"
            );
        }
        assert!(self.used.is_empty());
        if !self.drv.enable_interrupts(&self.mem).unwrap() {
            self.driver_asleep = true;
        }
    }

    fn run(mut self) {
        let size = self.shape.size;
        while self.added < self.shape.requests {
            match self.rng.gen_range(0..4) {
                0 => self.driver_submit(),
                1 => self.device_poll(),
                2 => self.device_complete(),
                _ => self.driver_reap(),
            }
            let owned = u32::from(size - self.drv.num_free());
            assert!(owned >= u32::from(self.drv.outstanding()));
        }
        // Drain: everyone wakes and finishes.
        self.device_asleep = false;
        self.driver_asleep = false;
        while !self.published.is_empty() || !self.in_flight.is_empty() || !self.used.is_empty() {
            self.device_poll();
            self.device_asleep = false;
            self.device_complete();
            self.driver_reap();
            self.driver_asleep = false;
        }
        assert_eq!(self.drv.outstanding(), 0);
        assert_eq!(self.drv.num_free(), size, "descriptor leak");
        assert_eq!(self.dev.next_avail(), self.added as u16);
        assert_eq!(self.dev.next_used(), self.added as u16);
        assert_eq!(self.dev.pending(&self.mem).unwrap(), 0);
        assert_eq!(
            self.mem.load_u16(self.dev.layout().used_idx()).unwrap(),
            self.added as u16
        );
    }
}

fn shape(sizes: Vec<u16>, requests: std::ops::RangeInclusive<u32>) -> impl Strategy<Value = Shape> {
    (
        proptest::sample::select(sizes),
        any::<bool>(),
        any::<bool>(),
        0u64..0x400,
        1u16..=20,
        1u16..=40,
        requests,
        any::<u64>(),
    )
        .prop_map(
            |(size, indirect, event_idx, slot, max_segs, max_batch, requests, seed)| Shape {
                size,
                features: RingFeatures {
                    indirect,
                    event_idx,
                },
                ring_base: 0x1000 + 16 * slot,
                max_segs: max_segs.min(size),
                max_batch,
                requests,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random chains, batches and completion orders on every queue size class.
    #[test]
    fn chains_and_used_entries_round_trip(s in shape(vec![1, 2, 4, 8, 16, 64, 256], 1..=400)) {
        Run::new(s).run();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3))]

    /// Long runs that take the 16-bit avail and used indices around twice.
    #[test]
    fn indices_wrap_many_times(s in shape(vec![2, 8, 32], 131_100..=140_000)) {
        Run::new(s).run();
    }
}
