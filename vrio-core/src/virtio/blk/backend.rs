//! The storage a [`BlockDevice`](super::BlockDevice) executes requests on.

use std::io::{self, IoSlice, IoSliceMut};

use super::ID_BYTES;

/// A block store addressed in bytes. Shared by the devices of all queues
/// (and sidecores), hence `Send + Sync` and `&self` everywhere.
///
/// Offsets and lengths handed in by [`BlockDevice`](super::BlockDevice) are
/// already checked against [`Self::capacity`]; implementations still refuse
/// out-of-range accesses with `InvalidInput` rather than trusting callers.
pub trait BlockBackend: Send + Sync {
    /// Size in 512-byte sectors.
    fn capacity(&self) -> u64;
    /// Whether writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool;
    /// The GET_ID serial: 20 bytes, zero-padded when shorter.
    fn id(&self) -> [u8; ID_BYTES];
    /// Fills every buffer, in order, from `offset`; short reads are errors.
    fn read_vectored_at(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()>;
    /// Writes every buffer, in order, at `offset`.
    fn write_vectored_at(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a range; it reads as zeros afterwards in both backends here.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range, deallocating it if `may_unmap`.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
}

/// A GET_ID serial from a string: truncated to 20 bytes, zero-padded.
pub fn id_from_str(s: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = s.len().min(ID_BYTES);
    id[..n].copy_from_slice(&s.as_bytes()[..n]);
    id
}

/// `InvalidInput` unless `offset..offset+len` lies within `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset:#x}+{len:#x} is beyond the device size {size:#x}"),
        )),
    }
}

pub(crate) fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "backend is read-only")
}
