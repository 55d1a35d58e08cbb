//! The vhost-user relay's message parsing (`vhost_user::relay`) on a byte
//! stream from the VMM (or the daemon): headers, then every body parser
//! the relay applies (vring state, u64 features, the inflight struct). It
//! must never panic, refuse a body over the relay's buffer or a short
//! field with an error, and parse fields exactly where the spec puts them.
//!
//! Input: the stream of messages (12-byte header, then the body).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vrio_core::vhost_user::relay::{
    parse_u64_body, parse_vring_state, InflightMsg, MsgHeader, ParseError,
};

/// The relay's buffer holds a header and this much body (vhost's MAX_MSG_SIZE).
const MAX_BODY: usize = 0x1000;

fn le(b: &[u8], at: usize, n: usize) -> Option<u64> {
    let s = b.get(at..at + n)?;
    Some(s.iter().rev().fold(0u64, |v, &x| v << 8 | u64::from(x)))
}

fn bodies(body: &[u8]) {
    match parse_vring_state(body) {
        Ok((index, num)) => {
            assert_eq!(Some(u64::from(index)), le(body, 0, 4));
            assert_eq!(Some(u64::from(num)), le(body, 4, 4));
        }
        Err(e) => {
            assert!(body.len() < 8);
            assert!(matches!(e, ParseError::Short { .. }));
        }
    }
    match parse_u64_body(body) {
        Ok(f) => assert_eq!(Some(f), le(body, 0, 8)),
        Err(_) => assert!(body.len() < 8),
    }
    let lenient = InflightMsg::parse_lenient(body);
    assert_eq!(lenient.mmap_size, le(body, 0, 8).unwrap_or(0));
    assert_eq!(lenient.mmap_offset, le(body, 8, 8).unwrap_or(0));
    assert_eq!(u64::from(lenient.num_queues), le(body, 16, 2).unwrap_or(0));
    assert_eq!(u64::from(lenient.queue_size), le(body, 18, 2).unwrap_or(0));
    match InflightMsg::parse(body) {
        Ok(m) => {
            assert!(body.len() >= InflightMsg::LEN);
            assert_eq!(m, lenient);
        }
        Err(e) => {
            assert!(body.len() < InflightMsg::LEN);
            assert!(!e.to_string().is_empty());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        let h = match MsgHeader::parse(rest) {
            Ok(h) => h,
            Err(ParseError::Short { len, need, .. }) => {
                assert_eq!((len, need), (rest.len(), MsgHeader::LEN));
                return;
            }
            Err(ParseError::Oversized(size)) => {
                assert!(size > MAX_BODY);
                assert_eq!(le(rest, 8, 4), Some(size as u64));
                // The relay ends the session.
                return;
            }
        };
        assert!(h.size <= MAX_BODY, "the body fits the relay's buffer");
        assert_eq!(le(rest, 0, 4), Some(u64::from(h.request)));
        assert_eq!(le(rest, 4, 4), Some(u64::from(h.flags)));
        assert_eq!(le(rest, 8, 4), Some(h.size as u64));
        let tail = &rest[MsgHeader::LEN..];
        // A short body: the relay's read_exact fails; parse what is there.
        let n = h.size.min(tail.len());
        bodies(&tail[..n]);
        if n < h.size {
            return;
        }
        rest = &tail[n..];
    }
});
