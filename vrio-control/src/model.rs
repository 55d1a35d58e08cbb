//! Controller domain types (serde, independent of the wire format) and their
//! conversions to and from protobuf.

use crate::pb;
use serde::{Deserialize, Serialize};

/// Load of one sidecore over the server's last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreLoad {
    pub busy: f64,
    pub requests_per_sec: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub address: String,
    pub sidecores: u32,
    pub capacity: u32,
    /// One entry per sidecore.
    pub load: Vec<CoreLoad>,
    pub lease_expires_ms: u64,
    pub alive: bool,
    pub draining: bool,
}

impl Server {
    /// Alive, not draining: may receive queues.
    pub fn eligible(&self) -> bool {
        self.alive && !self.draining
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    Blk,
    Net,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub vm_id: String,
    pub kind: DeviceKind,
    pub queues: u32,
    pub agent_address: String,
    pub pinned_server: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueKey {
    pub device: String,
    pub queue: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Slot {
    pub server: String,
    pub sidecore: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub key: QueueKey,
    /// None while no live server has room.
    pub slot: Option<Slot>,
    pub generation: u64,
    pub last_moved_ms: u64,
}

/// What happened to an assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Snapshot,
    Assigned,
    Moved,
    Removed,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub assignment: Assignment,
    pub previous: Option<Assignment>,
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
