//! Why a virtio-blk request failed, and which status byte that means.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

use crate::virtio::memory::MemoryError;

/// The status byte written at the end of a request (§5.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    pub(crate) fn byte(self) -> u8 {
        (match self {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// A chain that cannot carry a virtio-blk request at all: no status can be
/// reported, so the caller completes it with used length 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlkError {
    /// The readable part is shorter than `struct virtio_blk_outhdr`.
    #[error("request has {len} device-readable bytes, less than the 16-byte header")]
    HeaderTooShort {
        /// Device-readable bytes in the chain.
        len: u64,
    },
    /// The chain has no non-empty writable descriptor to hold the status.
    #[error("request has no device-writable byte for the status")]
    NoStatusByte,
    /// Reading the header or writing the status byte failed.
    #[error("guest memory access for the header or status failed: {0}")]
    Memory(#[from] MemoryError),
}

/// A request that was parsed but failed; the guest sees [`Self::status`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("write-type request on a read-only device")]
    ReadOnly,
    #[error("data length {len} is not a multiple of 512")]
    Unaligned { len: u64 },
    #[error("data length {len} exceeds the per-request limit {limit}")]
    TooLarge { len: u64, limit: u64 },
    #[error("sectors {sector}+{len} bytes are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("discard/write-zeroes payload of {len} bytes is empty or not a multiple of 16")]
    BadSegmentPayload { len: u64 },
    #[error("{count} discard/write-zeroes segments exceed the maximum {max}")]
    TooManySegments { count: u64, max: u32 },
    #[error("segment of {num_sectors} sectors exceeds the maximum {max}")]
    SegmentTooLarge { num_sectors: u32, max: u32 },
    #[error("discard/write-zeroes flags {flags:#x} are not supported")]
    UnsupportedFlags { flags: u32 },
    #[error("backend I/O failed: {0}")]
    Backend(#[from] std::io::Error),
    #[error("guest memory access for request data failed: {0}")]
    Memory(#[from] MemoryError),
    #[error("refused by the device's {} policy", .0.reason)]
    Refused(crate::interpose::Refusal),
}

impl RequestError {
    /// The status byte the spec asks for.
    pub(crate) fn status(&self) -> Status {
        match self {
            RequestError::UnsupportedType(_)
            | RequestError::ReadOnly
            | RequestError::UnsupportedFlags { .. } => Status::Unsupp,
            RequestError::Refused(r) if u32::from(r.status) == VIRTIO_BLK_S_UNSUPP => {
                Status::Unsupp
            }
            _ => Status::IoErr,
        }
    }
}
