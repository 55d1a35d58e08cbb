//! The local I/O models the remote one is compared against, on the same
//! device code: vhost-style (a worker per device woken by every kick) and
//! local sidecore (Elvis: a polling core for many queues).

mod local_queue;
pub(crate) mod local_ring;
mod vhost_style;

pub use local_queue::LocalQueue;
pub use vhost_style::VhostWorker;
