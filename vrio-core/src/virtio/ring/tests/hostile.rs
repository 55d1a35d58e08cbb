//! Hostile-guest rules: each malformed ring gets its own typed error, never
//! a panic and never an access outside the guest's memory.

use super::*;
use crate::virtio::memory::{GuestRegion, MemoryError};

fn out_of_bounds(e: &MemoryError) -> bool {
    matches!(e, MemoryError::OutOfBounds { .. })
}

#[test]
fn buffer_outside_memory() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(0, MEM, 1, 0, 0);
    rig.offer(0, &[0]);
    match rig.pop_err() {
        ChainError::BadBuffer { addr, len, source } => {
            assert_eq!((addr, len), (MEM, 1));
            assert!(out_of_bounds(&source));
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn buffer_length_past_end_of_memory() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(0, MEM - 16, 17, W, 0);
    rig.offer(0, &[0]);
    assert!(matches!(
        rig.pop_err(),
        ChainError::BadBuffer { source, .. } if out_of_bounds(&source)
    ));
}

// A buffer in the hole between two registered regions, and one straddling
// two adjacent regions, are both refused.
#[test]
fn buffer_in_a_hole_or_across_regions() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.map = MemoryMap::new(vec![
        GuestRegion { gpa: 0, len: BUF },
        GuestRegion {
            gpa: BUF + 0x1000,
            len: 0x1000,
        },
        GuestRegion {
            gpa: BUF + 0x2000,
            len: 0x1000,
        },
    ])
    .unwrap();
    rig.desc(0, BUF + 0x800, 8, 0, 0);
    rig.desc(1, BUF + 0x1ff0, 0x20, 0, 0);
    rig.desc(2, BUF + 0x1ff0, 0x10, 0, 0);
    rig.offer(0, &[0, 1, 2]);
    assert!(
        matches!(rig.pop_err(), ChainError::BadBuffer { source, .. } if out_of_bounds(&source))
    );
    assert!(
        matches!(rig.pop_err(), ChainError::BadBuffer { source, .. } if out_of_bounds(&source))
    );
    assert!(rig.pop().unwrap());
}

#[test]
fn buffer_addr_plus_len_overflows() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(0, u64::MAX - 3, 8, 0, 0);
    rig.offer(0, &[0]);
    assert!(matches!(
        rig.pop_err(),
        ChainError::BadBuffer {
            source: MemoryError::Overflow { .. },
            ..
        }
    ));
}

#[test]
fn indirect_table_outside_memory() {
    let mut rig = Rig::new(8, features(true, false));
    rig.desc(0, MEM - 16, 32, I, 0);
    rig.offer(0, &[0]);
    assert!(matches!(
        rig.pop_err(),
        ChainError::BadIndirectTable { source, .. } if out_of_bounds(&source)
    ));
}

#[test]
fn indirect_table_addr_plus_len_overflows() {
    let mut rig = Rig::new(8, features(true, false));
    rig.desc(0, u64::MAX - 15, 32, I, 0);
    rig.offer(0, &[0]);
    assert!(matches!(
        rig.pop_err(),
        ChainError::BadIndirectTable {
            source: MemoryError::Overflow { .. },
            ..
        }
    ));
}

// A direct chain cannot exceed the queue size without revisiting an entry,
// so "too long" shows up as a loop there. Through an indirect table it can:
// a table larger than the queue is `IndirectTooLarge`, and a table that fits
// but makes the whole chain longer than the queue is `TooLong`.
#[test]
fn indirect_makes_chain_longer_than_queue() {
    let mut rig = Rig::new(4, features(true, false));
    let entries: Vec<_> = (0..5u16)
        .map(|i| (BUF, 1, if i < 4 { N } else { 0 }, i + 1))
        .collect();
    rig.table(TABLES, &entries);
    rig.desc(0, TABLES, 16 * 5, I, 0);
    // 2 direct + 3 indirect = 5 > 4.
    rig.desc(1, BUF, 1, N, 2);
    rig.desc(2, BUF, 1, N, 3);
    rig.desc(3, TABLES, 16 * 3, I, 0);
    rig.offer(0, &[0, 1]);
    assert_eq!(
        rig.pop_err(),
        ChainError::IndirectTooLarge {
            entries: 5,
            limit: 4
        }
    );
    assert_eq!(rig.pop_err(), ChainError::TooLong { limit: 4 });
}

