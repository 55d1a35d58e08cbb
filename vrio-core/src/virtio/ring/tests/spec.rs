//! virtio 1.2 §2.7 rules on well-formed rings.

use super::*;
use crate::virtio::ring::layout::{VRING_AVAIL_F_NO_INTERRUPT, VRING_USED_F_NO_NOTIFY};

#[test]
fn driver_to_device_round_trip() {
    let mut rig = Rig::new(8, RingFeatures::default());
    let mut drv = rig.driver(None);
    let r = [seg(BUF, 16)];
    let w = [seg(BUF + 0x1000, 1)];
    let head = drv.add(&rig.mem, &r, &w, false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, head);
    assert_eq!(rig.chain.readable, r);
    assert_eq!(rig.chain.writable, w);
    rig.dev.add_used(&rig.mem, head, 1).unwrap();
    assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((head, 1)));
    assert_eq!(rig.u16_at(rig.layout.used_idx()), 1);
}

// §2.7.6: the device takes heads from avail.ring[idx % size] in order, and
// only up to avail.idx.
#[test]
fn avail_ring_is_read_in_order_up_to_avail_idx() {
    let mut rig = Rig::new(4, RingFeatures::default());
    for i in 0..4 {
        rig.desc(i, BUF + 0x100 * u64::from(i), 8, 0, 0);
    }
    assert!(!rig.pop().unwrap(), "empty ring pops nothing");
    // Slots past avail.idx hold garbage that must not be read.
    rig.offer(0, &[2, 0, 3, 1]);
    rig.set_avail_idx(2);
    assert_eq!(rig.dev.pending(&rig.mem).unwrap(), 2);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, 2);
    assert_eq!(rig.chain.readable, [seg(BUF + 0x200, 8)]);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, 0);
    assert!(!rig.pop().unwrap());
    // Entries published after the device caught up are seen.
    rig.set_avail_idx(4);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, 3);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, 1);
    assert!(!rig.pop().unwrap());
    assert_eq!(rig.dev.next_avail(), 4);
    // Slot 4 is ring[0] again.
    rig.offer(4, &[1]);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.head, 1);
}

// §2.7.5: NEXT links descriptors; device-readable ones come first; a
// zero-length buffer is legal.
#[test]
fn direct_chain_is_walked_through_next() {
    let mut rig = Rig::new(8, RingFeatures::default());
    rig.desc(5, BUF, 100, N, 2);
    rig.desc(2, BUF + 0x100, 0, N, 7);
    rig.desc(7, BUF + 0x200, 300, N | W, 0);
    rig.desc(0, BUF + 0x400, 400, W, 3); // no NEXT: `next` is ignored
    rig.offer(0, &[5]);
    assert!(rig.pop().unwrap());
    let c = &rig.chain;
    assert_eq!(c.head, 5);
    assert_eq!(c.readable, [seg(BUF, 100), seg(BUF + 0x100, 0)]);
    assert_eq!(c.writable, [seg(BUF + 0x200, 300), seg(BUF + 0x400, 400)]);
    assert_eq!(c.descriptors, 4);
    assert!(!c.indirect);
    assert_eq!(c.readable_len(), 100);
    assert_eq!(c.writable_len(), 700);
}

// A chain may use every descriptor of the table.
#[test]
fn chain_as_long_as_the_queue_is_accepted() {
    let mut rig = Rig::new(8, RingFeatures::default());
    for i in 0..8u16 {
        let last = i == 7;
        rig.desc(i, BUF + u64::from(i), 1, if last { W } else { N }, i + 1);
    }
    rig.offer(0, &[0]);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.descriptors, 8);
    assert_eq!(rig.chain.readable.len(), 7);
    assert_eq!(rig.chain.writable.len(), 1);
}

