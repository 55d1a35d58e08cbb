//! The virtio-net device model (virtio 1.2 §5.1), without the switch:
//! [`header`] and [`frame`] parse what a guest sends; [`config`] and
//! [`features`] are what the device advertises; [`tx`] and [`rx`] are the
//! device proper, written over [`GuestMemory`] and [`DescriptorChain`] only,
//! so the I/O server runs them over staged chains. TX sends into a
//! [`FrameSink`] and RX takes from a [`FrameSource`]: in vrio, a port of
//! the switch (`net`).
//!
//! [`GuestMemory`]: crate::virtio::memory::GuestMemory
//! [`DescriptorChain`]: crate::virtio::ring::DescriptorChain

pub mod checksum;
pub mod config;
mod copy;
pub mod drop_reason;
pub mod features;
pub mod frame;
pub mod header;
pub mod mac;
pub mod rx;
pub mod tx;

pub use config::{config_space, NetConfig, CONFIG_LEN, RX_QUEUE, TX_QUEUE};
pub use copy::{gather, scatter};
pub use drop_reason::DropReason;
pub use features::{device_features, FeatureError, NetFeatures};
pub use frame::{parse_frame, EthAddrs, FrameError, FrameLimits};
pub use header::{HeaderError, NetHeader, HDR_LEN};
pub use mac::MacAddr;
pub use rx::{Fit, FrameSource, RxChainError, RxDevice};
pub use tx::{FrameSink, TxDevice};
