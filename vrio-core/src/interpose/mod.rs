//! Programmable interposition on the I/O server (the seed's second claim):
//! every guest's I/O passes one place, where policy applies without
//! touching the VM hosts.
//!
//! A device has a chain of [`Stage`]s, built from a [`PolicySpec`]
//! (JSON, kept by the controller) into a [`Pipeline`]. For blk the chain
//! sits between the parsed request and the back-end, for net between a
//! guest's TX port and the switch. A stage may hold a request back
//! ([`Admit::Wait`]: it waits in its queue while the sidecore serves other
//! queues), refuse it with a virtio status ([`Admit::Refuse`]), transform
//! its data, or only watch it complete.
//!
//! Built-in stages: [`QosStage`] (IOPS and bandwidth limits),
//! [`XtsStage`] (AES-XTS-256 at rest), [`Meter`] (ops, bytes, latency),
//! [`FaultStage`] (errors and delays on a sector range), [`AclStage`] and
//! [`NetRateStage`] (source filter and rate limit on frames).
//!
//! Policies change live: [`Policies::set`] swaps a device's pipeline, and
//! each of its queues picks the new one up at its next batch
//! ([`Interposed`]). A device with no stages costs its queues one atomic
//! load per batch. See `docs/interposition.md`.

mod crypt;
mod fault;
mod meter;
mod net;
mod params;
mod pipeline;
mod qos;
mod request;
mod spec;
mod stage;

pub use crypt::XtsStage;
pub use fault::FaultStage;
pub use meter::{Meter, QueueMeter, LATENCY_BOUNDS};
pub use net::{frame_info, AclStage, NetRateStage};
pub use params::{
    CryptSpec, FaultSpec, MeterSpec, NetAclSpec, NetRateSpec, QosSpec, Secret, REDACTED,
};
pub use pipeline::{Interposed, Interposer, Pipeline, Policies};
pub use qos::QosStage;
pub use request::{Admit, FrameInfo, Op, Refusal, Request};
pub use spec::{PolicyError, PolicySpec, StageSpec};
pub use stage::{LatencyHistogram, Stage, StageCounter, StageReport};

#[cfg(test)]
mod tests;