// §2.7.5.3: an INDIRECT descriptor points to a table of descriptors; the
// device ignores its WRITE flag.
#[test]
fn indirect_chain_is_walked() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(
        TABLES,
        &[
            (BUF, 10, N, 2),
            (0xdead, 1, 0, 0), // not linked: must not be visited
            (BUF + 0x100, 20, N | W, 3),
            (BUF + 0x200, 30, W, 0),
        ],
    );
    rig.desc(3, TABLES, 64, I | W, 0);
    rig.offer(0, &[3]);
    assert!(rig.pop().unwrap());
    let c = &rig.chain;
    assert_eq!(c.head, 3);
    assert!(c.indirect);
    assert_eq!(c.readable, [seg(BUF, 10)]);
    assert_eq!(c.writable, [seg(BUF + 0x100, 20), seg(BUF + 0x200, 30)]);
    assert_eq!(c.descriptors, 3);
}

// Direct descriptors may precede the indirect one that ends the chain.
#[test]
fn direct_descriptors_then_indirect_table() {
    let mut rig = Rig::new(8, features(true, false));
    rig.table(TABLES, &[(BUF + 0x100, 4, W, 0)]);
    rig.desc(1, BUF, 16, N, 6);
    rig.desc(6, TABLES, 16, I, 0);
    rig.offer(0, &[1]);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.readable, [seg(BUF, 16)]);
    assert_eq!(rig.chain.writable, [seg(BUF + 0x100, 4)]);
    assert_eq!(rig.chain.descriptors, 2);
    assert!(rig.chain.indirect);
}

// An indirect table may hold up to queue-size entries; alignment of the table
// itself is not required by the spec.
#[test]
fn indirect_table_of_queue_size_entries_at_odd_address() {
    let mut rig = Rig::new(4, features(true, false));
    let at = TABLES + 3;
    let entries: Vec<_> = (0..4u16)
        .map(|i| (BUF + u64::from(i), 1, if i < 3 { N } else { 0 }, i + 1))
        .collect();
    rig.table(at, &entries);
    rig.desc(0, at, 64, I, 0);
    rig.offer(0, &[0]);
    assert!(rig.pop().unwrap());
    assert_eq!(rig.chain.readable.len(), 4);
    assert_eq!(rig.chain.descriptors, 4);
}

// §2.7.8: the device writes {id, len} little-endian at used.ring[idx % size]
// and then publishes used.idx.
#[test]
fn used_element_and_used_idx_are_written() {
    let mut rig = Rig::new(4, RingFeatures::default());
    for k in 0..6u16 {
        rig.dev
            .add_used(&rig.mem, k % 4, 0x1000 + u32::from(k))
            .unwrap();
        assert_eq!(rig.u16_at(rig.layout.used_idx()), k + 1);
        let mut b = [0u8; 8];
        rig.mem.read(rig.layout.used_ring(k), &mut b).unwrap();
        assert_eq!(
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            u32::from(k % 4)
        );
        assert_eq!(
            u32::from_le_bytes(b[4..].try_into().unwrap()),
            0x1000 + u32::from(k)
        );
    }
    assert_eq!(rig.dev.next_used(), 6);
    // Slot 4 reused slot 0.
    assert_eq!(rig.layout.used_ring(4), rig.layout.used_ring(0));
}

// Remote servers write used elements themselves and publish the index later.
#[test]
fn take_used_slot_then_publish_used() {
    let mut rig = Rig::new(4, RingFeatures::default());
    let (a0, b0) = rig.dev.take_used_slot(3, 77);
    let (a1, _) = rig.dev.take_used_slot(1, 0);
    assert_eq!(a0, rig.layout.used_ring(0));
    assert_eq!(a1, rig.layout.used_ring(1));
    assert_eq!(b0, [3, 0, 0, 0, 77, 0, 0, 0]);
    assert_eq!(rig.u16_at(rig.layout.used_idx()), 0, "not published yet");
    rig.dev.publish_used(&rig.mem, 2).unwrap();
    assert_eq!(rig.u16_at(rig.layout.used_idx()), 2);
    assert_eq!(rig.dev.next_used(), 2);
}

