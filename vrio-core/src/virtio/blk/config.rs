//! Device configuration and the `struct virtio_blk_config` bytes (§5.2.4).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::virtio_blk_config as Cfg;

/// What a [`BlockDevice`](super::BlockDevice) advertises and enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Request queues (advertised with VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Most data segments the driver may put in one request.
    pub seg_max: u32,
    /// Largest single data segment, offered as VIRTIO_BLK_F_SIZE_MAX if set.
    pub size_max: Option<u32>,
    /// Logical block size the guest should use (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Data bytes one IN/OUT request may carry; beyond it the request fails
    /// with IOERR, so a guest cannot make the device allocate without bound.
    pub max_request_bytes: u32,
    /// Largest DISCARD range, in sectors (§5.2.4 `max_discard_sectors`).
    pub max_discard_sectors: u32,
    /// Most ranges in one DISCARD request.
    pub max_discard_seg: u32,
    /// Advertised DISCARD alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest WRITE_ZEROES range, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most ranges in one WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// Whether WRITE_ZEROES with the UNMAP flag may deallocate (advertised
    /// and honoured).
    pub write_zeroes_may_unmap: bool,
    /// Read-only regardless of the backend (a read-only backend is always RO).
    pub read_only: bool,
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            // A 128-entry queue minus header and status descriptors.
            seg_max: 126,
            size_max: None,
            blk_size: 512,
            max_request_bytes: 4 << 20,
            // 2 GiB per segment, like QEMU's request limit.
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            // 4 KiB: the memory backend's allocation unit.
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 32,
            write_zeroes_may_unmap: true,
            read_only: false,
        }
    }
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// The little-endian config space of a device with `capacity` sectors: the
/// whole `struct virtio_blk_config`, with fields of features we do not offer
/// (geometry, topology, secure erase, zoned) left zero.
pub fn config_space(cfg: &BlockConfig, capacity: u64) -> Vec<u8> {
    let mut b = vec![0u8; size_of::<Cfg>()];
    put(&mut b, offset_of!(Cfg, capacity), &capacity.to_le_bytes());
    put(
        &mut b,
        offset_of!(Cfg, size_max),
        &cfg.size_max.unwrap_or(0).to_le_bytes(),
    );
    put(&mut b, offset_of!(Cfg, seg_max), &cfg.seg_max.to_le_bytes());
    put(
        &mut b,
        offset_of!(Cfg, blk_size),
        &cfg.blk_size.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(Cfg, num_queues),
        &cfg.num_queues.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(Cfg, max_discard_sectors),
        &cfg.max_discard_sectors.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(Cfg, max_discard_seg),
        &cfg.max_discard_seg.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(Cfg, discard_sector_alignment),
        &cfg.discard_sector_alignment.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(Cfg, max_write_zeroes_sectors),
        &cfg.max_write_zeroes_sectors.to_le_bytes(),
    );
    put(
        &mut b,
        offset_of!(Cfg, max_write_zeroes_seg),
        &cfg.max_write_zeroes_seg.to_le_bytes(),
    );
    b[offset_of!(Cfg, write_zeroes_may_unmap)] = u8::from(cfg.write_zeroes_may_unmap);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Offsets are the ones printed in §5.2.4, not derived from the bindings.
    #[test]
    fn layout_matches_the_spec_struct() {
        let cfg = BlockConfig {
            num_queues: 3,
            seg_max: 0x11,
            size_max: Some(0x2233),
            blk_size: 4096,
            max_request_bytes: 1 << 20,
            max_discard_sectors: 0x44,
            max_discard_seg: 0x55,
            discard_sector_alignment: 0x66,
            max_write_zeroes_sectors: 0x77,
            max_write_zeroes_seg: 0x88,
            write_zeroes_may_unmap: true,
            read_only: false,
        };
        let b = config_space(&cfg, 0x0102_0304_0506_0708);
        assert_eq!(b.len(), 96, "virtio 1.2 config struct incl. zoned block");
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(le32(&b, 8), 0x2233); // size_max
        assert_eq!(le32(&b, 12), 0x11); // seg_max
        assert_eq!(&b[16..20], &[0; 4]); // geometry: not offered
        assert_eq!(le32(&b, 20), 4096); // blk_size
        assert_eq!(&b[24..34], &[0; 10]); // topology, writeback
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 3); // num_queues
        assert_eq!(le32(&b, 36), 0x44); // max_discard_sectors
        assert_eq!(le32(&b, 40), 0x55); // max_discard_seg
        assert_eq!(le32(&b, 44), 0x66); // discard_sector_alignment
        assert_eq!(le32(&b, 48), 0x77); // max_write_zeroes_sectors
        assert_eq!(le32(&b, 52), 0x88); // max_write_zeroes_seg
        assert_eq!(b[56], 1); // write_zeroes_may_unmap
        assert!(b[57..].iter().all(|&x| x == 0));
    }

    #[test]
    fn absent_size_max_and_may_unmap_are_zero() {
        let cfg = BlockConfig {
            write_zeroes_may_unmap: false,
            ..BlockConfig::default()
        };
        let b = config_space(&cfg, 8);
        assert_eq!(le32(&b, 8), 0);
        assert_eq!(b[56], 0);
        assert_eq!(le32(&b, 12), cfg.seg_max);
    }
}
