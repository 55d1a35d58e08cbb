//! `struct virtio_net_hdr` as VERSION_1 devices use it (§5.1.6): always
//! 12 bytes, `num_buffers` included, little-endian.
//!
//! ```text
//! struct virtio_net_hdr { u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
//!                         le16 csum_start; le16 csum_offset; le16 num_buffers; }
//! ```

use std::mem::size_of;

use super::checksum::{check_partial, ChecksumError};
use virtio_bindings::virtio_net::{
    virtio_net_hdr_mrg_rxbuf, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
};

/// Header bytes in front of every frame (VERSION_1).
pub const HDR_LEN: usize = size_of::<virtio_net_hdr_mrg_rxbuf>();

/// `flags`: the device must complete a partial checksum (§5.1.6.2).
pub const F_NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
/// `flags`: the checksum was verified (device to driver only, with
/// GUEST_CSUM; never sent here).
pub const F_DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
/// `gso_type`: no segmentation offload.
pub const GSO_NONE: u8 = VIRTIO_NET_HDR_GSO_NONE as u8;

/// The decoded `struct virtio_net_hdr`, one field per spec field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `F_*` bits.
    pub flags: u8,
    /// `GSO_*` type; only [`GSO_NONE`] is accepted.
    pub gso_type: u8,
    /// Header bytes to copy per segment (GSO only).
    pub hdr_len: u16,
    /// Segment payload size (GSO only).
    pub gso_size: u16,
    /// Where checksumming starts (with [`F_NEEDS_CSUM`]).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers a received frame spans (RX; ignored on TX).
    pub num_buffers: u16,
}

/// Why a driver-supplied (TX) header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Only NEEDS_CSUM may be set on TX (DATA_VALID is the device's, §5.1.6.2.1).
    #[error("header flags {0:#x}: only NEEDS_CSUM is allowed on transmit")]
    Flags(u8),
    /// NEEDS_CSUM names a checksum field outside the frame.
    #[error(transparent)]
    Checksum(#[from] ChecksumError),
    /// §5.1.6.2.1: without any GSO feature gso_type MUST be GSO_NONE.
    #[error("gso_type {0} set, but no segmentation offload was negotiated")]
    Gso(u8),
}

impl NetHeader {
    /// Decodes the 12 header bytes.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }

    /// Encodes the 12 header bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The header the device puts in front of a received frame: no offload
    /// information (GUEST_CSUM/GUEST_TSO are not offered), and the number of
    /// buffers the frame spans (§5.1.6.3.1: 1 without MRG_RXBUF).
    pub fn rx(num_buffers: u16) -> Self {
        Self {
            num_buffers,
            ..Self::default()
        }
    }

    /// Checks a TX header for a frame of `frame_len` bytes, for a device
    /// that offers CSUM and no segmentation: NEEDS_CSUM must point inside
    /// the frame. The device completes the checksum whether or not the
    /// driver acked CSUM (a driver that did not must not ask; doing it
    /// anyway harms nobody). `hdr_len` and `gso_size` only matter with GSO;
    /// `num_buffers` is ignored on TX (§5.1.6.2.2).
    pub fn validate_tx(&self, frame_len: usize) -> Result<(), HeaderError> {
        if self.flags & !F_NEEDS_CSUM != 0 {
            return Err(HeaderError::Flags(self.flags));
        }
        if self.gso_type != GSO_NONE {
            return Err(HeaderError::Gso(self.gso_type));
        }
        if self.needs_csum() {
            check_partial(self.csum_start, self.csum_offset, frame_len)?;
        }
        Ok(())
    }

    /// [`F_NEEDS_CSUM`] is set.
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twelve_bytes_little_endian() {
        assert_eq!(HDR_LEN, 12);
        let h = NetHeader {
            flags: 1,
            gso_type: 3,
            hdr_len: 0x0201,
            gso_size: 0x0403,
            csum_start: 0x0605,
            csum_offset: 0x0807,
            num_buffers: 0x0a09,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(NetHeader::from_bytes(&b), h);
        assert_eq!(
            NetHeader::rx(3).to_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0]
        );
    }

    #[test]
    fn tx_header_rules() {
        assert_eq!(NetHeader::default().validate_tx(60), Ok(()));
        let nb = NetHeader {
            num_buffers: 7,
            csum_start: 9,
            ..NetHeader::default()
        };
        assert_eq!(nb.validate_tx(60), Ok(()));
        // TCP over IPv4: checksum field at 34 + 16.
        let f = NetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..NetHeader::default()
        };
        assert_eq!(f.validate_tx(54), Ok(()));
        assert!(matches!(f.validate_tx(51), Err(HeaderError::Checksum(_))));
        let v = NetHeader {
            flags: F_DATA_VALID,
            ..NetHeader::default()
        };
        assert_eq!(v.validate_tx(60), Err(HeaderError::Flags(2)));
        let g = NetHeader {
            gso_type: 1,
            ..NetHeader::default()
        };
        assert_eq!(g.validate_tx(60), Err(HeaderError::Gso(1)));
    }
}