// §2.7.10 without EVENT_IDX: the device sets/clears VRING_USED_F_NO_NOTIFY
// and the driver honours it; other flag bits are preserved.
#[test]
fn kick_suppression_with_no_notify_flag() {
    let mut rig = Rig::new(4, RingFeatures::default());
    let mut drv = rig.driver(None);
    rig.mem.store_u16(rig.layout.used_flags(), 0x8000).unwrap();
    rig.dev.disable_notification(&rig.mem).unwrap();
    assert_eq!(
        rig.u16_at(rig.layout.used_flags()),
        0x8000 | VRING_USED_F_NO_NOTIFY
    );
    drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(!drv.should_kick(&rig.mem).unwrap());
    // Re-enabling finds the entry that arrived while suppressed.
    assert!(rig.dev.enable_notification(&rig.mem).unwrap());
    assert_eq!(rig.u16_at(rig.layout.used_flags()), 0x8000);
    assert!(rig.pop().unwrap());
    assert!(!rig.dev.enable_notification(&rig.mem).unwrap());
    drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(drv.should_kick(&rig.mem).unwrap());
}

// §2.7.10 with EVENT_IDX: the device writes avail_event = next_avail, and
// the driver kicks only when its publish moves avail.idx past avail_event.
#[test]
fn kick_suppression_with_avail_event() {
    let mut rig = Rig::new(8, features(false, true));
    let mut drv = rig.driver(None);
    assert!(!rig.dev.enable_notification(&rig.mem).unwrap());
    assert_eq!(rig.u16_at(rig.layout.avail_event()), 0);
    // used.flags is not the mechanism with EVENT_IDX.
    rig.dev.disable_notification(&rig.mem).unwrap();
    assert_eq!(rig.u16_at(rig.layout.used_flags()), 0);

    drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(drv.should_kick(&rig.mem).unwrap(), "0 -> 1 crosses 0");
    drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(!drv.should_kick(&rig.mem).unwrap(), "1 -> 2 does not");

    // The device consumed both, then re-enabled: avail_event = 2.
    assert!(rig.pop().unwrap() && rig.pop().unwrap());
    assert!(!rig.dev.enable_notification(&rig.mem).unwrap());
    assert_eq!(rig.u16_at(rig.layout.avail_event()), 2);
    // A batch of two publishes crossing 2 kicks once.
    drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(drv.should_kick(&rig.mem).unwrap());
    // NO_NOTIFY is ignored when EVENT_IDX is negotiated.
    rig.mem
        .store_u16(rig.layout.used_flags(), VRING_USED_F_NO_NOTIFY)
        .unwrap();
    rig.mem.store_u16(rig.layout.avail_event(), 4).unwrap();
    drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(drv.should_kick(&rig.mem).unwrap());
}

// enable_notification must report entries that arrived during the switch
// (with EVENT_IDX too), or they would be stranded.
#[test]
fn enable_notification_reports_entries_that_raced_in() {
    let mut rig = Rig::new(4, features(false, true));
    rig.desc(0, BUF, 1, 0, 0);
    rig.offer(0, &[0]);
    assert!(rig.dev.enable_notification(&rig.mem).unwrap());
    assert_eq!(rig.u16_at(rig.layout.avail_event()), 0);
    assert!(rig.pop().unwrap());
    assert!(!rig.dev.enable_notification(&rig.mem).unwrap());
    assert_eq!(rig.u16_at(rig.layout.avail_event()), 1);
}

// §2.7.7 without EVENT_IDX: the device interrupts unless the driver set
// VRING_AVAIL_F_NO_INTERRUPT.
#[test]
fn interrupt_suppression_with_no_interrupt_flag() {
    let mut rig = Rig::new(4, RingFeatures::default());
    let mut drv = rig.driver(None);
    rig.dev.add_used(&rig.mem, 0, 0).unwrap();
    assert!(rig.dev.needs_notification(&rig.mem).unwrap());
    drv.disable_interrupts(&rig.mem).unwrap();
    assert_eq!(
        rig.u16_at(rig.layout.avail_flags()),
        VRING_AVAIL_F_NO_INTERRUPT
    );
    rig.dev.add_used(&rig.mem, 0, 0).unwrap();
    assert!(!rig.dev.needs_notification(&rig.mem).unwrap());
    // Used entries are waiting (the device published two, the driver reaped none).
    assert!(drv.enable_interrupts(&rig.mem).unwrap());
    assert_eq!(rig.u16_at(rig.layout.avail_flags()), 0);
    rig.dev.add_used(&rig.mem, 0, 0).unwrap();
    assert!(rig.dev.needs_notification(&rig.mem).unwrap());
}

