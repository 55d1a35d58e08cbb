//! The vRIO data path: remote sidecores serve guest virtqueues through the
//! fabric alone.
//!
//! - [`agent`]: the VM-host side, a library a VMM links (registration,
//!   doorbells, used.idx publication, interrupts);
//! - [`remote_queue`]: the I/O server side of one queue, a
//!   [`crate::sidecore::ServedQueue`], bounded by `proto::config`;
//! - [`server`]: accepts attachments and spreads queues over sidecores;
//! - [`net_rx`]: a virtio-net receive queue on the I/O server;
//! - [`net_devices`]: the server's switch and its net devices' ports.
//!
//! The protocol itself — the messages (`wire`), the server's shadow of
//! guest rings and staging buffer, the queue limits, and both sides of a
//! queue as state machines — is in `proto`, which does no I/O; this
//! module is the runtime around it: threads, endpoints, registrations,
//! eventfds.

pub mod agent;
mod link;
pub mod net_devices;
pub mod net_rx;
pub mod remote_queue;
pub mod server;

pub use crate::proto::config::RemoteQueueConfig;
pub use crate::proto::queue_error::RemoteQueueError;
pub use crate::proto::stats::{RemoteSnapshot, RemoteStats};
pub use crate::proto::wire::{DeviceKind, NotifyMode, ANY_SIDECORE};
pub use agent::{
    attach, attach_placed, Agent, AgentConfig, AgentError, AgentStats, AttachedDevice,
    DeviceAttach, LinkState, MoveReport, QueueAttach, QueueStatus, QueueTarget,
};
pub use net_devices::{NetDeviceError, NetDevices, NetServerConfig};
pub use net_rx::RemoteRxQueue;
pub use remote_queue::RemoteQueue;
pub use server::{IoServer, IoServerConfig, ServerError};

pub use crate::proto::{device_key, queue_name};

#[cfg(test)]
mod tests {
    #[test]
    fn device_keys_are_stable_and_numeric_ids_keep_their_value() {
        assert_eq!(super::device_key("17"), 17);
        assert_eq!(super::device_key("vm-a"), super::device_key("vm-a"));
        assert_ne!(super::device_key("vm-a"), super::device_key("vm-b"));
        assert_eq!(super::queue_name(3, 1), "dev3.q1");
    }
}
