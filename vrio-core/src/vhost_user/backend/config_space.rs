//! The virtio-blk device the VMM is offered: the I/O server's config space
//! with its request limits patched to what the server takes and the queue
//! count ours, and the features a server's block device offers.

use vhost::vhost_user::message::VhostUserVirtioFeatures;

use crate::blk::{device_features, BlockConfig};

// Offsets in `struct virtio_blk_config` (§5.2.4).
pub(super) const SIZE_MAX_OFFSET: usize = 8;
pub(super) const SEG_MAX_OFFSET: usize = 12;
const NUM_QUEUES_OFFSET: usize = 34;
/// Segment size we advertise (SIZE_MAX): the guest's page size.
pub(super) const SEGMENT: u32 = 4096;

/// `server_config` with SIZE_MAX, SEG_MAX and NUM_QUEUES replaced: the
/// guest is held under `max_request` (virtio-blk has no field for a
/// request's total size), and offered `queues`, as every queue is attached
/// on its own. Fields past the end of a short `server_config` stay absent.
pub(super) fn patch_blk_config(server_config: &[u8], max_request: u32, queues: u16) -> Vec<u8> {
    let mut config = server_config.to_vec();
    // One segment of headroom for the header and status byte.
    let seg_max = (max_request / SEGMENT).saturating_sub(1).max(1);
    let server_seg_max = config
        .get(SEG_MAX_OFFSET..SEG_MAX_OFFSET + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .filter(|&s| s > 0)
        .unwrap_or(seg_max);
    let seg_max = seg_max.min(server_seg_max);
    for (off, v) in [
        (SIZE_MAX_OFFSET, &SEGMENT.to_le_bytes()[..]),
        (SEG_MAX_OFFSET, &seg_max.to_le_bytes()[..]),
        (NUM_QUEUES_OFFSET, &queues.to_le_bytes()[..]),
    ] {
        if let Some(dst) = config.get_mut(off..off + v.len()) {
            dst.copy_from_slice(v);
        }
    }
    config
}

/// The features offered for a block device. The wire does not carry the
/// server's feature bits; these are the ones its BlockDevice offers for a
/// writable disk, plus SIZE_MAX and vhost-user's PROTOCOL_FEATURES.
pub(super) fn blk_features(read_only: bool) -> u64 {
    let blk = BlockConfig {
        size_max: Some(SEGMENT),
        ..BlockConfig::default()
    };
    device_features(&blk, read_only) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

#[cfg(test)]
mod tests {
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost_user_backend::VhostUserBackend;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SIZE_MAX};

    use super::*;
    use crate::blk::config_space;
    use crate::vhost_user::{FrontConfig, RemoteFront, Serving, VrioBackend};
    use crate::virtio::ring::layout::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

    fn front(queues: u16, max_request: u32) -> FrontConfig {
        FrontConfig {
            serving: Serving::Remote(RemoteFront::for_tests(max_request, 7)),
            queues,
            max_queue_size: 256,
        }
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_keeps_the_server_capacity_and_bounds_requests() {
        let server = config_space(&BlockConfig::default(), 0x8_0000);
        let b = VrioBackend::new(front(3, 128 << 10), &server);
        let c = b.get_config(0, server.len() as u32);
        assert_eq!(&c[0..8], &server[0..8], "capacity");
        assert_eq!(le32(&c, SIZE_MAX_OFFSET), SEGMENT);
        // 31 page segments plus header and status stay under 128 KiB.
        assert_eq!(le32(&c, SEG_MAX_OFFSET), 31);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 3, "num_queues");
        assert_eq!(&c[36..], &server[36..], "discard and write-zeroes limits");
        // Partial and out-of-range reads, as the VMM may issue them.
        assert_eq!(b.get_config(20, 4), server[20..24].to_vec());
        assert_eq!(b.get_config(1000, 4), vec![0; 4]);
        assert_eq!(b.get_config(92, 8), [&server[92..96], &[0; 4][..]].concat());
    }

    #[test]
    fn a_small_server_seg_max_wins() {
        let server = config_space(
            &BlockConfig {
                seg_max: 4,
                ..BlockConfig::default()
            },
            8,
        );
        let b = VrioBackend::new(front(1, 1 << 20), &server);
        assert_eq!(le32(&b.get_config(0, 16), SEG_MAX_OFFSET), 4);
    }

    #[test]
    fn features_and_protocol_features() {
        let b = VrioBackend::new(front(2, 128 << 10), &[0; 60]);
        let f = b.features();
        for bit in [
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert_eq!(b.num_queues(), 2);
        assert_eq!(b.max_queue_size(), 256);
        assert_eq!(b.attached_queues(), 0);
    }
}
