//! virtio-net's runtime: the L2 switch that connects the guests of one
//! server, and the local RX queue. The device model itself (header, frame,
//! config, features, TX, RX) is `virtio::net`, re-exported here.
//!
//! [`switch`] (with [`fdb`], [`port`], [`uplink`]) moves frames between
//! ports, and [`tap`] joins a TAP device to it as the uplink; a guest's TX
//! sends into its port through [`SwitchPort`], and RX takes from the port
//! (a `FrameSource`). [`rx_queue`] serves local RX rings (TX is a chain at
//! a time, so `models::LocalQueue<TxDevice>` serves it), as `ServedQueue`s
//! for the vhost-style worker or a sidecore. Remote sidecores serve the
//! same models over the fabric: `remote::RemoteQueue<TxDevice>` and
//! `remote::RemoteRxQueue`, with the I/O server's switch in
//! `remote::net_devices`.
//!
//! Offered offload: CSUM only, completed in software at TX. Not offered:
//! GUEST_CSUM, segmentation offloads, CTRL_VQ, MQ (see
//! `virtio/net/features.rs`).

pub use crate::virtio::net::*;
pub mod fdb;
pub mod port;
pub mod rx_queue;
pub mod stats;
pub mod switch;
pub mod tap;
pub mod uplink;

pub use port::{Port, PortId, PortKind};
pub use rx_queue::NetRxQueue;
pub use stats::{PortSnapshot, PortStats};
pub use switch::{Forwarded, Switch, SwitchConfig, SwitchPort};
pub use tap::{Tap, TapError, TapUplink};
pub use uplink::{CaptureUplink, Uplink, UplinkError};
