//! The I/O server's staging buffer: where READs land and WRITEs leave from.
//!
//! The device model runs over [`StagedChain`], a [`GuestMemory`] view that
//! maps the chain's guest segments onto the staging bytes, and nothing else.
//! So the unchanged virtio-blk code serves remote guests, and whatever it
//! touches goes over the fabric in one batch per direction.

use std::cell::UnsafeCell;

use crate::virtio::memory::{GuestMemory, MemoryError};
use crate::virtio::ring::DescriptorChain;

/// Page-aligned memory registered with the fabric.
pub struct StagingBuffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this struct; the remote queue
// that owns it is moved between threads as a whole, never shared.
unsafe impl Send for StagingBuffer {}

impl StagingBuffer {
    pub fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: anonymous private mapping with no address hint; the result
        // is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }

    /// Copies `src` into the buffer at `off`.
    pub fn put(&mut self, off: usize, src: &[u8]) -> Result<(), MemoryError> {
        let end = off.checked_add(src.len()).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(MemoryError::OutOfBounds {
                addr: off as u64,
                len: src.len() as u64,
            });
        }
        // SAFETY: `off + src.len() <= len` was checked; the buffer is ours
        // and no fabric operation targets it while the sidecore writes it
        // (operations are waited for before the buffer is reused).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) };
        Ok(())
    }

    /// Zeroes `len` bytes at `off`.
    pub fn zero(&mut self, off: usize, len: usize) -> Result<(), MemoryError> {
        let end = off.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(MemoryError::OutOfBounds {
                addr: off as u64,
                len: len as u64,
            });
        }
        // SAFETY: bounds checked above; see `put` for why no DMA races.
        unsafe { std::ptr::write_bytes(self.ptr.add(off), 0, len) };
        Ok(())
    }

    /// Reads `dst.len()` bytes at `off`.
    pub fn get(&self, off: usize, dst: &mut [u8]) -> Result<(), MemoryError> {
        let end = off.checked_add(dst.len()).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(MemoryError::OutOfBounds {
                addr: off as u64,
                len: dst.len() as u64,
            });
        }
        // SAFETY: bounds checked above; see `put` for why no DMA races.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and the
        // fabric registration that referenced it was dropped first (the
        // owner declares the region field before the buffer).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// One chain's view of the staging buffer: segment i of the chain lives at
/// staging offset `offsets[i]` (readable segments first, then writable).
pub struct StagedChain<'a> {
    pub buf: &'a UnsafeCell<StagingBuffer>,
    pub chain: &'a DescriptorChain,
    pub base: usize,
}

impl StagedChain<'_> {
    /// Staging bytes this chain needs.
    pub fn bytes_needed(chain: &DescriptorChain) -> u64 {
        chain.readable_len() + chain.writable_len()
    }

    fn locate(&self, addr: u64, len: usize, writable: bool) -> Result<usize, MemoryError> {
        locate(self.chain, self.base, addr, len, writable).ok_or(MemoryError::OutOfBounds {
            addr,
            len: len as u64,
        })
    }
}

/// Maps `addr..addr+len` to a staging offset when it lies inside one
/// segment of `chain`, staged from `base` (`writable` selects which part).
fn locate(
    chain: &DescriptorChain,
    base: usize,
    addr: u64,
    len: usize,
    writable: bool,
) -> Option<usize> {
    let mut off = base;
    let segs = chain
        .readable
        .iter()
        .map(|s| (s, false))
        .chain(chain.writable.iter().map(|s| (s, true)));
    for (s, w) in segs {
        let end = s.addr + u64::from(s.len);
        if w == writable && addr >= s.addr && addr.saturating_add(len as u64) <= end {
            return Some(off + (addr - s.addr) as usize);
        }
        off += s.len as usize;
    }
    None
}

impl GuestMemory for StagedChain<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.locate(addr, buf.len(), false)?;
        // SAFETY: single-threaded use by the owning sidecore; no other
        // reference to the buffer is live during the device call.
        unsafe { &*self.buf.get() }.get(off, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let off = self.locate(addr, buf.len(), true)?;
        // SAFETY: as in `read`; the device call holds the only access.
        unsafe { &mut *self.buf.get() }.put(off, buf)
    }
}

/// Several write-only chains staged back to back from `base`, in order: the
/// view an RX frame spread over mergeable buffers is written through.
/// Bytes outside `base..limit` are refused, so a guest that posts
/// overlapping buffers garbles only its own frame.
pub struct StagedChains<'a> {
    pub buf: &'a UnsafeCell<StagingBuffer>,
    pub chains: &'a [DescriptorChain],
    pub base: usize,
    pub limit: usize,
}

impl StagedChains<'_> {
    fn locate(&self, addr: u64, len: usize) -> Result<usize, MemoryError> {
        let mut base = self.base;
        for c in self.chains {
            if let Some(off) = locate(c, base, addr, len, true) {
                if off + len <= self.limit {
                    return Ok(off);
                }
                break;
            }
            base += StagedChain::bytes_needed(c) as usize;
        }
        Err(MemoryError::OutOfBounds {
            addr,
            len: len as u64,
        })
    }
}

impl GuestMemory for StagedChains<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.locate(addr, buf.len())?;
        // SAFETY: single-threaded use by the owning sidecore; no other
        // reference to the buffer is live during the device call.
        unsafe { &*self.buf.get() }.get(off, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let off = self.locate(addr, buf.len())?;
        // SAFETY: as in `read`; the device call holds the only access.
        unsafe { &mut *self.buf.get() }.put(off, buf)
    }
}
