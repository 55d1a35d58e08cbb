//! An L2 learning switch among the guests of one server and its uplinks.
//!
//! `forward` runs on whichever thread served the sender's TX queue: it
//! validates the frame (length, unicast source, and for a guest port the
//! configured source MAC), learns the source, and either hands the frame
//! to the one port its destination was learned on or floods it (broadcast,
//! multicast, unknown unicast) to every other port. Delivery into a guest
//! is the receiver's RX queue's business: the switch only fills bounded
//! per-port backlogs, so a slow or dead receiver costs drops, never memory
//! or a blocked sender.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::fdb::Fdb;
use super::port::{Port, PortId, PortKind};
use super::uplink::Uplink;
use crate::virtio::net::frame::{parse_frame, FrameError, FrameLimits};
use crate::virtio::net::mac::MacAddr;
use crate::virtio::net::{DropReason, FrameSink, TxDevice};

/// A switch's frame limits, backlogs and forwarding table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchConfig {
    /// Frame size bounds every port's frames are checked against.
    pub limits: FrameLimits,
    /// Frames each port's backlog holds before dropping.
    pub backlog: usize,
    /// Learned addresses are forgotten after this long without traffic.
    pub ageing: Duration,
    /// Most addresses the forwarding table holds.
    pub fdb_capacity: usize,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        Self {
            limits: FrameLimits::default(),
            backlog: 512,
            // IEEE 802.1D's default ageing time.
            ageing: Duration::from_secs(300),
            fdb_capacity: 4096,
        }
    }
}

/// What happened to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Queued for (or sent to) the one port the destination was learned on.
    Unicast(PortId),
    /// Sent to this many ports (some may have dropped it: see their stats).
    Flooded(usize),
    /// Refused at the sending port and counted there.
    Dropped(DropReason),
}

/// An L2 learning switch; share it as `Arc<Switch>` between the threads
/// that forward into it.
pub struct Switch {
    cfg: SwitchConfig,
    ports: RwLock<Vec<Option<Arc<Port>>>>,
    fdb: Fdb,
}

