//! The I/O server's staging buffer: where READs land and WRITEs leave from.
//!
//! The device model runs over [`StagedChain`], a [`GuestMemory`] view that
//! maps the chain's guest segments onto the staging bytes, and nothing else.
//! So the unchanged virtio-blk code serves remote guests, and whatever it
//! touches goes over the fabric in one batch per direction.

use std::cell::{RefCell, UnsafeCell};

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

    /// The `len` bytes at `off`, in place.
    pub fn slice_mut(&mut self, off: usize, len: usize) -> Result<&mut [u8], MemoryError> {
        let end = off.checked_add(len).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(MemoryError::OutOfBounds {
                addr: off as u64,
                len: len as u64,
            });
        }
        // SAFETY: bounds checked above; the slice borrows `self` mutably, so
        // nothing else reaches these bytes while it lives (see `put` for
        // why no DMA races).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) })
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
/// What the device writes into the writable part is recorded in `written`.
pub struct StagedChain<'a> {
    pub buf: &'a UnsafeCell<StagingBuffer>,
    pub chain: &'a DescriptorChain,
    pub base: usize,
    pub written: &'a Written,
}

/// The ranges of a chain's writable part that its device wrote, as offsets
/// into that part: all the server WRITEs back. Bytes the device left alone
/// are not sent, so the guest keeps its own there and nothing stale in the
/// staging buffer (earlier requests' data, ciphertext an interposed stage
/// left) can reach it, without zeroing the staging bytes of every request
/// first.
#[derive(Debug, Default)]
pub struct Written(RefCell<Vec<(u64, u64)>>);

impl Written {
    /// Forgets every range (before the next chain).
    pub fn clear(&self) {
        self.0.borrow_mut().clear();
    }

    /// Adds `start..end`; joins it to the last range when they touch (a
    /// device writes its data, then the status byte after it).
    fn add(&self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut v = self.0.borrow_mut();
        if let Some(last) = v.last_mut() {
            if start <= last.1 && end >= last.0 {
                *last = (last.0.min(start), last.1.max(end));
                return;
            }
        }
        v.push((start, end));
    }

