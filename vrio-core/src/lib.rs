//! vrio-core: the split-virtqueue engine, the virtio-blk device model,
//! sidecores, and the two local I/O models (vhost-style and local sidecore)
//! that the remote model is compared against.
//!
//! See `docs/architecture.md` for a tour.

pub mod blk;
mod cputime;
pub mod models;
pub mod net;
pub mod proto;
pub mod remote;
pub mod sidecore;
pub mod vhost_user;
pub mod virtio;

pub use virtio::{device, memory, ring};

pub use memory::{
    memory_from_fds, memory_from_pointers, GuestMemory, GuestRegion, LocalMemory, MemoryError,
    MemoryMap,
};
