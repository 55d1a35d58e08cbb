//! The virtio-blk request parser (`blk::RequestLayout::parse`) on chains
//! the walker accepts from a random memory image, then the request run to
//! completion on a small in-memory disk (`BlockDevice::process`, which
//! also parses discard / write-zeroes ranges). It must never panic; a
//! parsed request's lengths add up to the chain's, its header is the
//! chain's first 16 readable bytes and its status byte lies in the last
//! non-empty writable segment; a refused chain is refused for its shape,
//! never for a memory access.
//!
//! Input: size_log2, features, head (u16), desc table slot (u16), second
//! region gpa (u16, in pages), region split (u16), read-only (u8), then
//! the memory image (as the walker target).

#![no_main]

mod common;

use std::cell::RefCell;
use std::sync::Arc;

use common::{assert_inside, CellMemory, Input, RingArgs};
use libfuzzer_sys::fuzz_target;
use vrio_core::blk::{
    BlkError, BlockConfig, BlockDevice, MemoryBackend, RequestHeader, RequestLayout, HEADER_SIZE,
};
use vrio_core::ring::{DescriptorChain, RingLayout, Walker};
use vrio_core::GuestMemory;

/// 1 MiB: every in-range request stays small.
const DISK: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let ring = RingArgs::read(&mut input);
    let (size, features, head, desc) = (ring.size, ring.features, ring.head, ring.desc);
    let read_only = input.u8() & 1 != 0;
    let mem = CellMemory(RefCell::new(ring.memory(input.take(usize::MAX))));
    let Some(map) = mem.0.borrow().map() else {
        return;
    };
    let Ok(layout) = RingLayout::new(size, desc, 0, 0) else {
        return;
    };
    let mut chain = DescriptorChain::default();
    if Walker::new()
        .walk(&mem, &map, &layout, features, head, &mut chain)
        .is_err()
    {
        return;
    }
    assert_inside(&chain, &map, &mem.0.borrow(), size);

    let readable = chain.readable_len();
    let writable = chain.writable_len();
    let parsed = RequestLayout::parse(&mem, &chain);
    match &parsed {
        Ok(r) => {
            assert!(readable >= HEADER_SIZE);
            assert_eq!(r.out_len, readable - HEADER_SIZE);
            assert_eq!(r.in_len + 1, writable);
            let last = chain
                .writable
                .iter()
                .rev()
                .find(|s| s.len > 0)
                .expect("a status byte");
            assert_eq!(r.status_addr, last.addr + u64::from(last.len) - 1);
            assert!(map.check(r.status_addr, 1).is_ok());
            // The header is the first 16 readable bytes, however split.
            let mut h = Vec::new();
            for s in &chain.readable {
                let mut b = vec![0u8; s.len as usize];
                mem.read(s.addr, &mut b).expect("segment inside memory");
                h.extend_from_slice(&b);
                if h.len() >= HEADER_SIZE as usize {
                    break;
                }
            }
            let mut hb = [0u8; HEADER_SIZE as usize];
            hb.copy_from_slice(&h[..HEADER_SIZE as usize]);
            assert_eq!(r.header, RequestHeader::from_bytes(&hb));
        }
        Err(BlkError::NoStatusByte) => assert!(chain.writable.iter().all(|s| s.len == 0)),
        Err(BlkError::HeaderTooShort { len }) => {
            assert_eq!(*len, readable);
            assert!(*len < HEADER_SIZE);
        }
        Err(e @ BlkError::Memory(_)) => panic!("a walked chain failed to read: {e}"),
    }

    // The whole request against a small disk.
    let backend = Arc::new(MemoryBackend::new(DISK).with_read_only(read_only));
    let mut dev = BlockDevice::new(backend, BlockConfig::default());
    match dev.process(&mem, &chain) {
        Ok(used) => {
            let r = parsed.expect("processed only what parses");
            assert!(u64::from(used) >= 1 && u64::from(used) <= r.in_len + 1);
            let mut status = [0u8; 1];
            mem.read(r.status_addr, &mut status).expect("status byte");
            assert!(status[0] <= 2, "status byte {}", status[0]);
        }
        Err(e) => assert_eq!(Err(e), parsed.map(|_| ())),
    }
});
