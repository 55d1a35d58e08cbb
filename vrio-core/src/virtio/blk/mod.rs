//! The virtio-blk device model (virtio 1.2 §5.2): feature bits, config
//! space, request parsing and execution over a storage back-end trait.
//!
//! [`BlockDevice`] turns one validated descriptor chain into back-end I/O
//! and a status byte. It reaches guest memory only through
//! [`GuestMemory`](crate::virtio::memory::GuestMemory), so the same code
//! serves local rings and rings reached over RDMA.

mod backend;
mod config;
mod device;
mod error;
mod features;
mod request;

pub(crate) use backend::{check_range, read_only_error};
pub use backend::{id_from_str, BlockBackend};
pub use config::{config_space, BlockConfig};
pub use device::BlockDevice;
pub use error::BlkError;
pub use features::device_features;
pub use request::{RequestHeader, RequestLayout, HEADER_SIZE};

/// Requests address the disk in 512-byte sectors, whatever `blk_size` says.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