impl Switch {
    /// A switch without ports.
    pub fn new(cfg: SwitchConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            ports: RwLock::new(Vec::new()),
            fdb: Fdb::new(cfg.ageing, cfg.fdb_capacity, Instant::now()),
        })
    }

    /// The switch's configuration.
    pub fn config(&self) -> &SwitchConfig {
        &self.cfg
    }
    /// The forwarding table.
    pub fn fdb(&self) -> &Fdb {
        &self.fdb
    }

    fn add(&self, name: &str, kind: PortKind) -> Arc<Port> {
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        let id = ports.len();
        let p = Arc::new(Port::new(id, name.to_string(), kind, self.cfg.backlog));
        ports.push(Some(p.clone()));
        tracing::debug!(port = name, id, "switch port added");
        p
    }

    /// A port for a guest device whose configured address is `mac`.
    pub fn add_guest_port(&self, name: &str, mac: MacAddr) -> Arc<Port> {
        self.add(name, PortKind::Guest { mac })
    }

    /// A port for an uplink (any source address; frames go straight out).
    pub fn add_uplink(&self, name: &str, uplink: Arc<dyn Uplink>) -> Arc<Port> {
        self.add(name, PortKind::Uplink(uplink))
    }

    /// Detaches a port; its learned addresses go with it. Frames still in
    /// its backlog are dropped with the last reference to it.
    pub fn remove_port(&self, id: PortId) {
        let mut ports = self.ports.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = ports.get_mut(id) {
            *slot = None;
        }
        drop(ports);
        self.fdb.forget_port(id);
    }

    /// The port with `id`, unless it was removed.
    pub fn port(&self, id: PortId) -> Option<Arc<Port>> {
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        ports.get(id).and_then(Clone::clone)
    }

    /// The ports attached now.
    pub fn ports(&self) -> Vec<Arc<Port>> {
        let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
        ports.iter().flatten().cloned().collect()
    }

    /// Switches one frame sent by `from`: validates it (length, unicast
    /// source, a guest port's own MAC), learns the source, then delivers to
    /// the learned port or floods to every other one. Never blocks; drops
    /// are counted on the ports.
    pub fn forward(&self, from: &Port, frame: Vec<u8>) -> Forwarded {
        self.forward_at(from, frame, Instant::now())
    }

    /// [`Switch::forward`] with an explicit clock (ageing tests).
    pub fn forward_at(&self, from: &Port, frame: Vec<u8>, now: Instant) -> Forwarded {
        let drop = |reason: DropReason| {
            from.stats().dropped(reason);
            Forwarded::Dropped(reason)
        };
        let addrs = match parse_frame(&frame, self.cfg.limits) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(port = from.name(), error = %e, "frame dropped");
                return drop(match e {
                    FrameError::Short(_) => DropReason::Short,
                    FrameError::Oversized { .. } => DropReason::Oversized,
                    FrameError::MulticastSource(_) => DropReason::MulticastSource,
                });
            }
        };
        if let Some(mac) = from.mac() {
            if addrs.src != mac {
                tracing::debug!(port = from.name(), src = %addrs.src, configured = %mac, "spoofed source dropped");
                return drop(DropReason::Spoofed);
            }
        }
        from.stats().received(frame.len());
        self.fdb.learn(addrs.src, from.id(), now);
        if !addrs.dst.is_multicast() {
            if let Some(to) = self.fdb.lookup(addrs.dst, now) {
                if to == from.id() {
                    return drop(DropReason::Loopback);
                }
                if let Some(p) = self.port(to) {
                    p.enqueue(frame);
                    return Forwarded::Unicast(to);
                }
            }
        }
        let targets: Vec<Arc<Port>> = {
            let ports = self.ports.read().unwrap_or_else(|e| e.into_inner());
            ports
                .iter()
                .flatten()
                .filter(|p| p.id() != from.id())
                .cloned()
                .collect()
        };
        let n = targets.len();
        let mut frame = Some(frame);
        for (i, p) in targets.iter().enumerate() {
            let f = if i + 1 == n {
                frame.take().unwrap_or_default()
            } else {
                frame.clone().unwrap_or_default()
            };
            p.enqueue(f);
        }
        Forwarded::Flooded(n)
    }
}

/// A guest's port on a switch, as the sink its TX device sends into.
pub struct SwitchPort {
    switch: Arc<Switch>,
    port: Arc<Port>,
}

impl SwitchPort {
    /// The TX device of the guest behind `port` on `switch`.
    pub fn tx(switch: Arc<Switch>, port: Arc<Port>) -> TxDevice {
        TxDevice::new(Arc::new(Self { switch, port }))
    }
}

impl FrameSink for SwitchPort {
    fn max_frame(&self) -> usize {
        self.switch.config().limits.max_frame()
    }

    fn forward(&self, frame: Vec<u8>) {
        // Drops are counted on the ports by the switch itself.
        let _ = self.switch.forward(&self.port, frame);
    }

    fn dropped(&self, reason: DropReason) {
        self.port.stats().dropped(reason);
    }

    fn checksummed(&self) {
        self.port.stats().checksummed();
    }

