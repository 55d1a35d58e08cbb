//! Synthetic virtio-net guests ([`guest`]), verified frame traffic
//! ([`traffic`]) and the runner that connects guests through a switch under
//! each I/O model ([`runner`]).

pub mod guest;
pub mod runner;
pub mod traffic;

pub use guest::{NetGuest, NetGuestConfig, NetGuestQueue, RX_QUEUE, TX_QUEUE};
pub use runner::{
    attach_net_guest, attach_net_remote, run_net, run_net_remote, AttachedNetGuest, NetReport,
    NetRunConfig, RemoteNetFigures,
};
