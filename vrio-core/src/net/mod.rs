//! virtio-net (virtio 1.2 §5.1) and the L2 switch that connects the guests
//! of one server.
//!
//! Layers, bottom up: [`header`] and [`frame`] parse what a guest sends;
//! [`config`] and [`features`] are what the device advertises; [`tx`] and
//! [`rx`] are the device model proper, written over [`GuestMemory`] and
//! [`DescriptorChain`] only, so the I/O server can run them over staged
//! chains; [`switch`] (with [`fdb`], [`port`], [`uplink`]) moves frames
//! between ports, and [`tap`] joins a TAP device to it as the uplink;
//! [`rx_queue`] serves local RX rings (TX is a chain at a time, so
//! `models::LocalQueue<TxDevice>` serves it), as `ServedQueue`s for the
//! vhost-style worker or a sidecore. The
//! synthetic guests and the harness are in the vrio-testkit crate.
//! Remote sidecores serve the same models over the fabric:
//! `remote::RemoteQueue<TxDevice>` and `remote::RemoteRxQueue`, with the
//! I/O server's switch in `remote::net_devices`.
//!
//! **TX** is per chain: [`TxDevice`] implements the [`DeviceModel`] seam,
//! like virtio-blk. **RX** is per frame over several chains, because with
//! MRG_RXBUF the first chain's header says how many chains the frame took;
//! and RX work exists only when a frame waits *and* buffers are there. The
//! seam for the first is [`RxDevice::fit`] + [`RxDevice::deliver`] over
//! chains the queue holds; for the second, [`FrameSource`] (peek, pop, and
//! `arm` to be woken by the next frame). See `rx.rs` for the details.
//!
//! Offered offload: CSUM only, completed in software at TX ([`checksum`]).
//! Not offered: GUEST_CSUM, segmentation offloads, CTRL_VQ, MQ (see
//! `features.rs`).
//!
//! [`GuestMemory`]: crate::memory::GuestMemory
//! [`DescriptorChain`]: crate::ring::DescriptorChain
//! [`DeviceModel`]: crate::device::DeviceModel

pub mod checksum;
pub mod config;
mod copy;
pub mod fdb;
pub mod features;
pub mod frame;
pub mod header;
pub mod mac;
pub mod port;
pub mod rx;
pub mod rx_queue;
pub mod stats;
pub mod switch;
pub mod tap;
pub mod tx;
pub mod uplink;

pub use config::{config_space, NetConfig, CONFIG_LEN, RX_QUEUE, TX_QUEUE};
pub use copy::{gather, scatter};
pub use features::{device_features, FeatureError, NetFeatures};
pub use frame::{parse_frame, EthAddrs, FrameError, FrameLimits};
pub use header::{HeaderError, NetHeader, HDR_LEN};
pub use mac::MacAddr;
pub use port::{Port, PortId, PortKind};
pub use rx::{Fit, FrameSource, RxChainError, RxDevice};
pub use rx_queue::NetRxQueue;
pub use stats::{DropReason, PortSnapshot, PortStats};
pub use switch::{Forwarded, Switch, SwitchConfig};
pub use tap::{Tap, TapError, TapUplink};
pub use tx::TxDevice;
pub use uplink::{CaptureUplink, Uplink, UplinkError};
