//! Copies between a flat buffer and a chain's scattered segments.

use crate::virtio::memory::{GuestMemory, MemoryError};
use crate::virtio::ring::Segment;

/// Reads `out.len()` bytes starting `offset` bytes into `segs`. Returns the
/// bytes read: fewer when the segments end first.
pub fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    mut offset: u64,
    out: &mut [u8],
) -> Result<usize, MemoryError> {
    let mut done = 0;
    for s in segs {
        if done == out.len() {
            break;
        }
        let len = u64::from(s.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(out.len() - done);
        mem.read(s.addr + offset, &mut out[done..done + n])?;
        done += n;
        offset = 0;
    }
    Ok(done)
}

/// Writes `data` starting `offset` bytes into `segs`. Returns the bytes
/// written: fewer when the segments end first.
pub fn scatter<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[Segment],
    mut offset: u64,
    data: &[u8],
) -> Result<usize, MemoryError> {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let len = u64::from(s.len);
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = ((len - offset) as usize).min(data.len() - done);
        mem.write(s.addr + offset, &data[done..done + n])?;
        done += n;
        offset = 0;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::memory::anonymous_memory;

    #[test]
    fn round_trips_across_segments_at_any_offset() {
        let mem = anonymous_memory(0x4000).unwrap();
        let segs = [
            Segment {
                addr: 0x100,
                len: 3,
            },
            Segment { addr: 0x0, len: 0 },
            Segment {
                addr: 0x200,
                len: 5,
            },
            Segment {
                addr: 0x300,
                len: 4,
            },
        ];
        let data: Vec<u8> = (1..=12).collect();
        assert_eq!(scatter(&mem, &segs, 0, &data).unwrap(), 12);
        for off in 0..12u64 {
            let mut out = vec![0u8; 12 - off as usize];
            assert_eq!(gather(&mem, &segs, off, &mut out).unwrap(), out.len());
            assert_eq!(&out[..], &data[off as usize..]);
        }
        let mut big = [0u8; 20];
        assert_eq!(gather(&mem, &segs, 2, &mut big).unwrap(), 10);
        assert_eq!(scatter(&mem, &segs, 10, &[9, 9, 9]).unwrap(), 2);
    }
}
