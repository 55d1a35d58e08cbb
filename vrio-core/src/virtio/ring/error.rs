//! Typed errors for hostile or broken rings. Each validation rule has its own
//! variant, so that tests (and operators reading logs) can tell them apart.

use crate::virtio::memory::MemoryError;

/// Why one descriptor chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The avail ring names a head past the descriptor table.
    #[error("head index {head} is not below the queue size {size}")]
    HeadOutOfRange {
        /// The head the avail ring named.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor's `next` lies past its table (the ring's, or an
    /// indirect table's).
    #[error("descriptor {index} points to next {next}, past the table of {table_len}")]
    NextOutOfRange {
        /// The descriptor whose `next` is bad.
        index: u16,
        /// Its `next` field.
        next: u16,
        /// Entries in the table walked.
        table_len: u32,
    },
    /// The chain visits a descriptor twice.
    #[error("chain loops back to descriptor {index}")]
    Loop {
        /// The descriptor seen again.
        index: u16,
    },
    /// The chain, indirect entries included, is longer than the queue size
    /// (§2.7.5.3.1).
    #[error("chain has more than {limit} descriptors (the queue size)")]
    TooLong {
        /// The queue size.
        limit: u16,
    },
    /// VIRTQ_DESC_F_INDIRECT used without VIRTIO_RING_F_INDIRECT_DESC.
    #[error("indirect descriptor used but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    /// An indirect table holds an INDIRECT descriptor (§2.7.5.3.1).
    #[error("indirect table inside an indirect table")]
    NestedIndirect,
    /// A descriptor sets both INDIRECT and NEXT (§2.7.5.3.1).
    #[error("descriptor has both INDIRECT and NEXT set")]
    IndirectWithNext,
    /// An indirect table's byte length is not a whole, non-zero number of
    /// descriptors.
    #[error("indirect table length {len} is zero or not a multiple of 16")]
    IndirectBadLength {
        /// The table descriptor's `len`.
        len: u32,
    },
    /// An indirect table has more entries than the queue size.
    #[error("indirect table of {entries} entries exceeds the queue size {limit}")]
    IndirectTooLarge {
        /// Entries in the table.
        entries: u32,
        /// The queue size.
        limit: u16,
    },
    /// A device-readable descriptor follows a device-writable one
    /// (§2.7.4.2: readable ones come first).
    #[error("device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor's buffer is not inside the guest's memory map.
    #[error("buffer {addr:#x}+{len:#x}: {source}")]
    BadBuffer {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
        /// Why the memory map refused it.
        #[source]
        source: MemoryError,
    },
    /// An indirect table lies outside guest memory or could not be read;
    /// with [`MemoryError::NotPresent`] it only needs fetching
    /// ([`ChainError::needs_fetch`]).
    #[error("indirect table {addr:#x}+{len:#x}: {source}")]
    BadIndirectTable {
        /// Guest address of the table.
        addr: u64,
        /// Its length in bytes.
        len: u32,
        /// Why it could not be read.
        #[source]
        source: MemoryError,
    },
    /// A descriptor of the ring's table could not be read (with
    /// [`MemoryError::NotPresent`], it only needs fetching).
    #[error("reading the descriptor table: {0}")]
    Memory(#[source] MemoryError),
}

impl ChainError {
    /// The range `(addr, len)` to fetch when the walk stopped only because
    /// it is not present yet (remote shadows); the chain itself may be fine.
    /// `None` for a real rule violation.
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
    /// [`RingLayout::new`](super::RingLayout::new): the size is not a power
    /// of two in 1..=32768 (§2.7).
    #[error("queue size {0} is not a power of two in 1..=32768")]
    InvalidSize(u16),
    /// [`RingLayout::new`](super::RingLayout::new): a part breaks the
    /// alignment of §2.7 (table 16, avail 2, used 4) or wraps the address
    /// space.
    #[error("ring parts misaligned or wrapping: desc {desc:#x}, avail {avail:#x}, used {used:#x}")]
    Misaligned {
        /// Descriptor table address.
        desc: u64,
        /// Avail ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
    },
    /// [`DeviceQueue::new`](super::DeviceQueue::new): a ring part is not
    /// inside the guest's memory map.
    #[error("ring lies outside the guest's memory: {0}")]
    RingOutOfBounds(#[source] MemoryError),
    /// avail.idx moved more than the queue size past the device's position.
    #[error("avail index jumped from {last} to {idx}, more than the queue size {size}")]
    AvailIndexJump {
        /// The device's next avail position.
        last: u16,
        /// The avail.idx read (or announced).
        idx: u16,
        /// The queue size.
        size: u16,
    },
    /// One chain was refused; the request fails but the queue goes on
    /// (unless the chain only needs fetching: [`ChainError::needs_fetch`]).
    #[error("chain at head {head}: {source}")]
    BadChain {
        /// The chain's head.
        head: u16,
        /// The rule it broke.
        #[source]
        source: ChainError,
    },
    /// A used element names an id that is not an outstanding head. Nothing
    /// in vrio-core raises it today (the driver side reports
    /// [`DriverError::BadUsedId`](super::DriverError::BadUsedId)).
    #[error("used element id {id} is not an outstanding head")]
    BadUsedId {
        /// The id in the used element.
        id: u32,
    },
    /// Reading or writing the rings failed.
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
