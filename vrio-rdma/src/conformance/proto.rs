//! Control messages between the suite's initiator and target, carried by
//! SEND/RECV in 64-byte buffers.

use crate::api::RemoteRegion;

pub const MSG: usize = 64;

pub const HELLO: u32 = 1;
pub const EXPECT: u32 = 2;
pub const ECHO: u32 = 3;
/// Die without a graceful close (two processes: exit the process).
pub const DIE: u32 = 4;
/// Stop the target.
pub const QUIT: u32 = 5;
pub const REGIONS: u32 = 101;
pub const IMM_RESULT: u32 = 102;
pub const ECHO_REPLY: u32 = 103;
pub const QUIT_ACK: u32 = 105;

pub type Msg = [u8; MSG];

pub fn op(m: &Msg) -> u32 {
    u32::from_le_bytes([m[0], m[1], m[2], m[3]])
}

pub fn new(op: u32) -> Msg {
    let mut m = [0u8; MSG];
    m[0..4].copy_from_slice(&op.to_le_bytes());
    m
}

pub fn put_u32(m: &mut Msg, at: usize, v: u32) {
    m[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn put_u64(m: &mut Msg, at: usize, v: u64) {
    m[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

pub fn get_u32(m: &Msg, at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&m[at..at + 4]);
    u32::from_le_bytes(a)
}

pub fn get_u64(m: &Msg, at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&m[at..at + 8]);
    u64::from_le_bytes(a)
}

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
    pub imm: u32,
    pub ranges: [(u64, u64, u64); 2],
}

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
