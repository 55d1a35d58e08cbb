//! A guest's transmit buffer through the net parsers, in the order the TX
//! path applies them: `NetHeader::from_bytes` and `validate_tx`, the
//! partial checksum at the offsets the guest chose (`check_partial`,
//! `complete_partial`), and `parse_frame`. None may panic; an accepted
//! header's checksum field lies inside the frame, completing it writes
//! only that field, and an accepted frame is within the MTU's bounds with
//! a unicast source.
//!
//! Input: MTU (u16), then `virtio_net_hdr` (12 bytes) and the frame.

#![no_main]

mod common;

use common::Input;
use libfuzzer_sys::fuzz_target;
use vrio_core::net::checksum::{check_partial, complete_partial};
use vrio_core::net::frame::{ETH_HLEN, VLAN_HLEN};
use vrio_core::net::header::HeaderError;
use vrio_core::net::{parse_frame, FrameError, FrameLimits, NetHeader, HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let limits = FrameLimits { mtu: input.u16() };
    let hb = input.take(HDR_LEN);
    let mut h = [0u8; HDR_LEN];
    h[..hb.len()].copy_from_slice(hb);
    let mut frame = input.take(usize::MAX).to_vec();

    let hdr = NetHeader::from_bytes(&h);
    assert_eq!(hdr.to_bytes(), h, "the header round-trips");
    let len = frame.len();
    let fits = |start: u16, offset: u16| usize::from(start) + usize::from(offset) + 2 <= len;
    assert_eq!(
        check_partial(hdr.csum_start, hdr.csum_offset, len).is_ok(),
        fits(hdr.csum_start, hdr.csum_offset)
    );
    match hdr.validate_tx(len) {
        Ok(()) => {
            assert_eq!(hdr.flags & !1, 0);
            assert_eq!(hdr.gso_type, 0);
            if hdr.needs_csum() {
                assert!(fits(hdr.csum_start, hdr.csum_offset));
                let before = frame.clone();
                complete_partial(&mut frame, hdr.csum_start, hdr.csum_offset)
                    .expect("validate_tx checked the field");
                let at = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
                assert_eq!(frame[..at], before[..at]);
                assert_eq!(frame[at + 2..], before[at + 2..]);
                assert_ne!(frame[at..at + 2], [0, 0], "0 means no checksum");
            }
        }
        Err(HeaderError::Checksum(e)) => {
            assert!(hdr.needs_csum() && !fits(e.start, e.offset));
            assert_eq!(e.len, len);
        }
        Err(HeaderError::Flags(f)) => assert_ne!(f & !1, 0),
        Err(HeaderError::Gso(g)) => assert_ne!(g, 0),
    }
    // Offsets the header never checked: still refused, never a panic.
    let mut scratch = frame.clone();
    let r = complete_partial(&mut scratch, hdr.gso_size, hdr.hdr_len);
    assert_eq!(r.is_ok(), fits(hdr.gso_size, hdr.hdr_len));

    match parse_frame(&frame, limits) {
        Ok(a) => {
            assert!(len >= ETH_HLEN && len <= limits.max_frame());
            assert!(len <= usize::from(limits.mtu) + ETH_HLEN || frame[12..14] == [0x81, 0]);
            assert_eq!(a.dst.0[..], frame[..6]);
            assert_eq!(a.src.0[..], frame[6..12]);
            assert!(!a.src.is_multicast());
        }
        Err(FrameError::Short(n)) => assert!(n == len && n < ETH_HLEN),
        Err(FrameError::Oversized { len: n, max }) => {
            assert_eq!(n, len);
            assert!(n > max && max <= usize::from(limits.mtu) + ETH_HLEN + VLAN_HLEN);
        }
        Err(FrameError::MulticastSource(m)) => assert!(m.is_multicast()),
    }
});
