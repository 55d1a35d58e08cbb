//! The soft fabric's wire format: every frame is a fixed 24-byte
//! little-endian header, followed by `payload_len` bytes of payload.
//!
//! ```text
//! 0  u32 payload_len   bytes after the header (<= MAX_MESSAGE)
//! 4  u8  kind          Kind
//! 5  u8  status        Status (responses only; 0 in requests)
//! 6  u16 reserved      0
//! 8  u64 addr          remote address (READ/WRITE/WRITE_IMM), MAGIC (HELLO)
//! 16 u32 rkey          remote key (READ/WRITE/WRITE_IMM)
//! 20 u32 aux           READ: length; WRITE_IMM: immediate; HELLO: version
//! ```
//!
//! Every field a peer sends is checked by [`Header::decode`] before use; the
//! per-request checks against registered memory happen in the endpoint.

/// Size of every frame header.
pub const HEADER_LEN: usize = 24;
/// "VRIOSOF1": the HELLO frame's `addr`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VRIOSOF1");
/// Protocol version, carried in the HELLO frame's `aux`.
pub const VERSION: u32 = 1;
/// Largest message (verbs allows 2 GiB; 1 GiB keeps `u32` arithmetic easy).
pub const MAX_MESSAGE: u32 = 1 << 30;

/// The frame type (the header's `kind` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake: `addr` is [`MAGIC`], `aux` is [`VERSION`].
    Hello = 1,
    /// Request: read `aux` bytes at `addr` in region `rkey`; no payload.
    Read = 2,
    /// Request: write the payload at `addr` in region `rkey`.
    Write = 3,
    /// Request: like `Write`, then consume a receive carrying the
    /// immediate `aux`.
    WriteImm = 4,
    /// Request: the payload goes into the peer's oldest posted receive.
    Send = 5,
    /// Response to a `Read`: the data, or an error status and no payload.
    ReadResp = 6,
    /// Response to any other request; no payload.
    Ack = 7,
}

/// Outcome carried by a response (the header's `status` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Done (always this in requests).
    Ok = 0,
    /// Bad rkey, out of bounds, or missing remote permission.
    RemoteAccess = 1,
    /// The responder could not complete it (receive too small or invalid).
    RemoteOp = 2,
    /// No receive was posted within the RNR wait.
    Rnr = 3,
}

/// One decoded frame header; see the module docs for the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame type.
    pub kind: Kind,
    /// The response status ([`Status::Ok`] in requests).
    pub status: Status,
    /// Bytes of payload after the header (at most [`MAX_MESSAGE`]).
    pub payload_len: u32,
    /// Remote address (READ, WRITE, WRITE_IMM) or [`MAGIC`] (HELLO).
    pub addr: u64,
    /// Remote key (READ, WRITE, WRITE_IMM).
    pub rkey: u32,
    /// READ: length in bytes; WRITE_IMM: the immediate; HELLO: the version.
    pub aux: u32,
}

/// Why [`Header::decode`] rejected a header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The `kind` byte is not a [`Kind`].
    #[error("unknown frame kind {0}")]
    Kind(u8),
    /// The `status` byte is not a [`Status`].
    #[error("unknown status {0}")]
    Status(u8),
    /// The reserved field is not zero.
    #[error("reserved field is {0:#x}, not 0")]
    Reserved(u16),
    /// `payload_len` is over [`MAX_MESSAGE`].
    #[error("payload of {0} bytes exceeds the {MAX_MESSAGE} byte limit")]
    TooLong(u32),
    /// A field does not fit the frame's kind (e.g. a READ with a payload).
    #[error("malformed {kind:?} frame: {why}")]
    Malformed {
        /// The frame's kind.
        kind: Kind,
        /// Which rule it broke.
        why: &'static str,
    },
}

impl Header {
    /// A request header (status [`Status::Ok`]).
    pub fn request(kind: Kind, payload_len: u32, addr: u64, rkey: u32, aux: u32) -> Self {
        Self {
            kind,
            status: Status::Ok,
            payload_len,
            addr,
            rkey,
            aux,
        }
    }

    /// A response header (`addr`, `rkey` and `aux` zero).
    pub fn response(kind: Kind, status: Status, payload_len: u32) -> Self {
        Self {
            kind,
            status,
            payload_len,
            addr: 0,
            rkey: 0,
            aux: 0,
        }
    }

    /// This side's handshake frame.
    pub fn hello() -> Self {
        Self::request(Kind::Hello, 0, MAGIC, 0, VERSION)
    }

