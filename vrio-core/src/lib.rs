//! vrio-core: the split-virtqueue engine, the virtio-blk device model,
//! sidecores, and the two local I/O models (vhost-style and local sidecore)
//! that the remote model is compared against.
//!
//! See `docs/architecture.md` for a tour.

pub mod memory;
pub mod ring;

pub use memory::{GuestMemory, GuestRegion, LocalMemory, MemoryError, MemoryMap};
