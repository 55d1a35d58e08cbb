//! virtio-blk: the device model (in `virtio::blk`, re-exported here) and
//! the storage back-ends behind its [`BlockBackend`] trait: a file
//! ([`FileBackend`]) or memory ([`MemoryBackend`]).

mod file_backend;
mod memory_backend;

pub use crate::virtio::blk::*;
pub use file_backend::FileBackend;
pub use memory_backend::MemoryBackend;

#[cfg(test)]
mod tests;
