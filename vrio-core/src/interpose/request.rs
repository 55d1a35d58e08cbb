//! What a stage sees of one request, and what it may answer.

use std::net::Ipv4Addr;
use std::time::Instant;

/// The kind of a request, as stages tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// virtio-blk IN: data from the disk to the guest.
    Read,
    /// virtio-blk OUT: data from the guest to the disk.
    Write,
    /// virtio-blk FLUSH.
    Flush,
    /// virtio-blk DISCARD.
    Discard,
    /// virtio-blk WRITE_ZEROES.
    WriteZeroes,
    /// Any other virtio-blk request (GET_ID, unknown types).
    Other,
    /// A frame a guest sends into the switch (virtio-net TX).
    Transmit,
}

impl Op {
    /// The op's name in policies, metrics and `vrio-ctl`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::Other => "other",
            Op::Transmit => "transmit",
        }
    }

    /// Every op, in a fixed order (for counters indexed by op).
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::Other,
        Op::Transmit,
    ];

    /// The op's index in [`Op::ALL`].
    pub fn index(self) -> usize {
        match self {
            Op::Read => 0,
            Op::Write => 1,
            Op::Flush => 2,
            Op::Discard => 3,
            Op::WriteZeroes => 4,
            Op::Other => 5,
            Op::Transmit => 6,
        }
    }

    /// From a virtio-blk request type (`VIRTIO_BLK_T_*`).
    pub fn from_blk_type(t: u32) -> Op {
        use virtio_bindings::virtio_blk::*;
        match t {
            VIRTIO_BLK_T_IN => Op::Read,
            VIRTIO_BLK_T_OUT => Op::Write,
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_DISCARD => Op::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other,
        }
    }
}

/// The addresses a net stage filters on, read from a TX frame's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// Ethernet source address.
    pub src_mac: [u8; 6],
    /// IPv4 source address, when the frame is IPv4 (ARP's sender address
    /// counts too, so an ACL on addresses cannot be dodged with ARP).
    pub src_ipv4: Option<Ipv4Addr>,
}

/// One request as the stages see it. Built by the device model from the
/// request's header before anything runs; guest-controlled, so stages
/// treat every field as untrusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The device's id at the server (`dev<id>` in queue names).
    pub device: u64,
    /// What the request does.
    pub op: Op,
    /// First 512-byte sector (blk); 0 for frames.
    pub sector: u64,
    /// Data bytes: what is read or written (blk), the frame's length (net).
    pub len: u64,
    /// For TX frames: their addresses (None for blk, or a frame too short
    /// to have them).
    pub frame: Option<FrameInfo>,
    /// When the server learnt of the request (its batch's intake).
    pub arrived: Instant,
    /// The VM host the request came from: `proto::device_key` of the host
    /// part of its agent's address (0 when unknown). vrio's data path has
    /// no other VM identity: a device belongs to one VM, and the device
    /// id says which.
    pub vm_host: u64,
}

/// Why a stage refused a request: the virtio status the guest gets and a
/// reason for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP` for blk; net TX
    /// frames are dropped, and this is ignored.
    pub status: u8,
    /// Short, stable, snake_case: a metric label (`acl_mac`, `fault`).
    pub reason: &'static str,
}

impl Refusal {
    /// An I/O error with `reason`.
    pub fn ioerr(reason: &'static str) -> Self {
        Self {
            status: virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8,
            reason,
        }
    }
}

/// A stage's answer before a request runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run it (as far as this stage is concerned).
    Go,
    /// Not before this time: the queue holds the request (and the rest of
    /// its batch) and asks again then. Never a drop.
    Wait(Instant),
    /// Complete it now with this status, without running it.
    Refuse(Refusal),
}
