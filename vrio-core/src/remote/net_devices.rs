//! The I/O server's virtio-net devices: one switch shared by all of them,
//! one port per device, shared by the device's RX and TX queues.
//!
//! A device's type and MAC come from its ATTACH_DEVICE, or, for agents that
//! send a plain ATTACH, from the server's configuration (`devices`). When
//! both say something they must agree: the MAC is what the spoof check
//! enforces, so a queue may not re-point a device at another address.
//! A declared device needs no configuration: its port takes the MAC the
//! agent declared, as long as that is a unicast address no other device's
//! port holds (a second claimant would steal the first one's frames).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::net::{
    config_space, MacAddr, NetConfig, Port, PortSnapshot, Switch, SwitchConfig, RX_QUEUE, TX_QUEUE,
};
use crate::proto::wire::DeviceKind;

/// Why a net device's queue was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetDeviceError {
    /// The ATTACH_DEVICE and the server's configuration disagree on the
    /// device's type or MAC.
    #[error("device {device_id} attached as {said:?} but configured as {configured:?}")]
    KindMismatch {
        /// The device.
        device_id: u64,
        /// What the agent declared.
        said: DeviceKind,
        /// What the configuration says.
        configured: DeviceKind,
    },
    /// The device already has a port with another MAC (a queue may not
    /// re-point it).
    #[error("device {device_id} has port address {has:?}, not {asked}")]
    OtherMac {
        /// The device.
        device_id: u64,
        /// Its port's MAC.
        has: Option<MacAddr>,
        /// The MAC this queue asked for.
        asked: MacAddr,
    },
    /// The MAC asked for is multicast or all zeros.
    #[error("device {device_id}: {mac} is not a unicast address")]
    NotUnicast {
        /// The device.
        device_id: u64,
        /// The MAC asked for.
        mac: MacAddr,
    },
    /// Another device's port holds the MAC.
    #[error("device {device_id}: address {mac} belongs to device {owner}")]
    MacTaken {
        /// The device.
        device_id: u64,
        /// The MAC asked for.
        mac: MacAddr,
        /// The device whose port holds it.
        owner: u64,
    },
    /// A queue index other than RX (0) or TX (1).
    #[error("virtio-net queue {0} is not offered")]
    NoSuchQueue(u16),
    /// The port map's lock was poisoned by a panic.
    #[error("net ports poisoned")]
    Poisoned,
}

/// The I/O server's virtio-net side: its switch, the receive buffering
/// offered, and devices typed by configuration.
#[derive(Debug, Clone)]
pub struct NetServerConfig {
    /// The switch every net device's port joins.
    pub switch: SwitchConfig,
    /// Offer MRG_RXBUF semantics: a frame may span several RX buffers.
    pub mergeable: bool,
    /// Device ids served as virtio-net, with their MACs, when the agent's
    /// ATTACH does not say so itself.
    pub devices: Vec<(u64, MacAddr)>,
}

impl Default for NetServerConfig {
    fn default() -> Self {
        Self {
            switch: SwitchConfig::default(),
            mergeable: true,
            devices: Vec::new(),
        }
    }
}

/// Which net queue an ATTACH is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NetQueue {
    Rx,
    Tx,
}

/// The server's switch and the port of each net device, shared by the
/// device's RX and TX queues. A port leaves the switch once none of its
/// device's queues is served (checked on the next attach).
pub struct NetDevices {
    cfg: NetServerConfig,
    switch: Arc<Switch>,
    ports: Mutex<HashMap<u64, Arc<Port>>>,
}

impl NetDevices {
    pub(crate) fn new(cfg: NetServerConfig) -> Self {
        Self {
            switch: Switch::new(cfg.switch),
            cfg,
            ports: Mutex::new(HashMap::new()),
        }
    }

