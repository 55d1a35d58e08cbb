//! `proto::wire::Message::decode` on any bytes a peer (agent or I/O
//! server) can SEND: it must never panic, refuses oversized input, and
//! whatever decodes re-encodes to a message that decodes to the same value
//! (decode(encode(m)) == m), from exactly the bytes decode consumed.
//!
//! Input: one message, as received.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vrio_core::proto::wire::{DeviceKind, Message, WireError, MAGIC, MAX_MSG, VERSION};

fuzz_target!(|data: &[u8]| {
    let m = match Message::decode(data) {
        Ok(m) => m,
        Err(e) => {
            if data.len() > MAX_MSG {
                assert_eq!(e, WireError::TooLarge);
            }
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert!(data.len() <= MAX_MSG);
    assert_eq!(data[..4], MAGIC.to_le_bytes());
    assert_eq!(data[4..6], VERSION.to_le_bytes());
    if let Message::AttachDevice(d) = &m {
        if let DeviceKind::Net { mac } = d.device {
            assert!(!mac.is_multicast(), "a multicast port MAC was accepted");
        }
    }
    let mut out = Vec::new();
    m.encode(&mut out).expect("a decoded message re-encodes");
    // Field for field: the encoding is no longer than what was decoded,
    // and only unknown feature bits or a non-1 `poll` byte may differ.
    assert!(out.len() <= data.len(), "re-encoding grew the message");
    assert_eq!(out[..8], data[..8], "header or kind changed");
    assert_eq!(Message::decode(&out).as_ref(), Ok(&m), "round trip");
    // decode consumed exactly out.len() bytes: that prefix decodes to the
    // same message, and one byte less is refused.
    assert_eq!(Message::decode(&data[..out.len()]).as_ref(), Ok(&m));
    assert!(Message::decode(&out[..out.len() - 1]).is_err());
});