    /// The ranges, sorted and merged, into `out` (cleared first).
    pub fn merged_into(&self, out: &mut Vec<(u64, u64)>) {
        out.clear();
        out.extend_from_slice(&self.0.borrow());
        out.sort_unstable();
        let mut w = 0;
        for i in 0..out.len() {
            if w > 0 && out[i].0 <= out[w - 1].1 {
                out[w - 1].1 = out[w - 1].1.max(out[i].1);
            } else {
                out[w] = out[i];
                w += 1;
            }
        }
        out.truncate(w);
    }
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
        unsafe { &mut *self.buf.get() }.put(off, buf)?;
        let at = (off - self.base) as u64 - self.chain.readable_len();
        self.written.add(at, at + buf.len() as u64);
        Ok(())
    }
    /// The chain's segments are staged back to back, readable part first:
    /// any run of either part is one run of staging bytes.
    fn lend_chain_part(
        &self,
        writable: bool,
        skip: u64,
        len: u64,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> bool {
        let (start, part) = if writable {
            (self.chain.readable_len(), self.chain.writable_len())
        } else {
            (0, self.chain.readable_len())
        };
        let fits = skip.checked_add(len).is_some_and(|end| end <= part);
        let off = start
            .checked_add(skip)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| o.checked_add(self.base));
        let (true, Some(off), Ok(len)) = (fits, off, usize::try_from(len)) else {
            return false;
        };
        // SAFETY: single-threaded use by the owning sidecore, as in `read`;
        // the slice lives only for the call of `f`, during which the device
        // call holds the only access.
        match unsafe { &mut *self.buf.get() }.slice_mut(off, len) {
            Ok(s) => {
                f(s);
                if writable {
                    // The borrower leaves every lent byte defined (the
                    // trait's contract).
                    self.written.add(skip, skip + len as u64);
                }
                true
            }
            Err(_) => false,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ring::Segment;

    /// A 4 KiB virtio-blk read: header at 0x1000, data at 0x3000, status
    /// at 0x4000.
    fn read_4k() -> DescriptorChain {
        let seg = |addr, len| Segment { addr, len };
        DescriptorChain {
            head: 0,
            readable: vec![seg(0x1000, 16)],
            writable: vec![seg(0x3000, 4096), seg(0x4000, 1)],
            descriptors: 3,
            indirect: false,
        }
    }

    #[test]
    fn a_staged_chain_lends_either_part_in_place_and_nothing_past_it() {
        let chain = DescriptorChain {
            head: 0,
            readable: vec![
                Segment {
                    addr: 0x1000,
                    len: 16,
                },
                Segment {
                    addr: 0x2000,
                    len: 512,
                },
            ],
            writable: vec![
                Segment {
                    addr: 0x3000,
                    len: 1024,
                },
                Segment {
                    addr: 0x4000,
                    len: 1,
                },
            ],
            descriptors: 4,
            indirect: false,
        };
        let buf = UnsafeCell::new(StagingBuffer::new(8192).unwrap());
        let written = Written::default();
        let view = StagedChain {
            buf: &buf,
            chain: &chain,
            base: 100,
            written: &written,
        };
        view.write(0x4000, &[7]).unwrap();
        let mut got = Vec::new();
        written.merged_into(&mut got);
        assert_eq!(got, [(1024, 1025)], "the status byte, at the part's end");
        // The writable part: 1024 data bytes, then the status byte.
        let mut seen = 0;
        assert!(view.lend_chain_part(true, 0, 1025, &mut |b| {
            seen = b.len();
            assert_eq!(b[1024], 7, "the status byte follows the data");
            b[0] = 9;
        }));
        assert_eq!(seen, 1025);
        written.merged_into(&mut got);
        assert_eq!(got, [(0, 1025)], "the lent part joins the status byte");
        let mut x = [0u8; 1];
        // The writable part is not readable.
        view.read(0x3000, &mut x).unwrap_err();
        // SAFETY: no view is using the buffer now.
        unsafe { &*buf.get() }.get(100 + 528, &mut x).unwrap();
        assert_eq!(x[0], 9, "written in place, at the writable part's offset");
        // The readable part after a 16-byte header.
        view.lend_chain_part(false, 16, 512, &mut |b| b.fill(5));
        view.read(0x2000, &mut x).unwrap();
        assert_eq!(x[0], 5);
        // Past either part, or an overflowing range: nothing lent.
        let mut called = false;
        for (w, skip, len) in [(false, 16, 513), (true, 1, 1025), (true, u64::MAX, 2)] {
            assert!(!view.lend_chain_part(w, skip, len, &mut |_| called = true));
        }
        assert!(!called);
        // Reading lends nothing the server would send back.
        written.clear();
        view.lend_chain_part(false, 0, 16, &mut |_| {});
        written.merged_into(&mut got);
        assert!(got.is_empty());
    }

    #[test]
    fn written_ranges_merge_in_any_order() {
        let w = Written::default();
        let mut got = Vec::new();
        w.merged_into(&mut got);
        assert!(got.is_empty());
        for (a, b) in [(10, 20), (30, 40), (0, 5), (5, 10), (35, 50), (60, 60)] {
            w.add(a, b);
        }
        w.merged_into(&mut got);
        assert_eq!(got, [(0, 20), (30, 50)]);
        w.clear();
        w.merged_into(&mut got);
        assert!(got.is_empty());
    }

    /// A remote request's data goes between the back-end and the staging
    /// buffer with no bounce buffer, both ways.
    #[test]
    fn the_block_device_serves_a_staged_chain_without_a_bounce_buffer() {
        use crate::blk::{BlockConfig, BlockDevice, MemoryBackend};
        use std::sync::Arc;
        let backend = Arc::new(MemoryBackend::new(64 * 512));
        let mut blk = BlockDevice::new(backend, BlockConfig::default());
        let chain = |t: u32| {
            if t != 1 {
                return read_4k();
            }
            DescriptorChain {
                head: 0,
                readable: vec![
                    Segment {
                        addr: 0x1000,
                        len: 16,
                    },
                    Segment {
                        addr: 0x2000,
                        len: 4096,
                    },
                ],
                writable: vec![Segment {
                    addr: 0x4000,
                    len: 1,
                }],
                descriptors: 3,
                indirect: false,
            }
        };
        let buf = UnsafeCell::new(StagingBuffer::new(16384).unwrap());
        let mut hdr = [0u8; 16];
        // VIRTIO_BLK_T_OUT of 4 KiB at sector 8.
        hdr[0] = 1;
        hdr[8] = 8;
        let w = chain(1);
        let written = Written::default();
        let view = StagedChain {
            buf: &buf,
            chain: &w,
            base: 0,
            written: &written,
        };
        // SAFETY: no view uses the buffer between device calls.
        unsafe { &mut *buf.get() }.put(0, &hdr).unwrap();
        // SAFETY: no view uses the buffer between device calls.
        unsafe { &mut *buf.get() }.put(16, &[0xab; 4096]).unwrap();
        blk.process(&view, &w).unwrap();
        hdr[0] = 0; // VIRTIO_BLK_T_IN
        let r = chain(0);
        let view = StagedChain {
            buf: &buf,
            chain: &r,
            base: 8192,
            written: &written,
        };
        // SAFETY: no view uses the buffer between device calls.
        unsafe { &mut *buf.get() }.put(8192, &hdr).unwrap();
        assert_eq!(blk.process(&view, &r).unwrap(), 4097);
        let mut back = vec![0u8; 4097];
        view.read(0x3000, &mut back[..1]).unwrap_err();
        // SAFETY: no view uses the buffer between device calls.
        unsafe { &*buf.get() }.get(8192 + 16, &mut back).unwrap();
        assert!(
            back[..4096].iter().all(|&b| b == 0xab),
            "read back what was written"
        );
        assert_eq!(back[4096], 0, "status OK");
        assert_eq!(blk.bounce_len(), 0, "no bounce buffer");
        let mut got = Vec::new();
        written.merged_into(&mut got);
        assert_eq!(got, [(0, 4097)], "data and status go back");
    }

    /// A read the back-end fails leaves no stale staging bytes to send back:
    /// the lent data is zeroed, and the status says IOERR.
    #[test]
    fn a_failed_read_sends_back_zeroes_not_stale_bytes() {
        use crate::blk::{BlockConfig, BlockDevice};
        use crate::virtio::blk::BlockBackend;
        use std::sync::Arc;
        struct Failing;
        impl BlockBackend for Failing {
            fn capacity(&self) -> u64 {
                2048
            }
            fn read_only(&self) -> bool {
                false
            }
            fn id(&self) -> [u8; crate::virtio::blk::ID_BYTES] {
                [0; crate::virtio::blk::ID_BYTES]
            }
            fn read_vectored_at(
                &self,
                _: u64,
                bufs: &mut [std::io::IoSliceMut<'_>],
            ) -> std::io::Result<()> {
                // Half a read, then an error.
                let n = bufs[0].len() / 2;
                bufs[0][..n].fill(0x11);
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
            fn write_vectored_at(&self, _: u64, _: &[std::io::IoSlice<'_>]) -> std::io::Result<()> {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
            fn flush(&self) -> std::io::Result<()> {
                Ok(())
            }
            fn discard(&self, _: u64, _: u64) -> std::io::Result<()> {
                Ok(())
            }
            fn write_zeroes(&self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut blk = BlockDevice::new(Arc::new(Failing), BlockConfig::default());
        let chain = read_4k();
        let buf = UnsafeCell::new(StagingBuffer::new(8192).unwrap());
        // Another guest's data, left in the staging buffer.
        // SAFETY: no view uses the buffer between device calls.
        unsafe { &mut *buf.get() }.put(0, &[0xee; 8192]).unwrap();
        // SAFETY: as above.
        unsafe { &mut *buf.get() }.put(0, &[0u8; 16]).unwrap(); // VIRTIO_BLK_T_IN
        let written = Written::default();
        let view = StagedChain {
            buf: &buf,
            chain: &chain,
            base: 0,
            written: &written,
        };
        assert_eq!(blk.process(&view, &chain).unwrap(), 1, "status only");
        let mut got = Vec::new();
        written.merged_into(&mut got);
        let mut back = vec![0u8; 4097];
        // SAFETY: no view uses the buffer between device calls.
        unsafe { &*buf.get() }.get(16, &mut back).unwrap();
        assert_eq!(got, [(0, 4097)], "the lent data and the status go back");
        assert!(
            back[..4096].iter().all(|&x| x == 0),
            "a byte sent back holds stale or partial data"
        );
        assert_eq!(back[4096], 1, "IOERR");
    }
}
