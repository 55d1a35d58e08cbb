//! vrio-rdma: the fabric. One-sided verbs (READ, WRITE, WRITE_WITH_IMM) plus
//! SEND/RECV over reliable connected endpoints, with two back-ends that share
//! one API and one conformance suite:
//!
//! - `verbs`: real RDMA through sideway (RoCE, InfiniBand, Soft-RoCE);
//! - `soft`: the same semantics in user space over TCP or Unix sockets;
//! - `shm`: the same semantics between processes on one host, with READ
//!   and WRITE done as copies by the initiator (the target spends no CPU).
//!
//! Feature `sim` adds [`sim`]: the same semantics in memory, with no threads
//! or clocks, stepped by a test harness's seeded rng (deterministic protocol
//! tests).
//!
//! The API mirrors verbs closely on purpose: work requests name local memory
//! by `(lkey, addr, len)` and remote memory by `(rkey, addr)`, and every
//! outcome (including protection faults and dead peers) arrives as a
//! [`Completion`] with a [`WcStatus`], never as a panic.
//!
//! Entry points: [`open`] (or [`open_auto`], which falls back to `soft` when
//! there is no RDMA device) gives a boxed [`Domain`]; register memory
//! with [`Domain::register`], connect with [`Domain::listen`] /
//! [`Listener::accept`] or [`Domain::connect`], then post and poll work
//! requests on the [`Endpoint`]. [`AsyncEndpoint`] awaits completions on
//! tokio. Everything in [`api`] is re-exported at the crate root; the
//! back-end modules are only needed for back-end specific types, and
//! [`conformance`] is the suite every back-end must pass.
//!
//! See `docs/fabric.md`.

#![deny(missing_docs)]

mod accept;
mod access;
pub mod api;
pub mod async_endpoint;
pub mod conformance;
mod eventfd;
mod ratelimit;
pub mod select;
pub mod shm;
#[cfg(feature = "sim")]
pub mod sim;
pub mod soft;
#[cfg(feature = "verbs")]
pub mod verbs;

pub use api::*;
pub use async_endpoint::AsyncEndpoint;
pub use ratelimit::WarnLimiter;
pub use select::{open, open_auto};
