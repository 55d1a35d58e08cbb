//! virtio without I/O: guest memory, the split-ring engine, the seam
//! between a queue and its device, and the device models of virtio-blk and
//! virtio-net. Nothing here starts a thread, waits on a file descriptor or
//! reads a clock; the models reach guest memory only through
//! [`memory::GuestMemory`], so the same code serves local rings (`models`,
//! `vhost_user`) and rings reached over the fabric (`proto`, `remote`).

pub mod blk;
pub mod device;
pub mod dirty_log;
pub mod memory;
pub mod net;
pub mod ring;
