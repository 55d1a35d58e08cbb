//! A vhost-user-blk front: unmodified VMMs (QEMU `vhost-user-blk-pci`) and
//! their guests' stock virtio_blk driver, served by a remote vrio I/O server
//! or, for comparison, by a local sidecore on this host.
//!
//! The VMM shares guest RAM (memfd) and the vrings over the vhost-user
//! socket; this back-end hands them to the VM-host agent
//! ([`crate::remote::attach`]), which registers the memory with the fabric
//! and never touches request data. Kicks are forwarded to the agent, the
//! agent's interrupts to the vring's call fd.
//!
//! - [`probe`]: learns the server's virtio-blk config space;
//! - [`backend`]: the `VhostUserBackend` (features, config, per-queue attach,
//!   remote or to the local sidecore);
//! - [`serve`](mod@serve): the socket loop (one VMM at a time, waits for reconnects);
//! - [`relay`]: a vhost-user interposer for what the daemon's handler
//!   lacks (early SET_VRING_ENABLE, inflight I/O tracking);
//! - [`inflight`]: the inflight region (INFLIGHT_SHMFD) and its bookkeeping;
//! - [`net`]: the same front as vhost-user-net (remote only).

pub mod backend;
pub mod inflight;
pub mod net;
pub mod probe;
pub mod relay;
pub mod serve;

pub use backend::{
    AttachHook, FrontConfig, LocalFront, Placement, RemoteFront, Serving, VrioBackend,
};
pub use net::{net_backend, serve_net};
pub use probe::{fetch_config, ProbeError, ServerDevice, PROBE_QUEUE};
pub use serve::{serve, serve_with, ServeError};
