//! The chain walker on a random memory image, ring layout, head and
//! features: it must never panic, and every segment it yields lies inside
//! the guest's memory map.
//!
//! Input: size_log2, features, head (u16), desc table slot (u16), second
//! region gpa (u16, in pages), region split (u16), then the memory image.

#![no_main]

mod common;

use common::{assert_inside, Input, RingArgs};
use libfuzzer_sys::fuzz_target;
use vrio_core::ring::{ChainError, DescriptorChain, RingLayout, Walker};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let ring = RingArgs::read(&mut input);
    let (size, features, head, desc) = (ring.size, ring.features, ring.head, ring.desc);
    let mem = ring.memory(input.take(usize::MAX));
    let Some(map) = mem.map() else { return };
    // The walker does not need the avail/used rings; place them anywhere valid.
    let Ok(layout) = RingLayout::new(size, desc, 0, 0) else {
        return;
    };
    let mut walker = Walker::new();
    let mut chain = DescriptorChain::default();
    let r = walker.walk(&mem, &map, &layout, features, head, &mut chain);
    assert_inside(&chain, &map, &mem, size);
    match r {
        Ok(()) => {
            assert_eq!(chain.head, head);
            assert!(head < size);
            let n = chain.readable.len() + chain.writable.len();
            assert_eq!(usize::from(chain.descriptors), n);
            assert!(n >= 1);
            if chain.indirect {
                assert!(features.indirect);
            }
        }
        Err(ChainError::TooLong { .. }) => assert!(chain.indirect),
        Err(_) => {}
    }
});
