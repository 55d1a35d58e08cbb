//! The soft fabric's frame parser (`vrio_rdma::soft::wire::Header::decode`)
//! on a byte stream a peer sends, split into frames the way the endpoint's
//! reader does (24-byte header, then `payload_len` bytes of payload). It
//! must never panic; every accepted header re-encodes to the same bytes and
//! obeys its kind's rules; every refusal names the field at fault.
//!
//! Input: the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vrio_rdma::soft::wire::{
    Header, Kind, Status, WireError, HEADER_LEN, MAGIC, MAX_MESSAGE, VERSION,
};

fn check(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    let r = Header::decode(b);
    match &r {
        Ok(h) => {
            assert_eq!(&h.encode(), b, "an accepted header re-encodes exactly");
            assert!(h.payload_len <= MAX_MESSAGE);
            let request = matches!(
                h.kind,
                Kind::Hello | Kind::Read | Kind::Write | Kind::WriteImm | Kind::Send
            );
            if request {
                assert_eq!(h.status, Status::Ok);
            }
            match h.kind {
                Kind::Hello => {
                    assert_eq!(
                        (h.addr, h.aux, h.payload_len, h.rkey),
                        (MAGIC, VERSION, 0, 0)
                    )
                }
                Kind::Read => assert!(h.payload_len == 0 && h.aux <= MAX_MESSAGE),
                Kind::Write => assert_eq!(h.aux, 0),
                Kind::WriteImm => {}
                Kind::Send | Kind::ReadResp | Kind::Ack => {
                    assert_eq!((h.addr, h.rkey, h.aux), (0, 0, 0))
                }
            }
            if h.kind == Kind::Ack || (h.kind == Kind::ReadResp && h.status != Status::Ok) {
                assert_eq!(h.payload_len, 0);
            }
        }
        Err(e) => {
            match *e {
                WireError::Kind(k) => assert_eq!(k, b[4]),
                WireError::Status(s) => assert_eq!(s, b[5]),
                WireError::Reserved(r) => assert_eq!(r.to_le_bytes(), b[6..8]),
                WireError::TooLong(n) => {
                    assert!(n > MAX_MESSAGE);
                    assert_eq!(n.to_le_bytes(), b[0..4]);
                }
                WireError::Malformed { kind, why } => {
                    assert_eq!(kind as u8, b[4]);
                    assert!(!why.is_empty());
                }
            }
            assert!(!e.to_string().is_empty());
        }
    }
    r
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let (hb, tail) = rest.split_at(HEADER_LEN);
        let mut b = [0u8; HEADER_LEN];
        b.copy_from_slice(hb);
        let Ok(h) = check(&b) else {
            // The endpoint drops the connection here.
            return;
        };
        // The payload follows; a short stream just ends mid-payload.
        let n = usize::try_from(h.payload_len).map_or(tail.len(), |n| n.min(tail.len()));
        rest = &tail[n..];
    }
});
