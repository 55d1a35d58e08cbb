//! Typed errors for hostile or broken rings. Each validation rule has its own
//! variant, so that tests (and operators reading logs) can tell them apart.

use crate::virtio::memory::MemoryError;

/// Why one descriptor chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("head index {head} is not below the queue size {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("descriptor {index} points to next {next}, past the table of {table_len}")]
    NextOutOfRange {
        index: u16,
        next: u16,
        table_len: u32,
    },
    #[error("chain loops back to descriptor {index}")]
    Loop { index: u16 },
    #[error("chain has more than {limit} descriptors (the queue size)")]
    TooLong { limit: u16 },
    #[error("indirect descriptor used but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    #[error("indirect table inside an indirect table")]
    NestedIndirect,
    #[error("descriptor has both INDIRECT and NEXT set")]
    IndirectWithNext,
    #[error("indirect table length {len} is zero or not a multiple of 16")]
    IndirectBadLength { len: u32 },
    #[error("indirect table of {entries} entries exceeds the queue size {limit}")]
    IndirectTooLarge { entries: u32, limit: u16 },
    #[error("device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("buffer {addr:#x}+{len:#x}: {source}")]
    BadBuffer {
        addr: u64,
        len: u32,
        #[source]
        source: MemoryError,
    },
    #[error("indirect table {addr:#x}+{len:#x}: {source}")]
    BadIndirectTable {
        addr: u64,
        len: u32,
        #[source]
        source: MemoryError,
    },
    #[error("reading the descriptor table: {0}")]
    Memory(#[source] MemoryError),
}

impl ChainError {
    /// True when the walk stopped only because a range must be fetched first
    /// (remote shadows); the chain itself may be fine.
    pub fn needs_fetch(&self) -> Option<(u64, u64)> {
        match self {
            ChainError::Memory(MemoryError::NotPresent { addr, len })
            | ChainError::BadIndirectTable {
                source: MemoryError::NotPresent { addr, len },
                ..
            } => Some((*addr, *len)),
            _ => None,
        }
    }
}

/// Errors for a whole queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    InvalidSize(u16),
    #[error("ring parts misaligned or wrapping: desc {desc:#x}, avail {avail:#x}, used {used:#x}")]
    Misaligned { desc: u64, avail: u64, used: u64 },
    #[error("ring lies outside the guest's memory: {0}")]
    RingOutOfBounds(#[source] MemoryError),
    #[error("avail index jumped from {last} to {idx}, more than the queue size {size}")]
    AvailIndexJump { last: u16, idx: u16, size: u16 },
    #[error("chain at head {head}: {source}")]
    BadChain {
        head: u16,
        #[source]
        source: ChainError,
    },
    #[error("used element id {id} is not an outstanding head")]
    BadUsedId { id: u32 },
    #[error("ring memory: {0}")]
    Memory(#[from] MemoryError),
}

impl QueueError {
    /// A queue-level failure after which the device must be reset (§2.1.2
    /// DEVICE_NEEDS_RESET), as opposed to one bad request.
    pub fn needs_reset(&self) -> bool {
        !matches!(self, QueueError::BadChain { .. })
    }
}
