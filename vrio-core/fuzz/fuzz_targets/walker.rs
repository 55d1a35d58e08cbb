//! The chain walker on a random memory image, ring layout, head and
//! features: it must never panic, and every segment it yields lies inside
//! the guest's memory map.
//!
//! Input: size_log2, features, head (u16), desc table slot (u16), second
//! region gpa (u16, in pages), region split (u16), then the memory image.

#![no_main]

mod common;

use common::{assert_inside, Input, VecMemory};
use libfuzzer_sys::fuzz_target;
use vrio_core::ring::{ChainError, DescriptorChain, RingFeatures, RingLayout, Walker};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let size = 1u16 << (input.u8() % 16);
    let features = RingFeatures::from_bits(u64::from(input.u8()) << 28);
    let head = input.u16();
    let desc = u64::from(input.u16()) * 16;
    let gpa1 = u64::from(input.u16()) << 12;
    let split = usize::from(input.u16());
    let image = input.take(usize::MAX);
    let (r0, r1) = image.split_at(split.min(image.len()));
    let mut regions = Vec::new();
    if !r0.is_empty() {
        regions.push((0, r0.to_vec()));
    }
    if !r1.is_empty() {
        regions.push((r0.len() as u64 + gpa1, r1.to_vec()));
    }
    let mem = VecMemory { regions };
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