#[test]
fn direct_loop() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(0, BUF, 1, N, 1);
    rig.desc(1, BUF, 1, N, 2);
    rig.desc(2, BUF, 1, N, 1);
    rig.desc(3, BUF, 1, N, 3); // self-loop
    rig.offer(0, &[0, 3]);
    assert_eq!(rig.pop_err(), ChainError::Loop { index: 1 });
    assert_eq!(rig.pop_err(), ChainError::Loop { index: 3 });
}

// A full-table cycle: every descriptor links to the next, the last back to 0.
#[test]
fn direct_loop_through_whole_table() {
    let mut rig = Rig::new(8, RingFeatures::default());
    for i in 0..8u16 {
        rig.desc(i, BUF, 1, N, (i + 1) % 8);
    }
    rig.offer(0, &[5]);
    assert_eq!(rig.pop_err(), ChainError::Loop { index: 5 });
}

#[test]
fn loop_inside_indirect_table() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, N, 1), (BUF, 1, N, 2), (BUF, 1, N, 0)]);
    rig.desc(0, TABLES, 48, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::Loop { index: 0 });
}

#[test]
fn next_out_of_range_direct() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(0, BUF, 1, N, 8);
    rig.offer(0, &[0]);
    assert_eq!(
        rig.pop_err(),
        ChainError::NextOutOfRange {
            index: 0,
            next: 8,
            table_len: 8
        }
    );
}

#[test]
fn next_out_of_range_in_indirect_table() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, N, 1), (BUF, 1, N, 2)]);
    rig.desc(0, TABLES, 32, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(
        rig.pop_err(),
        ChainError::NextOutOfRange {
            index: 1,
            next: 2,
            table_len: 2
        }
    );
}

#[test]
fn nested_indirect() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, N, 1), (TABLES + 0x100, 16, I, 0)]);
    rig.table(TABLES + 0x100, &[(BUF, 1, 0, 0)]);
    rig.desc(0, TABLES, 32, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::NestedIndirect);
}

#[test]
fn indirect_length_not_multiple_of_16() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, 0, 0), (BUF, 1, 0, 0)]);
    rig.desc(0, TABLES, 24, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::IndirectBadLength { len: 24 });
}

#[test]
fn indirect_length_zero() {
    let mut rig = Rig::new(8, features(true, false));
    rig.desc(0, TABLES, 0, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::IndirectBadLength { len: 0 });
}

// A huge table is refused before anything is read or bounds-checked.
#[test]
fn indirect_table_too_large() {
    let mut rig = Rig::new(8, features(true, false));
    rig.desc(0, TABLES, 0xffff_fff0, I, 0);
    rig.desc(1, TABLES, 16 * 9, I, 0);
    rig.offer(0, &[0, 1]);
    assert_eq!(
        rig.pop_err(),
        ChainError::IndirectTooLarge {
            entries: 0x0fff_ffff,
            limit: 8
        }
    );
    assert_eq!(
        rig.pop_err(),
        ChainError::IndirectTooLarge {
            entries: 9,
            limit: 8
        }
    );
}

#[test]
fn indirect_with_next() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, 0, 0)]);
    rig.desc(0, TABLES, 16, I | N, 1);
    rig.desc(1, BUF, 1, 0, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::IndirectWithNext);
}

#[test]
fn indirect_without_the_feature() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.table(TABLES, &[(BUF, 1, 0, 0)]);
    rig.desc(0, TABLES, 16, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::IndirectNotNegotiated);
}