// §2.7.10 with EVENT_IDX: interrupt only when used.idx moved past used_event
// since the last check; NO_INTERRUPT is ignored.
#[test]
fn interrupt_suppression_with_used_event_window() {
    let mut rig = Rig::new(8, features(false, true));
    let l = rig.layout;
    let mem = &rig.mem;
    let dev = &mut rig.dev;
    // First check after set-up always notifies (no previous state).
    dev.add_used(mem, 0, 0).unwrap();
    assert!(dev.needs_notification(mem).unwrap());
    // used_event = 3: moving 1 -> 3 does not cross it, 3 -> 4 does.
    mem.store_u16(l.used_event(), 3).unwrap();
    dev.add_used(mem, 0, 0).unwrap();
    dev.add_used(mem, 0, 0).unwrap();
    assert!(!dev.needs_notification(mem).unwrap());
    dev.add_used(mem, 0, 0).unwrap();
    assert!(dev.needs_notification(mem).unwrap());
    // No new entries: no interrupt even though used_event lies behind.
    assert!(!dev.needs_notification(mem).unwrap());
    // A batch 4 -> 8 that jumps over used_event = 5 notifies once.
    mem.store_u16(l.used_event(), 5).unwrap();
    for _ in 0..4 {
        dev.add_used(mem, 0, 0).unwrap();
    }
    assert!(dev.needs_notification(mem).unwrap());
    // NO_INTERRUPT is ignored with EVENT_IDX.
    mem.store_u16(l.avail_flags(), VRING_AVAIL_F_NO_INTERRUPT)
        .unwrap();
    mem.store_u16(l.used_event(), 8).unwrap();
    dev.add_used(mem, 0, 0).unwrap();
    assert!(dev.needs_notification(mem).unwrap());
}

// The driver's EVENT_IDX interrupt controls drive used_event.
#[test]
fn driver_event_idx_interrupt_controls() {
    let mut rig = Rig::new(8, features(false, true));
    let mut drv = rig.driver(None);
    let h = drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(rig.pop().unwrap());
    // Prime the device's event state.
    assert!(rig.dev.needs_notification(&rig.mem).unwrap());
    drv.disable_interrupts(&rig.mem).unwrap();
    rig.dev.add_used(&rig.mem, h, 1).unwrap();
    assert!(!rig.dev.needs_notification(&rig.mem).unwrap());
    assert!(drv.enable_interrupts(&rig.mem).unwrap(), "one is waiting");
    assert_eq!(rig.u16_at(rig.layout.used_event()), 0);
    assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((h, 1)));
    assert!(!drv.enable_interrupts(&rig.mem).unwrap());
    assert_eq!(rig.u16_at(rig.layout.used_event()), 1);
    let h = drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(rig.pop().unwrap());
    rig.dev.add_used(&rig.mem, h, 0).unwrap();
    assert!(rig.dev.needs_notification(&rig.mem).unwrap());
}

// A queue handed to another device instance resumes exactly where it was.
#[test]
fn ring_state_handover() {
    let mut rig = Rig::new(8, RingFeatures::default());
    let mut drv = rig.driver(None);
    let heads: Vec<u16> = (0..5)
        .map(|i| drv.add(&rig.mem, &[seg(BUF + i, 1)], &[], false).unwrap())
        .collect();
    drv.publish(&rig.mem).unwrap();
    for _ in 0..3 {
        assert!(rig.pop().unwrap());
    }
    rig.dev.add_used(&rig.mem, heads[0], 10).unwrap();
    let s = rig.dev.state();
    assert_eq!(
        s,
        RingState {
            next_avail: 3,
            next_used: 1
        }
    );
    let mut other = DeviceQueue::new(rig.layout, rig.features, &rig.map).unwrap();
    other.set_state(s);
    assert_eq!(other.state(), s);
    let mut c = DescriptorChain::default();
    assert!(other.pop(&rig.mem, &rig.map, &mut c).unwrap());
    assert_eq!(c.head, heads[3]);
    assert_eq!(c.readable, [seg(BUF + 3, 1)]);
    other.add_used(&rig.mem, heads[1], 11).unwrap();
    assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((heads[0], 10)));
    assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((heads[1], 11)));
    assert_eq!(drv.pop_used(&rig.mem).unwrap(), None);
    assert_eq!(other.pending(&rig.mem).unwrap(), 1);
}