    fn name(&self) -> &str {
        self.port.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::rx::FrameSource;
    use crate::net::uplink::CaptureUplink;

    fn frame(dst: MacAddr, src: MacAddr, len: usize) -> Vec<u8> {
        let mut f = vec![0x5a; len];
        f[..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        f
    }

    #[test]
    fn learns_floods_and_ages() {
        let sw = Switch::new(SwitchConfig {
            ageing: Duration::from_secs(10),
            ..SwitchConfig::default()
        });
        let (ma, mb, mc) = (MacAddr::local(1), MacAddr::local(2), MacAddr::local(3));
        let a = sw.add_guest_port("a", ma);
        let b = sw.add_guest_port("b", mb);
        let c = sw.add_guest_port("c", mc);
        let up = Arc::new(CaptureUplink::new(16));
        let u = sw.add_uplink("up", up.clone());
        let t0 = Instant::now();
        // b is unknown: flooded to b, c and the uplink.
        assert_eq!(
            sw.forward_at(&a, frame(mb, ma, 60), t0),
            Forwarded::Flooded(3)
        );
        assert_eq!((b.backlog_len(), c.backlog_len()), (1, 1));
        assert_eq!(up.take().len(), 1);
        // b answers: a was learned, so unicast to a only.
        assert_eq!(
            sw.forward_at(&b, frame(ma, mb, 60), t0),
            Forwarded::Unicast(a.id())
        );
        assert_eq!((a.backlog_len(), c.backlog_len()), (1, 1));
        // Now b is known too.
        assert_eq!(
            sw.forward_at(&a, frame(mb, ma, 60), t0),
            Forwarded::Unicast(b.id())
        );
        // Broadcast always floods.
        assert_eq!(
            sw.forward_at(&a, frame(MacAddr::BROADCAST, ma, 60), t0),
            Forwarded::Flooded(3)
        );
        // After ageing, b is unknown again.
        let late = t0 + Duration::from_secs(11);
        assert_eq!(
            sw.forward_at(&a, frame(mb, ma, 60), late),
            Forwarded::Flooded(3)
        );
        // A host behind the uplink is learned on the uplink port.
        let h = MacAddr::local(99);
        sw.forward_at(&u, frame(ma, h, 60), late);
        assert_eq!(
            sw.forward_at(&a, frame(h, ma, 60), late),
            Forwarded::Unicast(u.id())
        );
        assert_eq!(u.stats().snapshot().rx_packets, 1);
        assert_eq!(a.stats().snapshot().rx_packets, 5);
    }

    #[test]
    fn bad_frames_are_dropped_and_counted() {
        let sw = Switch::new(SwitchConfig::default());
        let (ma, mb) = (MacAddr::local(1), MacAddr::local(2));
        let a = sw.add_guest_port("a", ma);
        let b = sw.add_guest_port("b", mb);
        let r = |f| sw.forward(&a, f);
        assert_eq!(
            r(frame(mb, mb, 60)),
            Forwarded::Dropped(DropReason::Spoofed)
        );
        assert_eq!(r(vec![0; 13]), Forwarded::Dropped(DropReason::Short));
        assert_eq!(
            r(frame(mb, ma, 1515)),
            Forwarded::Dropped(DropReason::Oversized)
        );
        let mut mc = frame(mb, ma, 60);
        mc[6] |= 1;
        assert_eq!(r(mc), Forwarded::Dropped(DropReason::MulticastSource));
        assert_eq!(r(frame(mb, ma, 60)), Forwarded::Flooded(1));
        assert_eq!(
            r(frame(ma, ma, 60)),
            Forwarded::Dropped(DropReason::Loopback)
        );
        let s = a.stats().snapshot();
        assert_eq!(s.drops(DropReason::Spoofed), 1);
        assert_eq!(s.drops(DropReason::Short), 1);
        assert_eq!(s.drops(DropReason::Oversized), 1);
        assert_eq!(s.drops(DropReason::MulticastSource), 1);
        assert_eq!(s.drops(DropReason::Loopback), 1);
        assert_eq!(s.rx_packets, 2);
        assert_eq!(b.backlog_len(), 1);
    }

    #[test]
    fn backlog_is_bounded() {
        let sw = Switch::new(SwitchConfig {
            backlog: 4,
            ..SwitchConfig::default()
        });
        let (ma, mb) = (MacAddr::local(1), MacAddr::local(2));
        let a = sw.add_guest_port("a", ma);
        let b = sw.add_guest_port("b", mb);
        for _ in 0..10 {
            sw.forward(&a, frame(mb, ma, 100));
        }
        assert_eq!(b.backlog_len(), 4);
        assert_eq!(b.stats().snapshot().drops(DropReason::BacklogFull), 6);
        assert_eq!(b.peek_len(), Some(100));
        assert!(b.pop().is_some());
        sw.remove_port(b.id());
        assert_eq!(sw.forward(&a, frame(mb, ma, 60)), Forwarded::Flooded(0));
    }
}