#[test]
fn readable_after_writable_direct() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(0, BUF, 1, N, 1);
    rig.desc(1, BUF, 1, N | W, 2);
    rig.desc(2, BUF, 1, 0, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::ReadableAfterWritable);
}

#[test]
fn readable_after_writable_inside_indirect() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, N | W, 1), (BUF, 1, 0, 0)]);
    rig.desc(0, TABLES, 32, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::ReadableAfterWritable);
}

// The order rule spans the switch from the direct table to the indirect one.
#[test]
fn readable_in_indirect_after_writable_direct() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, 0, 0)]);
    rig.desc(0, BUF, 1, N | W, 1);
    rig.desc(1, TABLES, 16, I, 0);
    rig.offer(0, &[0]);
    assert_eq!(rig.pop_err(), ChainError::ReadableAfterWritable);
}

#[test]
fn avail_index_jump() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(0, BUF, 1, 0, 0);
    rig.set_avail_idx(9);
    assert_eq!(
        rig.pop(),
        Err(QueueError::AvailIndexJump {
            last: 0,
            idx: 9,
            size: 8
        })
    );
    assert!(rig.pop().unwrap_err().needs_reset());
    // Moving backwards is a jump of nearly 2^16.
    rig.set_avail_idx(0xffff);
    assert!(matches!(
        rig.dev.pending(&rig.mem),
        Err(QueueError::AvailIndexJump { .. })
    ));
    // Exactly the queue size is fine.
    rig.offer(0, &[0; 8]);
    assert_eq!(rig.dev.pending(&rig.mem).unwrap(), 8);
    assert!(rig.dev.check_avail(std::num::Wrapping(8)).is_ok());
    assert!(rig.dev.check_avail(std::num::Wrapping(9)).is_err());
}

#[test]
fn head_out_of_range() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.offer(0, &[8]);
    assert_eq!(
        rig.pop(),
        Err(QueueError::BadChain {
            head: 8,
            source: ChainError::HeadOutOfRange { head: 8, size: 8 }
        })
    );
    // Consumed: the ring is empty again.
    assert!(!rig.pop().unwrap());
}

#[test]
fn rings_outside_memory_are_refused_at_new() {
    let mem = anonymous_memory(MEM as usize).unwrap();
    let map = MemoryMap::of(&mem).unwrap();
    let f = RingFeatures::default();
    let ok = RingLayout::packed(8, RING).unwrap().0;
    assert!(DeviceQueue::new(ok, f, &map).is_ok());
    let past = MEM - 8;
    for l in [
        RingLayout::new(8, past & !15, ok.avail, ok.used),
        RingLayout::new(8, ok.desc, past, ok.used),
        RingLayout::new(8, ok.desc, ok.avail, past),
        RingLayout::new(8, MEM * 4, ok.avail, ok.used),
    ] {
        let l = l.unwrap();
        assert!(
            matches!(
                DeviceQueue::new(l, f, &map),
                Err(QueueError::RingOutOfBounds(MemoryError::OutOfBounds { .. }))
            ),
            "{l:?}"
        );
    }
}

// A bad chain is consumed and reported with its head; the next request is
// served normally and the bad one can be completed with length 0.
#[test]
fn queue_continues_after_a_bad_chain() {
    let mut rig = Rig::new(8, RingFeatures::default());
    let mut drv = rig.driver(None);
    let good1 = drv.add(&rig.mem, &[seg(BUF, 4)], &[], false).unwrap();
    let bad = drv.add(&rig.mem, &[seg(BUF, 4)], &[], false).unwrap();
    let good2 = drv.add(&rig.mem, &[], &[seg(BUF, 4)], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    rig.desc(bad, MEM + 0x1000, 4, 0, 0); // the guest scribbles on it
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, good1);
    match rig.pop() {
        Err(e @ QueueError::BadChain { head, .. }) => {
            assert_eq!(head, bad);
            assert!(!e.needs_reset());
        }
        r => panic!("{r:?}"),
    }
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, good2);
    assert_eq!(rig.chain.writable, [seg(BUF, 4)]);
    assert!(!rig.pop().unwrap());
    for h in [good1, bad, good2] {
        rig.dev.add_used(&rig.mem, h, 0).unwrap();
    }
    for h in [good1, bad, good2] {
        assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((h, 0)));
    }
    assert_eq!(drv.num_free(), 8);
}

