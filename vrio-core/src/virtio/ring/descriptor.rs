//! One descriptor table entry (§2.7.5) and the segments a chain yields.

use super::layout::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

/// `struct virtq_desc`, decoded from little-endian bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest address of the buffer (or of an indirect table).
    pub addr: u64,
    /// Buffer length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` bits.
    pub flags: u16,
    /// The next descriptor, when NEXT is set.
    pub next: u16,
}

impl Descriptor {
    /// Decodes the 16 table bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[0..8]);
        Self {
            addr: u64::from_le_bytes(a),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }

    /// Encodes the 16 table bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// VRING_DESC_F_NEXT: the chain continues at `next`.
    pub fn has_next(&self) -> bool {
        self.flags & VRING_DESC_F_NEXT != 0
    }
    /// VRING_DESC_F_WRITE: the device writes this buffer.
    pub fn is_write_only(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE != 0
    }
    /// VRING_DESC_F_INDIRECT: the buffer is a table of descriptors.
    pub fn is_indirect(&self) -> bool {
        self.flags & VRING_DESC_F_INDIRECT != 0
    }
}

/// A validated guest buffer: `len` bytes at guest address `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A validated descriptor chain: every segment lies inside the guest's
/// memory map, and the device-readable ones come first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescriptorChain {
    /// The head index, returned in the used element.
    pub head: u16,
    /// Device-readable buffers, in chain order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in chain order.
    pub writable: Vec<Segment>,
    /// Descriptors visited, indirect table entries included.
    pub descriptors: u16,
    /// Whether the chain went through an indirect table.
    pub indirect: bool,
}

impl DescriptorChain {
    /// Empties the chain, keeping its allocations for the next walk.
    pub fn clear(&mut self) {
        self.head = 0;
        self.readable.clear();
        self.writable.clear();
        self.descriptors = 0;
        self.indirect = false;
    }
    /// Total bytes of the readable segments.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }
    /// Total bytes of the writable segments.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_little_endian() {
        let d = Descriptor {
            addr: 0x0102_0304_0506_0708,
            len: 0x0a0b_0c0d,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: 0x1234,
        };
        let b = d.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 0x0d);
        assert_eq!(b[14], 0x34);
        assert_eq!(Descriptor::from_bytes(&b), d);
        assert!(d.has_next() && d.is_write_only() && !d.is_indirect());
    }
}
