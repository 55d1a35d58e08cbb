//! Split virtqueue layout (virtio 1.2 §2.7).
//!
//! Offsets are written out next to the spec's structures so they can be
//! checked line by line:
//!
//! ```text
//! struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; }       // 16 bytes
//! struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; }
//! struct virtq_used  { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[N]; le16 avail_event; }
//! ```

use virtio_bindings::virtio_ring;

use super::QueueError;

/// §2.7.5: this marks a buffer as continuing via the next field.
pub const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
/// §2.7.5: this marks a buffer as device write-only (otherwise device read-only).
pub const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
/// §2.7.5.3: the buffer contains a list of buffer descriptors.
pub const VRING_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// §2.7.10: the device asks the driver not to kick.
pub const VRING_USED_F_NO_NOTIFY: u16 = virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
/// §2.7.7: the driver asks the device not to interrupt.
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;

/// Feature bit number (§6): indirect descriptors (§2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit number (§6): used_event / avail_event suppression (§2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// Feature bit number (§6): a virtio 1.x device, not legacy.
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Size of one descriptor (§2.7.5).
pub const DESC_SIZE: u64 = 16;
/// Size of one used element (§2.7.8).
pub const USED_ELEM_SIZE: u64 = 8;
/// §2.7: Queue Size is a power of 2 no larger than 32768.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Where a split ring's three parts live in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Queue size: entries in each part.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the avail ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
}

impl RingLayout {
    /// Validates size and the alignments of §2.7 (table 16, avail 2, used 4).
    pub fn new(size: u16, desc: u64, avail: u64, used: u64) -> Result<Self, QueueError> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(QueueError::InvalidSize(size));
        }
        if desc % 16 != 0 || avail % 2 != 0 || used % 4 != 0 {
            return Err(QueueError::Misaligned { desc, avail, used });
        }
        let l = Self {
            size,
            desc,
            avail,
            used,
        };
        for (a, n) in [
            (desc, l.desc_table_bytes()),
            (avail, l.avail_bytes()),
            (used, l.used_bytes()),
        ] {
            if a.checked_add(n).is_none() {
                return Err(QueueError::Misaligned { desc, avail, used });
            }
        }
        Ok(l)
    }

    /// A compact layout starting at `base`: table, avail, then used at the
    /// next 4-byte boundary. Returns the layout and the bytes it occupies.
    pub fn packed(size: u16, base: u64) -> Result<(Self, u64), QueueError> {
        let desc = base;
        let avail = desc + DESC_SIZE * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let l = Self::new(size, desc, avail, used)?;
        Ok((l, used + l.used_bytes() - base))
    }

    /// Bytes of the descriptor table.
    pub fn desc_table_bytes(&self) -> u64 {
        DESC_SIZE * u64::from(self.size)
    }
    /// avail ring including `used_event`.
    pub fn avail_bytes(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }
    /// used ring including `avail_event`.
    pub fn used_bytes(&self) -> u64 {
        6 + USED_ELEM_SIZE * u64::from(self.size)
    }

    /// Address of descriptor `index`.
    pub fn desc_addr(&self, index: u16) -> u64 {
        self.desc + DESC_SIZE * u64::from(index)
    }
    /// `avail.flags`.
    pub fn avail_flags(&self) -> u64 {
        self.avail
    }
    /// `avail.idx`.
    pub fn avail_idx(&self) -> u64 {
        self.avail + 2
    }
    /// `avail.ring[idx % size]`.
    pub fn avail_ring(&self, idx: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(idx % self.size)
    }
    /// `avail.used_event` (only with VIRTIO_RING_F_EVENT_IDX).
    pub fn used_event(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }
    /// `used.flags`.
    pub fn used_flags(&self) -> u64 {
        self.used
    }
    /// `used.idx`.
    pub fn used_idx(&self) -> u64 {
        self.used + 2
    }
    /// `used.ring[idx % size]`.
    pub fn used_ring(&self, idx: u16) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * u64::from(idx % self.size)
    }
    /// `used.avail_event` (only with VIRTIO_RING_F_EVENT_IDX).
    pub fn avail_event(&self) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * u64::from(self.size)
    }
}

/// §2.7.10: `vring_need_event`, true when the index moved from `old` to
/// `new` past `event`, i.e. `event` lies in `[old, new)`.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Ring features negotiated for one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingFeatures {
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub indirect: bool,
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

impl RingFeatures {
    /// The ring features among negotiated feature bits.
    pub fn from_bits(features: u64) -> Self {
        Self {
            indirect: features & (1 << VIRTIO_RING_F_INDIRECT_DESC) != 0,
            event_idx: features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
        }
    }
    /// These features as feature bits.
    pub fn bits(&self) -> u64 {
        (u64::from(self.indirect) << VIRTIO_RING_F_INDIRECT_DESC)
            | (u64::from(self.event_idx) << VIRTIO_RING_F_EVENT_IDX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_spec() {
        let l = RingLayout::new(256, 0x1000, 0x2000, 0x3000).unwrap();
        assert_eq!(l.desc_addr(3), 0x1000 + 48);
        assert_eq!(l.avail_idx(), 0x2002);
        assert_eq!(l.avail_ring(257), 0x2004 + 2);
        assert_eq!(l.used_event(), 0x2004 + 512);
        assert_eq!(l.used_idx(), 0x3002);
        assert_eq!(l.used_ring(256), 0x3004);
        assert_eq!(l.avail_event(), 0x3004 + 8 * 256);
    }

    #[test]
    fn size_and_alignment_rules() {
        assert!(RingLayout::new(0, 0, 0x1000, 0x2000).is_err());
        assert!(RingLayout::new(3, 0, 0x1000, 0x2000).is_err());
        assert!(RingLayout::new(32768, 0, 0x100000, 0x200000).is_ok());
        assert!(RingLayout::new(8, 8, 0x1000, 0x2000).is_err());
        assert!(RingLayout::new(8, 0, 0x1001, 0x2000).is_err());
        assert!(RingLayout::new(8, 0, 0x1000, 0x2002).is_err());
        assert!(RingLayout::new(8, !15u64, 0x1000, 0x2000).is_err());
    }

    #[test]
    fn need_event_window() {
        // event in [old, new)
        assert!(vring_need_event(5, 6, 4));
        assert!(vring_need_event(4, 5, 4));
        assert!(!vring_need_event(5, 5, 4));
        assert!(!vring_need_event(5, 5, 5));
        assert!(!vring_need_event(3, 6, 4));
        // wrap-around
        assert!(vring_need_event(0xffff, 1, 0xfffe));
        assert!(vring_need_event(0, 1, 0xffff));
    }
}
