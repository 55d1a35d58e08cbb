//! The synthetic guest's own guards: it never hands out a descriptor twice
//! and never trusts the device's used ring.

use super::*;

#[test]
fn add_refuses_empty_and_oversized_chains() {
    let rig = Rig::new(4, RingFeatures::default());
    let mut drv = rig.driver(None);
    assert_eq!(drv.add(&rig.mem, &[], &[], false), Err(DriverError::Empty));
    let five: Vec<_> = (0..5).map(|i| seg(BUF + i, 1)).collect();
    assert_eq!(
        drv.add(&rig.mem, &five, &[], false),
        Err(DriverError::TooManySegments(5))
    );
    assert_eq!(
        drv.add(&rig.mem, &[seg(BUF, 1)], &[], true),
        Err(DriverError::IndirectUnavailable)
    );
    drv.add(&rig.mem, &five[..3], &[], false).unwrap();
    assert_eq!(
        drv.add(&rig.mem, &five[..2], &[], false),
        Err(DriverError::NoSpace { need: 2, free: 1 })
    );
    assert_eq!(drv.num_free(), 1);
    assert_eq!(drv.outstanding(), 1);
}

#[test]
fn indirect_needs_feature_and_area_and_fits_the_area() {
    let rig = Rig::new(8, features(true, false));
    let area = IndirectArea {
        base: TABLES,
        max_entries: 2,
    };
    let mut no_area = rig.driver(None);
    assert_eq!(
        no_area.add(&rig.mem, &[seg(BUF, 1)], &[], true),
        Err(DriverError::IndirectUnavailable)
    );
    let no_feature = DriverQueue::new(rig.layout, RingFeatures::default(), Some(area));
    let mut no_feature = no_feature;
    assert_eq!(
        no_feature.add(&rig.mem, &[seg(BUF, 1)], &[], true),
        Err(DriverError::IndirectUnavailable)
    );
    let mut drv = rig.driver(Some(area));
    assert_eq!(
        drv.add(&rig.mem, &[seg(BUF, 1); 3], &[], true),
        Err(DriverError::TooManySegments(3))
    );
    // A big indirect area does not allow chains longer than the queue.
    let big = IndirectArea {
        base: TABLES,
        max_entries: 16,
    };
    let mut drv16 = rig.driver(Some(big));
    assert_eq!(
        drv16.add(&rig.mem, &[seg(BUF, 1); 9], &[], true),
        Err(DriverError::TooManySegments(9))
    );
    drv16.add(&rig.mem, &[seg(BUF, 1); 8], &[], true).unwrap();
    assert_eq!(drv.num_free(), 8, "a refused add takes nothing");
}

#[test]
fn pop_used_refuses_unknown_ids_and_runaway_used_idx() {
    let mut rig = Rig::new(4, RingFeatures::default());
    let mut drv = rig.driver(None);
    let h = drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(rig.pop().unwrap());
    // A used.idx that moves by more than what is outstanding.
    rig.mem.store_u16(rig.layout.used_idx(), 2).unwrap();
    assert_eq!(drv.pop_used(&rig.mem), Err(DriverError::BadUsedIdx(2)));
    // An id the driver never handed out, then one past the table.
    rig.mem.store_u16(rig.layout.used_idx(), 0).unwrap();
    let mut dev = DeviceQueue::new(rig.layout, rig.features, &rig.map).unwrap();
    dev.add_used(&rig.mem, h.wrapping_add(1) % 4, 0).unwrap();
    assert_eq!(
        drv.pop_used(&rig.mem),
        Err(DriverError::BadUsedId {
            id: u32::from(h.wrapping_add(1) % 4)
        })
    );
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&0x1_0000u32.to_le_bytes());
    rig.mem.write(rig.layout.used_ring(0), &b).unwrap();
    assert_eq!(
        drv.pop_used(&rig.mem),
        Err(DriverError::BadUsedId { id: 0x1_0000 })
    );
    assert_eq!(drv.num_free(), 3, "nothing freed by bad entries");
    assert_eq!(drv.outstanding(), 1);
}

// A chain is returned at most once: a duplicate used entry is refused.
#[test]
fn duplicate_used_entry_is_refused() {
    let mut rig = Rig::new(4, RingFeatures::default());
    let mut drv = rig.driver(None);
    let a = drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    let _b = drv.add(&rig.mem, &[seg(BUF, 1)], &[], false).unwrap();
    drv.publish(&rig.mem).unwrap();
    assert!(rig.pop().unwrap() && rig.pop().unwrap());
    rig.dev.add_used(&rig.mem, a, 0).unwrap();
    rig.dev.add_used(&rig.mem, a, 0).unwrap();
    assert_eq!(drv.pop_used(&rig.mem).unwrap(), Some((a, 0)));
    assert_eq!(
        drv.pop_used(&rig.mem),
        Err(DriverError::BadUsedId { id: u32::from(a) })
    );
    assert_eq!(drv.num_free(), 3);
}
