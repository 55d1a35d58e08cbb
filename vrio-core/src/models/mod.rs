//! The local I/O models the remote one is compared against, on the same
//! device code: vhost-style (a worker per device woken by every kick) and
//! local sidecore (Elvis: a polling core for many queues).

mod local_queue;
mod runner;
mod vhost_style;

pub use local_queue::{DeviceSide, LocalQueue};
pub use runner::{
    attach_guests, attach_guests_placed, drive_guests, make_guests, queue_workload, run_local,
    run_remote, run_remote_with, serve_local, LocalModel, ModelReport, RemoteFigures, RunConfig,
    RunError,
};
pub use vhost_style::VhostWorker;