    /// The header's 24 wire bytes. Does not validate; see [`Header::decode`].
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.payload_len.to_le_bytes());
        b[4] = self.kind as u8;
        b[5] = self.status as u8;
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b[20..24].copy_from_slice(&self.aux.to_le_bytes());
        b
    }

    /// Parses and validates one header.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[8..16]);
        let kind = match b[4] {
            1 => Kind::Hello,
            2 => Kind::Read,
            3 => Kind::Write,
            4 => Kind::WriteImm,
            5 => Kind::Send,
            6 => Kind::ReadResp,
            7 => Kind::Ack,
            k => return Err(WireError::Kind(k)),
        };
        let status = match b[5] {
            0 => Status::Ok,
            1 => Status::RemoteAccess,
            2 => Status::RemoteOp,
            3 => Status::Rnr,
            s => return Err(WireError::Status(s)),
        };
        let reserved = u16::from_le_bytes([b[6], b[7]]);
        if reserved != 0 {
            return Err(WireError::Reserved(reserved));
        }
        let h = Header {
            kind,
            status,
            payload_len: u32_at(0),
            addr: u64::from_le_bytes(a),
            rkey: u32_at(16),
            aux: u32_at(20),
        };
        if h.payload_len > MAX_MESSAGE {
            return Err(WireError::TooLong(h.payload_len));
        }
        h.validate()?;
        Ok(h)
    }

    fn validate(&self) -> Result<(), WireError> {
        let bad = |why| {
            Err(WireError::Malformed {
                kind: self.kind,
                why,
            })
        };
        let is_request = matches!(
            self.kind,
            Kind::Hello | Kind::Read | Kind::Write | Kind::WriteImm | Kind::Send
        );
        if is_request && self.status != Status::Ok {
            return bad("request with a status");
        }
        match self.kind {
            Kind::Hello => {
                if self.addr != MAGIC || self.payload_len != 0 || self.rkey != 0 {
                    return bad("not a vrio soft fabric hello");
                }
                if self.aux != VERSION {
                    return bad("unsupported protocol version");
                }
            }
            Kind::Read => {
                if self.payload_len != 0 {
                    return bad("READ request carries a payload");
                }
                if self.aux > MAX_MESSAGE {
                    return bad("READ length over the limit");
                }
            }
            Kind::Write | Kind::WriteImm => {
                if self.kind == Kind::Write && self.aux != 0 {
                    return bad("WRITE with an immediate");
                }
            }
            Kind::Send => {
                if self.addr != 0 || self.rkey != 0 || self.aux != 0 {
                    return bad("SEND with remote fields");
                }
            }
            Kind::ReadResp | Kind::Ack => {
                if self.addr != 0 || self.rkey != 0 || self.aux != 0 {
                    return bad("response with request fields");
                }
                if (self.kind == Kind::Ack || self.status != Status::Ok) && self.payload_len != 0 {
                    return bad("ACK or error response carries a payload");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header::request(Kind::WriteImm, 4096, 0x1000, 7, 99);
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let r = Header::response(Kind::ReadResp, Status::Ok, 64);
        assert_eq!(Header::decode(&r.encode()), Ok(r));
        assert_eq!(
            Header::decode(&Header::hello().encode()),
            Ok(Header::hello())
        );
    }

    #[test]
    fn rejects_malformed_fields() {
        let good = Header::request(Kind::Read, 0, 0x1000, 7, 64).encode();
        let mut b = good;
        b[4] = 0;
        assert_eq!(Header::decode(&b), Err(WireError::Kind(0)));
        let mut b = good;
        b[4] = 200;
        assert_eq!(Header::decode(&b), Err(WireError::Kind(200)));
        let mut b = good;
        b[5] = 9;
        assert_eq!(Header::decode(&b), Err(WireError::Status(9)));
        let mut b = good;
        b[6] = 1;
        assert_eq!(Header::decode(&b), Err(WireError::Reserved(1)));
        let mut b = good;
        b[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Header::decode(&b), Err(WireError::TooLong(u32::MAX)));
        // A READ request with a payload, or with a length over the limit.
        let mut b = good;
        b[0] = 1;
        assert!(matches!(
            Header::decode(&b),
            Err(WireError::Malformed { .. })
        ));
        let mut b = good;
        b[20..24].copy_from_slice(&(MAX_MESSAGE + 1).to_le_bytes());
        assert!(matches!(
            Header::decode(&b),
            Err(WireError::Malformed { .. })
        ));
        // A request carrying a status.
        let mut b = good;
        b[5] = 1;
        assert!(matches!(
            Header::decode(&b),
            Err(WireError::Malformed { .. })
        ));
        // An error response or ACK with a payload.
        let mut r = Header::response(Kind::ReadResp, Status::RemoteAccess, 0).encode();
        r[0] = 5;
        assert!(matches!(
            Header::decode(&r),
            Err(WireError::Malformed { .. })
        ));
        let mut a = Header::response(Kind::Ack, Status::Ok, 0).encode();
        a[0] = 5;
        assert!(matches!(
            Header::decode(&a),
            Err(WireError::Malformed { .. })
        ));
        // A hello with the wrong magic or version.
        let mut h = Header::hello().encode();
        h[8] ^= 1;
        assert!(matches!(
            Header::decode(&h),
            Err(WireError::Malformed { .. })
        ));
        let mut h = Header::hello().encode();
        h[20] = 2;
        assert!(matches!(
            Header::decode(&h),
            Err(WireError::Malformed { .. })
        ));
        // SEND naming remote memory.
        let s = Header::request(Kind::Send, 8, 0x1000, 0, 0).encode();
        assert!(matches!(
            Header::decode(&s),
            Err(WireError::Malformed { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform24(proptest::num::u8::ANY)) {
            if let Ok(h) = Header::decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes.
                proptest::prop_assert_eq!(h.encode(), bytes);
            }
        }
    }
}