/// Memory with a range that is "not present" (a remote shadow not fetched yet).
struct Holey<'a> {
    inner: &'a LocalMemory,
    hole: std::cell::Cell<Option<(u64, u64)>>,
}

impl GuestMemory for Holey<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if let Some((a, n)) = self.hole.get() {
            if addr < a + n && a < addr + buf.len() as u64 {
                return Err(MemoryError::NotPresent { addr: a, len: n });
            }
        }
        self.inner.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.inner.write(addr, buf)
    }
}

// A walk that stops on a not-yet-fetched range does not consume the entry:
// the caller fetches and retries the same head.
#[test]
fn not_present_ranges_do_not_consume_the_entry() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF, 1, 0, 0)]);
    rig.desc(0, BUF, 1, N, 1);
    rig.desc(1, TABLES, 16, I, 0);
    rig.offer(0, &[0]);
    let mem = Holey {
        inner: &rig.mem,
        hole: std::cell::Cell::new(Some((rig.layout.desc_addr(1), 16))),
    };
    let mut c = DescriptorChain::default();
    let e = rig.dev.pop(&mem, &rig.map, &mut c).unwrap_err();
    match &e {
        QueueError::BadChain {
            head: 0,
            source: src @ ChainError::Memory(MemoryError::NotPresent { .. }),
        } => assert_eq!(src.needs_fetch(), Some((rig.layout.desc_addr(1), 16))),
        e => panic!("{e:?}"),
    }
    assert_eq!(rig.dev.next_avail(), 0);
    mem.hole.set(Some((TABLES, 16)));
    match rig.dev.pop(&mem, &rig.map, &mut c).unwrap_err() {
        QueueError::BadChain { source, .. } => {
            assert_eq!(source.needs_fetch(), Some((TABLES, 16)));
            assert!(matches!(source, ChainError::BadIndirectTable { .. }));
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(rig.dev.next_avail(), 0);
    mem.hole.set(None);
    assert!(rig.dev.pop(&mem, &rig.map, &mut c).unwrap());
    assert_eq!(c.readable, [seg(BUF, 1), seg(BUF, 1)]);
    assert_eq!(rig.dev.next_avail(), 1);
}

// A descriptor-table read failure that is not a fetch request is reported
// as a memory error of that chain and consumes it.
#[test]
fn descriptor_table_read_failure() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.offer(0, &[2]);
    struct Broken<'a>(&'a LocalMemory, u64);
    impl GuestMemory for Broken<'_> {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            if addr == self.1 {
                return Err(MemoryError::Access {
                    addr,
                    reason: "test".into(),
                });
            }
            self.0.read(addr, buf)
        }
        fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
            self.0.write(addr, buf)
        }
    }
    let mem = Broken(&rig.mem, rig.layout.desc_addr(2));
    let mut c = DescriptorChain::default();
    assert!(matches!(
        rig.dev.pop(&mem, &rig.map, &mut c),
        Err(QueueError::BadChain {
            head: 2,
            source: ChainError::Memory(MemoryError::Access { .. })
        })
    ));
    assert_eq!(rig.dev.next_avail(), 1);
}

// The walker itself, called directly, refuses a head past the table.
#[test]
fn walker_refuses_head_out_of_range() {
    let rig = Rig::new(8, RingFeatures::default());
    let mut w = Walker::new();
    let mut c = DescriptorChain::default();
    assert_eq!(
        w.walk(
            &rig.mem,
            &rig.map,
            &rig.layout,
            rig.features,
            0xffff,
            &mut c
        ),
        Err(ChainError::HeadOutOfRange {
            head: 0xffff,
            size: 8
        })
    );
}
