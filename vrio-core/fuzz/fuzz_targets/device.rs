//! `DeviceQueue` driven by a random sequence of device operations and guest
//! scribbles over a random memory image. It must never panic, every popped
//! segment lies inside the map, and used.idx always equals what the device
//! published.
//!
//! Input: size_log2, features, desc/avail/used offsets (u16 each), image
//! length (u16), the image, then operations.

#![no_main]

mod common;

use std::cell::RefCell;

use common::{assert_inside, CellMemory, Input, VecMemory};
use libfuzzer_sys::fuzz_target;
use vrio_core::ring::{
    DescriptorChain, DeviceQueue, QueueError, RingFeatures, RingLayout, RingState,
};
use vrio_core::GuestMemory;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let size = 1u16 << (input.u8() % 9);
    let features = RingFeatures::from_bits(u64::from(input.u8()) << 28);
    let desc = u64::from(input.u16()) & !15;
    let avail = u64::from(input.u16()) & !1;
    let used = u64::from(input.u16()) & !3;
    let image_len = usize::from(input.u16());
    let image = input.take(image_len).to_vec();
    if image.is_empty() {
        return;
    }
    let mem = CellMemory(RefCell::new(VecMemory {
        regions: vec![(0, image)],
    }));
    let Some(map) = mem.0.borrow().map() else {
        return;
    };
    let Ok(layout) = RingLayout::new(size, desc, avail, used) else {
        return;
    };
    let Ok(mut dev) = DeviceQueue::new(layout, features, &map) else {
        return;
    };
    let mut chain = DescriptorChain::default();
    let mut in_flight: Vec<u16> = Vec::new();
    while !input.is_empty() {
        match input.u8() % 9 {
            0 => match dev.pop(&mem, &map, &mut chain) {
                Ok(true) => {
                    assert_inside(&chain, &map, &mem.0.borrow(), size);
                    assert!(chain.head < size);
                    in_flight.push(chain.head);
                }
                Ok(false) => {}
                Err(QueueError::BadChain { head, .. }) => {
                    assert_inside(&chain, &map, &mem.0.borrow(), size);
                    if head < size {
                        in_flight.push(head);
                    }
                }
                Err(e) => assert!(e.needs_reset()),
            },
            1 => {
                if !in_flight.is_empty() {
                    let i = usize::from(input.u8()) % in_flight.len();
                    let head = in_flight.swap_remove(i);
                    let before = dev.next_used();
                    dev.add_used(&mem, head, input.u32()).unwrap();
                    assert_eq!(dev.next_used(), before.wrapping_add(1));
                    // The guest may scribble on used.idx; read it back only
                    // right after the device wrote it.
                    assert_eq!(mem.load_u16(layout.used_idx()).unwrap(), dev.next_used());
                }
            }
            2 => {
                let _ = dev.needs_notification(&mem).unwrap();
            }
            3 => {
                let _ = dev.enable_notification(&mem);
            }
            4 => dev.disable_notification(&mem).unwrap(),
            5 => {
                let idx = input.u16();
                mem.store_u16(layout.avail_idx(), idx).unwrap();
            }
            6 => {
                // The guest rewrites 16 bytes anywhere (descriptors, rings).
                let at = u64::from(input.u16());
                let bytes = input.take(16).to_vec();
                let _ = mem.write(at, &bytes);
            }
            7 => {
                let s = RingState {
                    next_avail: input.u16(),
                    next_used: input.u16(),
                };
                dev.set_state(s);
                assert_eq!(dev.state(), s);
                in_flight.clear();
            }
            _ => {
                let (addr, b) = dev.take_used_slot(input.u16() % size, input.u32());
                mem.write(addr, &b).unwrap();
                dev.publish_used(&mem, dev.next_used()).unwrap();
            }
        }
    }
});