// The 16-bit indices wrap at 65535 on both sides.
#[test]
fn indices_wrap_around_65535() {
    let mut rig = Rig::new(4, features(false, true));
    let mut drv = rig.driver(None);
    let rounds = 65536 + 9;
    for i in 0..rounds {
        let a = BUF + (i % 7) as u64;
        let h = drv
            .add(&rig.mem, &[seg(a, 1)], &[seg(a + 8, 2)], false)
            .unwrap();
        drv.publish(&rig.mem).unwrap();
        assert!(rig.pop().unwrap());
        assert_eq!(rig.chain.head, h);
        assert_eq!(rig.chain.readable, [seg(a, 1)]);
        rig.dev.add_used(&rig.mem, h, i as u32).unwrap();
        assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((h, i as u32)));
    }
    assert_eq!(rig.dev.next_avail(), 9);
    assert_eq!(rig.dev.next_used(), 9);
    assert_eq!(rig.u16_at(rig.layout.used_idx()), 9);
    assert_eq!(drv.num_free(), 4);
}

// Device positions resumed just below the wrap see entries published across it.
#[test]
fn avail_index_wrap_from_handed_over_state() {
    let mut rig = Rig::new(4, RingFeatures::default());
    for i in 0..4 {
        rig.desc(i, BUF, 1, 0, 0);
    }
    rig.dev.set_state(RingState {
        next_avail: 0xfffe,
        next_used: 0xffff,
    });
    rig.offer(0xfffe, &[0, 1, 2, 3]);
    assert_eq!(rig.u16_at(rig.layout.avail_idx()), 2);
    assert_eq!(rig.dev.pending(&rig.mem).unwrap(), 4);
    for h in 0..4 {
        assert!(rig.pop().unwrap());
        assert_eq!(rig.chain.head, h);
    }
    assert!(!rig.pop().unwrap());
    rig.dev.add_used(&rig.mem, 0, 0).unwrap();
    rig.dev.add_used(&rig.mem, 1, 0).unwrap();
    assert_eq!(rig.u16_at(rig.layout.used_idx()), 1);
    let mut b = [0u8; 8];
    rig.mem.read(rig.layout.used_ring(0), &mut b).unwrap();
    assert_eq!(b[0], 1, "index 0 (after 0xffff) lands in slot 0");
}

// Indirect chains through the driver: one descriptor per chain.
#[test]
fn driver_indirect_uses_one_descriptor() {
    let mut rig = Rig::new(8, features(true, false));
    let area = IndirectArea {
        base: TABLES,
        max_entries: 8,
    };
    let mut drv = rig.driver(Some(area));
    let r: Vec<_> = (0..5).map(|i| seg(BUF + i * 0x10, 16)).collect();
    let w = [seg(BUF + 0x800, 512), seg(BUF + 0x1000, 1)];
    let h = drv.add(&rig.mem, &r, &w, true).unwrap();
    assert_eq!(drv.num_free(), 7);
    drv.publish(&rig.mem).unwrap();
    assert!(rig.pop().unwrap());
    assert!(rig.chain.indirect);
    assert_eq!(rig.chain.readable, r);
    assert_eq!(rig.chain.writable, w);
    assert_eq!(rig.chain.descriptors, 7);
    rig.dev.add_used(&rig.mem, h, 513).unwrap();
    assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((h, 513)));
    assert_eq!(drv.num_free(), 8);
}
