//! The feature bits a virtio-blk device offers (§5.2.3).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};

use super::config::BlockConfig;
use crate::virtio::ring::layout::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// Offered device features: device-type bits, VERSION_1 and the ring
/// features the engine implements. RO only when the device is read-only,
/// SIZE_MAX only when a segment size limit is configured.
pub fn device_features(cfg: &BlockConfig, read_only: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | 1 << b);
    if read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    }
    if cfg.size_max.is_some() {
        bits |= 1 << VIRTIO_BLK_F_SIZE_MAX;
    }
    bits
}