    /// The switch all net devices' ports are on (join an uplink here).
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }
    pub(crate) fn mergeable(&self) -> bool {
        self.cfg.mergeable
    }

    /// The device's type from what the agent said (`said`, None for a
    /// plain ATTACH) and the configuration.
    pub(crate) fn kind(
        &self,
        device_id: u64,
        said: Option<DeviceKind>,
    ) -> Result<DeviceKind, NetDeviceError> {
        let configured = self
            .cfg
            .devices
            .iter()
            .find(|(id, _)| *id == device_id)
            .map(|&(_, mac)| DeviceKind::Net { mac });
        match (said, configured) {
            (None, None) => Ok(DeviceKind::Blk),
            (None, Some(k)) | (Some(k), None) => Ok(k),
            (Some(a), Some(b)) if a == b => Ok(a),
            (Some(said), Some(configured)) => Err(NetDeviceError::KindMismatch {
                device_id,
                said,
                configured,
            }),
        }
    }

    /// The port of net device `device_id`, made on its first queue.
    pub(crate) fn port(&self, device_id: u64, mac: MacAddr) -> Result<Arc<Port>, NetDeviceError> {
        let mut ports = self.ports.lock().map_err(|_| NetDeviceError::Poisoned)?;
        self.prune(&mut ports);
        if let Some(p) = ports.get(&device_id) {
            if p.mac() != Some(mac) {
                return Err(NetDeviceError::OtherMac {
                    device_id,
                    has: p.mac(),
                    asked: mac,
                });
            }
            return Ok(p.clone());
        }
        if mac.is_multicast() || mac.is_zero() {
            return Err(NetDeviceError::NotUnicast { device_id, mac });
        }
        if let Some(owner) = ports
            .iter()
            .find_map(|(id, p)| (p.mac() == Some(mac)).then_some(*id))
        {
            return Err(NetDeviceError::MacTaken {
                device_id,
                mac,
                owner,
            });
        }
        let p = self.switch.add_guest_port(&format!("dev{device_id}"), mac);
        ports.insert(device_id, p.clone());
        Ok(p)
    }

    /// Removes the ports of devices none of whose queues is served any
    /// more (the VM went away, or its queues moved to another server), so
    /// their addresses are free again. Done under the map's lock, the only
    /// way to a port: a count of two (the map and the switch) cannot grow
    /// meanwhile. A copy the switch holds for a moment while flooding only
    /// postpones it to the next attach.
    fn prune(&self, ports: &mut HashMap<u64, Arc<Port>>) {
        ports.retain(|id, p| {
            let served = Arc::strong_count(p) > 2;
            if !served {
                self.switch.remove_port(p.id());
                tracing::info!(device = id, mac = ?p.mac(), "net device has no queue left: port removed");
            }
            served
        });
    }

    /// §5.1.2: queue 0 receives, queue 1 transmits; no control queue or
    /// multiqueue is offered.
    pub(crate) fn queue(index: u16) -> Result<NetQueue, NetDeviceError> {
        match usize::from(index) {
            RX_QUEUE => Ok(NetQueue::Rx),
            TX_QUEUE => Ok(NetQueue::Tx),
            _ => Err(NetDeviceError::NoSuchQueue(index)),
        }
    }

    pub(crate) fn config_space(&self, mac: MacAddr) -> Vec<u8> {
        config_space(&NetConfig {
            mac,
            mtu: self.cfg.switch.limits.mtu,
            ..NetConfig::default()
        })
        .to_vec()
    }

    /// Counters of each device's port, by device id.
    pub fn port_stats(&self) -> Vec<(u64, PortSnapshot)> {
        let Ok(ports) = self.ports.lock() else {
            return Vec::new();
        };
        let mut v: Vec<_> = ports
            .iter()
            .map(|(id, p)| (*id, p.stats().snapshot()))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_no_queue_holds_frees_its_address_for_the_next_device() {
        let d = NetDevices::new(NetServerConfig::default());
        let mac = MacAddr::local(7);
        let p1 = d.port(1, mac).unwrap();
        // While device 1's queues hold the port, nobody else takes the MAC.
        let refused = d.port(2, mac).err();
        assert!(
            matches!(refused, Some(NetDeviceError::MacTaken { owner: 1, .. })),
            "{refused:?}"
        );
        assert_eq!(d.port(1, mac).unwrap().id(), p1.id(), "one port per device");
        let id = p1.id();
        drop(p1);
        let p2 = d.port(2, mac).unwrap();
        assert_ne!(p2.id(), id);
        assert!(
            d.switch().port(id).is_none(),
            "the old port left the switch"
        );
        assert_eq!(d.switch().ports().len(), 1);
        assert_eq!(d.port_stats().len(), 1);
    }

    #[test]
    fn device_types_come_from_the_attach_or_the_configuration_and_must_agree() {
        let (m1, m2) = (MacAddr::local(1), MacAddr::local(2));
        let nd = NetDevices::new(NetServerConfig {
            devices: vec![(7, m1)],
            ..NetServerConfig::default()
        });
        let net = |mac| DeviceKind::Net { mac };
        assert_eq!(nd.kind(3, None), Ok(DeviceKind::Blk));
        assert_eq!(nd.kind(7, None), Ok(net(m1)));
        assert_eq!(nd.kind(3, Some(net(m2))), Ok(net(m2)));
        assert_eq!(nd.kind(7, Some(net(m1))), Ok(net(m1)));
        assert!(nd.kind(7, Some(net(m2))).is_err());
        assert!(nd.kind(7, Some(DeviceKind::Blk)).is_err());
        // RX and TX of one device share its port; another MAC is refused.
        let p = nd.port(7, m1).unwrap();
        assert!(Arc::ptr_eq(&p, &nd.port(7, m1).unwrap()));
        assert!(nd.port(7, m2).is_err());
        assert_eq!(nd.switch().ports().len(), 1);
        // A declared device gets its MAC, unless another port holds it or
        // it is no unicast address.
        let _p3 = nd.port(3, m2).unwrap();
        assert!(nd.port(4, m1).is_err(), "device 7 holds m1");
        assert!(nd.port(5, MacAddr::BROADCAST).is_err());
        assert!(nd.port(6, MacAddr([0; 6])).is_err());
        assert_eq!(nd.switch().ports().len(), 2);
        assert_eq!(NetDevices::queue(0), Ok(NetQueue::Rx));
        assert_eq!(NetDevices::queue(1), Ok(NetQueue::Tx));
        assert!(NetDevices::queue(2).is_err());
        assert_eq!(&nd.config_space(m2)[..6], &m2.0);
    }
}
