//! The vRIO data path: remote sidecores serve guest virtqueues through the
//! fabric alone.
//!
//! - [`agent`]: the VM-host side, a library a VMM links (registration,
//!   doorbells, used.idx publication, interrupts);
//! - [`server_queue`]: the I/O server side of one queue, a
//!   [`crate::sidecore::ServedQueue`];
//! - [`server`]: accepts attachments and spreads queues over sidecores;
//! - [`wire`]: the messages between them;
//! - [`shadow`], [`staging`]: local copies of guest rings and buffers.

pub mod agent;
pub mod server;
pub mod server_queue;
pub mod shadow;
pub mod staging;
pub mod stats;
pub mod wire;

pub use agent::{
    attach, attach_placed, AgentConfig, AgentError, AgentStats, AttachedDevice, DeviceAttach,
    LinkState, MoveReport, QueueAttach, QueueStatus, QueueTarget,
};
pub use server::{IoServer, IoServerConfig, ServerError};
pub use server_queue::{RemoteQueue, RemoteQueueConfig};
pub use stats::{RemoteSnapshot, RemoteStats};
pub use wire::{NotifyMode, ANY_SIDECORE};
