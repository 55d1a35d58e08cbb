//! The vRIO data path: remote sidecores serve guest virtqueues through the
//! fabric alone.
//!
//! - [`agent`]: the VM-host side, a library a VMM links (registration,
//!   doorbells, used.idx publication, interrupts);
//! - [`remote_queue`]: the I/O server side of one queue, a
//!   [`crate::sidecore::ServedQueue`], bounded by [`config`];
//! - [`server`]: accepts attachments and spreads queues over sidecores;
//! - [`net_rx`]: a virtio-net receive queue on the I/O server;
//! - [`net_devices`]: the server's switch and its net devices' ports;
//! - [`wire`]: the messages between them;
//! - [`shadow`], `staging` (crate-private): local copies of guest rings
//!   and buffers.

#[allow(missing_docs)] // documented with the sans-IO rewrite (issue 12 item 2)
pub mod agent;
pub mod config;
#[allow(missing_docs)] // documented with the sans-IO rewrite (issue 12 item 2)
mod fabric_ring;
pub mod net_devices;
#[allow(missing_docs)] // documented with the sans-IO rewrite (issue 12 item 2)
pub mod net_rx;
mod queue_error;
#[allow(missing_docs)] // documented with the sans-IO rewrite (issue 12 item 2)
pub mod remote_queue;
pub mod server;
pub mod shadow;
pub(crate) mod staging;
pub mod stats;
pub mod wire;

pub use agent::{
    attach, attach_placed, AgentConfig, AgentError, AgentStats, AttachedDevice, DeviceAttach,
    LinkState, MoveReport, QueueAttach, QueueStatus, QueueTarget,
};
pub use config::RemoteQueueConfig;
pub use net_devices::{NetDeviceError, NetDevices, NetServerConfig};
pub use net_rx::RemoteRxQueue;
pub use queue_error::RemoteQueueError;
pub use remote_queue::RemoteQueue;
pub use server::{IoServer, IoServerConfig, ServerError};
pub use stats::{RemoteSnapshot, RemoteStats};
pub use wire::{DeviceKind, NotifyMode, ANY_SIDECORE};

/// The wire's numeric device id for a controller's device id: the number
/// itself when the id is decimal, else a stable 64-bit hash (FNV-1a), so
/// agents and servers name a queue (`dev<key>.q<queue>`) the same way.
pub fn device_key(id: &str) -> u64 {
    if let Ok(n) = id.parse::<u64>() {
        return n;
    }
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The name an I/O server gives a queue.
pub fn queue_name(device_key: u64, queue: u16) -> String {
    format!("dev{device_key}.q{queue}")
}

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
