//! The vhost-user-net front: QEMU's `-netdev vhost-user` and the guest's
//! stock virtio_net driver, served by a remote vrio I/O server whose switch
//! connects this guest to the others attached there.
//!
//! The vring plumbing is [`super::backend`]'s; what differs is what the VMM
//! is offered (virtio-net features, a config space with the MAC) and what
//! the agent declares for each queue (`DeviceKind::Net { mac }`), so the
//! server makes a switch port with that address on the first queue. The
//! two queues are RX (0) and TX (1); QEMU keeps the control queue itself.

use std::path::Path;

use vhost::vhost_user::message::VhostUserVirtioFeatures;

use super::backend::{FrontConfig, RemoteFront, Serving, VrioBackend};
use super::serve::{serve_with, ServeError};
use crate::net::{config_space, device_features, MacAddr, NetConfig};
use crate::remote::DeviceKind;

/// Queues of a virtio-net device without MQ: RX and TX.
pub const NET_QUEUES: u16 = 2;

/// The features offered to the VMM: the I/O server's virtio-net device
/// (VERSION_1, CSUM, MAC, MRG_RXBUF, STATUS, EVENT_IDX, INDIRECT_DESC; no
/// MTU, so the guest keeps 1500) and vhost-user's PROTOCOL_FEATURES, without
/// which QEMU refuses to start the device. QEMU sends SET_VRING_ENABLE too
/// early for the vhost crate: [`super::relay`] sits in between.
pub fn net_features(mac: MacAddr) -> u64 {
    device_features(&NetConfig {
        mac,
        ..NetConfig::default()
    }) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The config space: `mac`, link up, one queue pair.
pub fn net_config(mac: MacAddr) -> Vec<u8> {
    config_space(&NetConfig {
        mac,
        ..NetConfig::default()
    })
    .to_vec()
}

/// A back-end for one VMM session whose RX and TX vrings attach to
/// `remote`'s I/O server as net device `remote.device_id` with port `mac`.
pub fn net_backend(remote: RemoteFront, mac: MacAddr, max_queue_size: u16) -> VrioBackend {
    let cfg = FrontConfig {
        serving: Serving::Remote(remote),
        queues: NET_QUEUES,
        max_queue_size,
    };
    VrioBackend::with_device(
        cfg,
        net_config(mac),
        net_features(mac),
        DeviceKind::Net { mac },
    )
}

/// Serves a vhost-user-net socket until `keep_going` says stop (checked
/// after each VMM connection ends).
pub fn serve_net(
    socket: &Path,
    remote: &RemoteFront,
    mac: MacAddr,
    max_queue_size: u16,
    keep_going: impl FnMut() -> bool,
) -> Result<(), ServeError> {
    serve_with(
        socket,
        "vrio-vhost-user-net",
        || net_backend(remote.clone(), mac, max_queue_size),
        true,
        keep_going,
    )
}

#[cfg(test)]
mod tests {
    use vhost_user_backend::VhostUserBackend;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
    };

    use super::*;
    use crate::virtio::ring::layout::{
        VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    };

    fn remote() -> RemoteFront {
        RemoteFront::for_tests(64 << 10, 3)
    }

    #[test]
    fn offers_net_features_two_queues_and_the_mac() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let b = net_backend(remote(), mac, 256);
        let f = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        for bit in [VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_CTRL_VQ] {
            assert_eq!(f & (1 << bit), 0, "bit {bit} is not offered");
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_eq!(b.num_queues(), 2);
        assert_eq!(b.get_config(0, 6), mac.0.to_vec());
        let status = b.get_config(6, 2);
        assert_eq!(
            u16::from_le_bytes([status[0], status[1]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        assert_eq!(b.get_config(8, 2), 1u16.to_le_bytes(), "one queue pair");
        assert_eq!(b.attached_queues(), 0);
    }
}
