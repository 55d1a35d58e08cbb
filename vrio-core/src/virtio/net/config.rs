//! Device configuration and the `struct virtio_net_config` bytes (§5.1.4).

use std::mem::offset_of;

use virtio_bindings::virtio_net::{virtio_net_config as Cfg, VIRTIO_NET_S_LINK_UP};

use super::frame::FrameLimits;
use super::mac::MacAddr;

/// What one virtio-net device advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's address (VIRTIO_NET_F_MAC); the switch only accepts
    /// frames from this source on the guest's port.
    pub mac: MacAddr,
    /// Largest payload the device accepts and delivers.
    pub mtu: u16,
    /// Advertise `mtu` (VIRTIO_NET_F_MTU); otherwise the guest assumes 1500.
    pub offer_mtu: bool,
    /// The VIRTIO_NET_S_LINK_UP bit of `status` (VIRTIO_NET_F_STATUS).
    pub link_up: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            mac: MacAddr::local(0),
            mtu: 1500,
            offer_mtu: false,
            link_up: true,
        }
    }
}

impl NetConfig {
    /// The frame size bounds this device's MTU sets.
    pub fn limits(&self) -> FrameLimits {
        FrameLimits { mtu: self.mtu }
    }
}

/// The receive queue's number (virtio 1.2 §5.1.2: receiveq1).
pub const RX_QUEUE: usize = 0;
/// The transmit queue's number (virtio 1.2 §5.1.2: transmitq1).
pub const TX_QUEUE: usize = 1;

/// Bytes of config space exposed: up to and including `mtu`. Fields past it
/// (speed, duplex, RSS) belong to features not offered.
pub const CONFIG_LEN: usize = offset_of!(Cfg, speed);

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// The little-endian config space. `max_virtqueue_pairs` is 1 (no MQ); it
/// is only read by drivers that negotiated MQ, but a fixed layout means the
/// bytes exist. `mtu` is zero unless offered.
pub fn config_space(cfg: &NetConfig) -> [u8; CONFIG_LEN] {
    let mut b = [0u8; CONFIG_LEN];
    put(&mut b, offset_of!(Cfg, mac), &cfg.mac.0);
    let status = if cfg.link_up {
        VIRTIO_NET_S_LINK_UP as u16
    } else {
        0
    };
    put(&mut b, offset_of!(Cfg, status), &status.to_le_bytes());
    put(
        &mut b,
        offset_of!(Cfg, max_virtqueue_pairs),
        &1u16.to_le_bytes(),
    );
    let mtu = if cfg.offer_mtu { cfg.mtu } else { 0 };
    put(&mut b, offset_of!(Cfg, mtu), &mtu.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets are the ones printed in §5.1.4, not derived from the bindings.
    #[test]
    fn layout_matches_the_spec_struct() {
        let cfg = NetConfig {
            mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            mtu: 0x2345,
            offer_mtu: true,
            link_up: true,
        };
        let b = config_space(&cfg);
        assert_eq!(b.len(), 12);
        assert_eq!(
            b,
            [
                0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // mac[6]
                0x01, 0x00, // status: LINK_UP
                0x01, 0x00, // max_virtqueue_pairs
                0x45, 0x23, // mtu
            ]
        );
    }

    #[test]
    fn link_down_and_mtu_not_offered() {
        let cfg = NetConfig {
            link_up: false,
            offer_mtu: false,
            mtu: 9000,
            ..NetConfig::default()
        };
        let b = config_space(&cfg);
        assert_eq!(&b[0..6], &MacAddr::local(0).0);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(&b[8..10], &[1, 0]);
        assert_eq!(&b[10..12], &[0, 0]);
    }
}
