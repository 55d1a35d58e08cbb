//! Spec-rule unit tests of the ring engine.

use super::*;
use crate::memory::{anonymous_memory, GuestMemory, MemoryMap};

#[test]
fn driver_to_device_round_trip() {
    let mem = anonymous_memory(0x10000).unwrap();
    let map = MemoryMap::of(&mem).unwrap();
    let (layout, _) = RingLayout::packed(8, 0x1000).unwrap();
    let f = RingFeatures::default();
    let mut drv = DriverQueue::new(layout, f, None);
    drv.init(&mem).unwrap();
    let mut dev = DeviceQueue::new(layout, f, &map).unwrap();
    let r = [Segment {
        addr: 0x8000,
        len: 16,
    }];
    let w = [Segment {
        addr: 0x9000,
        len: 1,
    }];
    let head = drv.add(&mem, &r, &w, false).unwrap();
    drv.publish(&mem).unwrap();
    let mut c = DescriptorChain::default();
    assert!(dev.pop(&mem, &map, &mut c).unwrap());
    assert_eq!(c.head, head);
    assert_eq!(c.readable, r);
    assert_eq!(c.writable, w);
    dev.add_used(&mem, head, 1).unwrap();
    assert_eq!(drv.pop_used(&mem).unwrap(), Some((head, 1)));
    assert_eq!(mem.load_u16(layout.used_idx()).unwrap(), 1);
}
