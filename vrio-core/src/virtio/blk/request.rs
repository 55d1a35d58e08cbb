//! Where the parts of a virtio-blk request sit in a descriptor chain
//! (§5.2.6): the 16-byte header at the start of the device-readable part
//! (possibly split across descriptors), data after it or in the writable
//! part, and the status byte as the very last writable byte.

use super::error::BlkError;
use crate::virtio::memory::{GuestMemory, MemoryError};
use crate::virtio::ring::{DescriptorChain, Segment};

/// `struct virtio_blk_outhdr`: le32 type, le32 reserved, le64 sector.
pub const HEADER_SIZE: u64 = 16;

/// The decoded `struct virtio_blk_outhdr` (the reserved word dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `VIRTIO_BLK_T_*`.
    pub request_type: u32,
    /// First 512-byte sector of the request.
    pub sector: u64,
}

impl RequestHeader {
    /// Decodes the 16 header bytes.
    pub fn from_bytes(b: &[u8; HEADER_SIZE as usize]) -> Self {
        let mut s = [0u8; 8];
        s.copy_from_slice(&b[8..16]);
        Self {
            request_type: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            sector: u64::from_le_bytes(s),
        }
    }

    /// Encodes the 16 header bytes (reserved zero).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE as usize] {
        let mut b = [0u8; HEADER_SIZE as usize];
        b[0..4].copy_from_slice(&self.request_type.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// A parsed request: its header and the extent of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLayout {
    /// The request's header.
    pub header: RequestHeader,
    /// Device-readable bytes after the header (OUT data, discard ranges).
    pub out_len: u64,
    /// Device-writable bytes before the status byte (IN data, GET_ID).
    pub in_len: u64,
    /// Guest address of the status byte.
    pub status_addr: u64,
}

impl RequestLayout {
    /// Reads the header and locates the status byte. Fails only when the
    /// chain cannot be a virtio-blk request at all.
    pub fn parse<M: GuestMemory + ?Sized>(
        mem: &M,
        chain: &DescriptorChain,
    ) -> Result<Self, BlkError> {
        // Zero-length descriptors are legal, so skip them to find the last byte.
        let status_addr = chain
            .writable
            .iter()
            .rev()
            .find(|s| s.len > 0)
            .map(|s| s.addr + u64::from(s.len) - 1)
            .ok_or(BlkError::NoStatusByte)?;
        let readable = chain.readable_len();
        if readable < HEADER_SIZE {
            return Err(BlkError::HeaderTooShort { len: readable });
        }
        let mut h = [0u8; HEADER_SIZE as usize];
        read_segments(mem, &chain.readable, 0, &mut h)?;
        Ok(Self {
            header: RequestHeader::from_bytes(&h),
            out_len: readable - HEADER_SIZE,
            in_len: chain.writable_len() - 1,
            status_addr,
        })
    }
}

/// Visits the guest ranges covering bytes `skip..skip+len` of `segs`, as
/// (guest address, offset into the range, length). Errors if `segs` is short.
fn for_each_range(
    segs: &[Segment],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    let mut done = 0usize;
    for s in segs {
        if done == len {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        // `slen - skip` fits in u32, hence in usize.
        let n = ((slen - skip) as usize).min(len - done);
        // The walker checked addr+len against the memory map: no overflow.
        f(s.addr + skip, done, n)?;
        done += n;
        skip = 0;
    }
    if done < len {
        return Err(MemoryError::Access {
            addr: 0,
            reason: format!("chain holds {done} of the {len} bytes the request needs"),
        });
    }
    Ok(())
}

/// Copies bytes `skip..skip+buf.len()` of the chain part `segs` into `buf`.
pub(super) fn read_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), MemoryError> {
    let len = buf.len();
    for_each_range(segs, skip, len, |addr, off, n| {
        mem.read(addr, &mut buf[off..off + n])
    })
}

/// Copies `buf` into bytes `skip..skip+buf.len()` of the chain part `segs`.
pub(super) fn write_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    skip: u64,
    buf: &[u8],
) -> Result<(), MemoryError> {
    for_each_range(segs, skip, buf.len(), |addr, off, n| {
        mem.write(addr, &buf[off..off + n])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::memory::anonymous_memory;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr, len }
    }

    #[test]
    fn header_split_over_three_descriptors_and_status_after_empty_one() {
        let mem = anonymous_memory(0x10000).unwrap();
        let h = RequestHeader {
            request_type: 0x0a0b_0c0d,
            sector: 0x1122_3344_5566_7788,
        }
        .to_bytes();
        mem.write(0x1000, &h[..3]).unwrap();
        mem.write(0x2000, &h[3..12]).unwrap();
        mem.write(0x3000, &h[12..]).unwrap();
        let chain = DescriptorChain {
            readable: vec![seg(0x1000, 3), seg(0x2000, 9), seg(0x3000, 4 + 100)],
            writable: vec![seg(0x4000, 512), seg(0x5000, 1), seg(0x6000, 0)],
            ..Default::default()
        };
        let r = RequestLayout::parse(&mem, &chain).unwrap();
        assert_eq!(r.header.request_type, 0x0a0b_0c0d);
        assert_eq!(r.header.sector, 0x1122_3344_5566_7788);
        assert_eq!(r.out_len, 100);
        assert_eq!(r.in_len, 512);
        assert_eq!(r.status_addr, 0x5000);
    }

    #[test]
    fn unusable_chains_are_errors() {
        let mem = anonymous_memory(0x10000).unwrap();
        let no_status = DescriptorChain {
            readable: vec![seg(0x1000, 16)],
            writable: vec![seg(0x2000, 0)],
            ..Default::default()
        };
        assert_eq!(
            RequestLayout::parse(&mem, &no_status),
            Err(BlkError::NoStatusByte)
        );
        let short = DescriptorChain {
            readable: vec![seg(0x1000, 10), seg(0x1100, 5)],
            writable: vec![seg(0x2000, 1)],
            ..Default::default()
        };
        assert_eq!(
            RequestLayout::parse(&mem, &short),
            Err(BlkError::HeaderTooShort { len: 15 })
        );
    }

    #[test]
    fn segment_copies_honour_skip_and_refuse_short_chains() {
        let mem = anonymous_memory(0x10000).unwrap();
        let segs = [seg(0x1000, 4), seg(0x2000, 0), seg(0x3000, 8)];
        write_segments(&mem, &segs, 2, b"abcdefgh").unwrap();
        let mut b = [0u8; 12];
        read_segments(&mem, &segs, 0, &mut b).unwrap();
        assert_eq!(&b[2..10], b"abcdefgh");
        assert!(read_segments(&mem, &segs, 5, &mut [0u8; 8]).is_err());
    }
}
