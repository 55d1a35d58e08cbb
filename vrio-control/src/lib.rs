//! vrio control plane.
//!
//! The controller decides which sidecore on which I/O server serves each guest
//! queue. [`state::Controller`] holds the logic (pure, synchronous, clock passed
//! in); [`placement`] decides; [`store`] makes it survive restarts; [`service`]
//! exposes it over gRPC with bearer-token auth ([`auth`]).

pub mod agent;
pub mod auth;
pub mod client;
pub mod error;
pub mod model;
pub mod placement;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
#[cfg(feature = "etcd")]
pub mod store_etcd;
pub mod tls;

/// Generated protobuf and gRPC types.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("vrio.control.v1");

    /// Encoded descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/vrio_descriptor.bin"));
}

pub use error::ControlError;
pub use state::{Controller, ControllerConfig};
