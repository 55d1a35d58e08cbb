//! Control messages between the suite's initiator and target, carried by
//! SEND/RECV in 64-byte buffers.

use crate::api::RemoteRegion;

/// Size of every control message in bytes.
pub const MSG: usize = 64;

/// Initiator to target: send me your regions (answered with `REGIONS`).
pub const HELLO: u32 = 1;
/// Initiator to target: the next WRITE_WITH_IMM is described by an
/// [`Expect`] (answered with `IMM_RESULT` when the immediate arrives).
pub const EXPECT: u32 = 2;
/// Initiator to target: send this message back (as `ECHO_REPLY`).
pub const ECHO: u32 = 3;
/// Die without a graceful close (two processes: exit the process).
pub const DIE: u32 = 4;
/// Stop the target.
pub const QUIT: u32 = 5;
/// Initiator to target: register a fresh read-write region (answered with
/// `TEMP_REGION`).
pub const TEMP: u32 = 6;
/// Initiator to target: deregister that region, then report the checksum
/// of its memory (answered with `TEMP_SUM`).
pub const TEMP_DROP: u32 = 7;
/// Initiator to target: report the checksum of the dropped region's
/// memory now (answered with `TEMP_SUM`).
pub const TEMP_CHECK: u32 = 8;
/// Target to initiator: the read-write and read-only [`RemoteRegion`]s.
pub const REGIONS: u32 = 101;
/// Target to initiator, for every WRITE_WITH_IMM it receives: u32 at 4 is 1
/// if it matched the pending [`Expect`] (immediate and data), u32 at 8 is
/// the immediate seen.
pub const IMM_RESULT: u32 = 102;
/// Target to initiator: the `ECHO` message, returned.
pub const ECHO_REPLY: u32 = 103;
/// Target to initiator: the `TEMP` region, a [`RemoteRegion`] at byte 4.
pub const TEMP_REGION: u32 = 106;
/// Target to initiator: u64 at 8 is the checksum of the `TEMP` memory.
pub const TEMP_SUM: u32 = 107;
/// Target to initiator: `QUIT` received, the target stops.
pub const QUIT_ACK: u32 = 105;

/// One control message: the op code (u32) in bytes 0..4, then its fields.
pub type Msg = [u8; MSG];

/// The op code of `m`.
pub fn op(m: &Msg) -> u32 {
    u32::from_le_bytes([m[0], m[1], m[2], m[3]])
}

/// A zeroed message with op code `op`.
pub fn new(op: u32) -> Msg {
    let mut m = [0u8; MSG];
    m[0..4].copy_from_slice(&op.to_le_bytes());
    m
}

/// Stores `v` little-endian at byte `at`.
pub fn put_u32(m: &mut Msg, at: usize, v: u32) {
    m[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Stores `v` little-endian at byte `at`.
pub fn put_u64(m: &mut Msg, at: usize, v: u64) {
    m[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Loads a little-endian u32 at byte `at`.
pub fn get_u32(m: &Msg, at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&m[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Loads a little-endian u64 at byte `at`.
pub fn get_u64(m: &Msg, at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&m[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A `REGIONS` message carrying `rw` and `ro`.
pub fn regions(rw: RemoteRegion, ro: RemoteRegion) -> Msg {
    let mut m = new(REGIONS);
    m[4..24].copy_from_slice(&rw.to_bytes());
    m[24..44].copy_from_slice(&ro.to_bytes());
    m
}

/// An expected WRITE_WITH_IMM: the immediate, and two ranges of the target's
/// read-write region (offset, length, checksum) that must hold the written
/// data by the time the immediate is seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The immediate the WRITE_WITH_IMM carries.
    pub imm: u32,
    /// `(offset, length, checksum)` of each range, in bytes.
    pub ranges: [(u64, u64, u64); 2],
}

/// An `EXPECT` message carrying `e`.
pub fn expect(e: &Expect) -> Msg {
    let mut m = new(EXPECT);
    put_u32(&mut m, 4, e.imm);
    for (i, (off, len, sum)) in e.ranges.iter().enumerate() {
        put_u64(&mut m, 8 + i * 24, *off);
        put_u64(&mut m, 16 + i * 24, *len);
        put_u64(&mut m, 24 + i * 24, *sum);
    }
    m
}

/// The [`Expect`] inside an `EXPECT` message.
pub fn parse_expect(m: &Msg) -> Expect {
    let r = |i: usize| {
        (
            get_u64(m, 8 + i * 24),
            get_u64(m, 16 + i * 24),
            get_u64(m, 24 + i * 24),
        )
    };
    Expect {
        imm: get_u32(m, 4),
        ranges: [r(0), r(1)],
    }
}
