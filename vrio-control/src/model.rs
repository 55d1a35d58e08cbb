//! Controller domain types (serde, independent of the wire format) and their
//! conversions to and from protobuf.

use crate::pb;
use serde::{Deserialize, Serialize};
use vrio_core::tenancy::AccessMode;

/// Load of one sidecore over the server's last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreLoad {
    /// Fraction of time the sidecore was busy, 0.0 to 1.0.
    pub busy: f64,
    /// Requests the sidecore served per second.
    pub requests_per_sec: f64,
}

/// A registered I/O server, as the controller tracks it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Server {
    /// Unique server id, chosen by the server.
    pub id: String,
    /// Where agents reach the server's data path (e.g. a fabric address).
    pub address: String,
    /// Number of sidecores; sidecore indexes are `0..sidecores`.
    pub sidecores: u32,
    /// Most queues the server accepts over all its sidecores.
    pub capacity: u32,
    /// One entry per sidecore.
    pub load: Vec<CoreLoad>,
    /// When the lease runs out unless renewed, in ms on the controller's
    /// clock (Unix ms in the gRPC service).
    pub lease_expires_ms: u64,
    /// The lease is live; false once it expired (the server must register
    /// again).
    pub alive: bool,
    /// Being drained: gets no new queues.
    pub draining: bool,
}

impl Server {
    /// Alive, not draining: may receive queues.
    pub fn eligible(&self) -> bool {
        self.alive && !self.draining
    }
}

/// The virtio device type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
}

/// A guest's virtio device whose queues the controller places.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Unique device id.
    pub id: String,
    /// The VM the device belongs to.
    pub vm_id: String,
    /// The device type.
    pub kind: DeviceKind,
    /// Number of queues; each is placed on its own.
    pub queues: u32,
    /// The VM-host agent that owns the guest rings.
    pub agent_address: String,
    /// Keep every queue of this device on this server.
    pub pinned_server: Option<String>,
}

/// A named volume: a raw image of `size_bytes` on each I/O server that
/// serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// 1 to 64 of `[A-Za-z0-9._-]`, not starting with a dot
    /// (`vrio_core::tenancy::valid_volume_name`).
    pub name: String,
    /// Size in bytes, a positive multiple of 512.
    pub size_bytes: u64,
}

/// Permission for one device to attach one volume, in one mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeGrant {
    /// The volume's name.
    pub volume: String,
    /// The device's id at the controller.
    pub device: String,
    /// How the device may use the volume (`rw`, `ro` or `shared` in
    /// snapshots).
    #[serde(with = "access_mode")]
    pub mode: AccessMode,
    /// The VM host the device may attach from: an IP address, or `local`
    /// for Unix-socket fabrics; None for any.
    #[serde(default)]
    pub host: Option<String>,
}

/// `AccessMode` as its name (`rw`, `ro`, `shared`) in snapshots.
mod access_mode {
    use serde::{Deserialize, Deserializer, Serializer};
    use vrio_core::tenancy::AccessMode;

    pub fn serialize<S: Serializer>(m: &AccessMode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AccessMode, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The wire form of a mode.
pub fn mode_to_pb(m: AccessMode) -> pb::AccessMode {
    match m {
        AccessMode::ReadWrite => pb::AccessMode::Rw,
        AccessMode::ReadOnly => pb::AccessMode::Ro,
        AccessMode::Shared => pb::AccessMode::Shared,
    }
}

/// A wire mode; None for `UNSPECIFIED` or an unknown value.
pub fn mode_from_pb(m: i32) -> Option<AccessMode> {
    match pb::AccessMode::try_from(m) {
        Ok(pb::AccessMode::Rw) => Some(AccessMode::ReadWrite),
        Ok(pb::AccessMode::Ro) => Some(AccessMode::ReadOnly),
        Ok(pb::AccessMode::Shared) => Some(AccessMode::Shared),
        _ => None,
    }
}

impl From<&VolumeGrant> for pb::VolumeGrant {
    fn from(g: &VolumeGrant) -> Self {
        pb::VolumeGrant {
            volume: g.volume.clone(),
            device_id: g.device.clone(),
            mode: mode_to_pb(g.mode) as i32,
            host: g.host.clone().unwrap_or_default(),
        }
    }
}

/// One queue of one device: what gets placed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueKey {
    /// The device id.
    pub device: String,
    /// The queue index, `0..queues`.
    pub queue: u32,
}

/// A place a queue can run: one sidecore of one server.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Slot {
    /// The server id.
    pub server: String,
    /// The sidecore index on that server.
    pub sidecore: u32,
}

/// Where one queue runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// The queue.
    pub key: QueueKey,
    /// None while no live server has room.
    pub slot: Option<Slot>,
    /// Bumped on every change of the slot, so followers can tell a stale
    /// update from a fresh one.
    pub generation: u64,
    /// When the slot last changed, in ms on the controller's clock
    /// (rebalance cooldowns count from here).
    pub last_moved_ms: u64,
}

/// What happened to an assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Replay of a current assignment when a watch starts.
    Snapshot,
    /// A queue got its first slot (at attach, or after waiting for room).
    Assigned,
    /// A queue changed slot (to none when a failover found no room).
    Moved,
    /// The queue's device was detached.
    Removed,
}

/// One change to an assignment, as watchers receive it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The assignment after the change (before it, for `Removed`).
    pub assignment: Assignment,
    /// The assignment before the change, when a placed or waiting queue got
    /// a new slot.
    pub previous: Option<Assignment>,
    /// Why: `attach`, `move`, `drain`, `failover`, `rebalance`, `detach` or
    /// `register`.
    pub reason: &'static str,
}

impl From<&Assignment> for pb::Assignment {
    fn from(a: &Assignment) -> Self {
        let (server_id, sidecore) = match &a.slot {
            Some(s) => (s.server.clone(), s.sidecore),
            None => (String::new(), 0),
        };
        pb::Assignment {
            device_id: a.key.device.clone(),
            queue: a.key.queue,
            server_id,
            sidecore,
            generation: a.generation,
        }
    }
}

impl From<&Device> for pb::Device {
    fn from(d: &Device) -> Self {
        pb::Device {
            id: d.id.clone(),
            vm_id: d.vm_id.clone(),
            r#type: match d.kind {
                DeviceKind::Blk => pb::DeviceType::Blk,
                DeviceKind::Net => pb::DeviceType::Net,
            } as i32,
            queues: d.queues,
            agent_address: d.agent_address.clone(),
            pinned_server_id: d.pinned_server.clone().unwrap_or_default(),
        }
    }
}

impl From<&Event> for pb::AssignmentEvent {
    fn from(e: &Event) -> Self {
        let kind = match e.kind {
            EventKind::Snapshot => pb::EventKind::Snapshot,
            EventKind::Assigned => pb::EventKind::Assigned,
            EventKind::Moved => pb::EventKind::Moved,
            EventKind::Removed => pb::EventKind::Removed,
        };
        pb::AssignmentEvent {
            kind: kind as i32,
            assignment: Some((&e.assignment).into()),
            previous: e.previous.as_ref().map(Into::into),
            reason: e.reason.to_string(),
        }
    }
}
