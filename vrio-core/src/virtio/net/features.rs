//! The feature bits a virtio-net device offers (§5.1.3) and what a driver
//! may accept.
//!
//! CSUM is offered: the device completes partial checksums in software at
//! TX, before switching (see [`checksum`](super::checksum)), so the guest
//! leaves that work to the I/O server and every port gets complete frames.
//! Not offered: GUEST_CSUM (a receiver would need to know which frames it
//! may skip verifying, and nothing here verifies them for it), the
//! segmentation offloads built on CSUM (TSO, UFO, USO: frames larger than
//! the MTU would need segmenting at every port that cannot take them),
//! CTRL_VQ (Linux works without it: no promiscuous or VLAN filtering
//! control, MAC from config space) and MQ.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
};

use super::config::NetConfig;
use crate::virtio::ring::layout::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::virtio::ring::RingFeatures;

/// Offered device features: VERSION_1, the ring features the engine
/// implements, CSUM, MAC, MRG_RXBUF, STATUS, and MTU when `cfg` offers it.
pub fn device_features(cfg: &NetConfig) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | 1 << b);
    if cfg.offer_mtu {
        bits |= 1 << VIRTIO_NET_F_MTU;
    }
    bits
}

/// Why a driver's feature set was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeatureError {
    /// The driver acked bits (given) the device did not offer.
    #[error("driver accepted features {0:#x} that were not offered")]
    NotOffered(u64),
    /// The driver did not ack VIRTIO_F_VERSION_1.
    #[error("driver did not accept VERSION_1 (legacy drivers are not supported)")]
    NoVersion1,
}

/// What the device does differently depending on the negotiated features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetFeatures {
    /// MRG_RXBUF: a received frame may span several RX chains.
    pub mergeable: bool,
    /// The negotiated ring features.
    pub ring: RingFeatures,
}

impl NetFeatures {
    /// Checks the driver's `acked` bits against `offered` (a subset, with
    /// VERSION_1) and keeps what changes the device's behaviour.
    pub fn negotiate(offered: u64, acked: u64) -> Result<Self, FeatureError> {
        if acked & !offered != 0 {
            return Err(FeatureError::NotOffered(acked & !offered));
        }
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FeatureError::NoVersion1);
        }
        let has = |b: u32| acked & (1 << b) != 0;
        Ok(Self {
            mergeable: has(VIRTIO_NET_F_MRG_RXBUF),
            ring: RingFeatures {
                indirect: has(VIRTIO_RING_F_INDIRECT_DESC),
                event_idx: has(VIRTIO_RING_F_EVENT_IDX),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_bits() {
        let f = device_features(&NetConfig::default());
        // VERSION_1 (32), INDIRECT (28), EVENT_IDX (29), CSUM (0), MAC (5),
        // MRG_RXBUF (15), STATUS (16); no GUEST_CSUM (1), MTU (3).
        assert_eq!(
            f,
            1 << 32 | 1 << 28 | 1 << 29 | 1 | 1 << 5 | 1 << 15 | 1 << 16
        );
        let m = device_features(&NetConfig {
            offer_mtu: true,
            ..NetConfig::default()
        });
        assert_eq!(m, f | 1 << 3);
    }

    #[test]
    fn negotiation() {
        let off = device_features(&NetConfig::default());
        let n = NetFeatures::negotiate(off, 1 << 32 | 1 << 15 | 1 << 29).unwrap();
        assert!(n.mergeable && n.ring.event_idx && !n.ring.indirect);
        assert_eq!(
            NetFeatures::negotiate(off, 1 << 32 | 2),
            Err(FeatureError::NotOffered(2))
        );
        assert_eq!(
            NetFeatures::negotiate(off, 1 << 15),
            Err(FeatureError::NoVersion1)
        );
    }
}
