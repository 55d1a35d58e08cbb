//! Local copies of guest ring memory on the I/O server.
//!
//! The chain walker runs over a [`Shadow`]: ranges fetched by RDMA READ or
//! pushed in a doorbell, kept at their guest addresses. Anything not held
//! reads as `NotPresent`, which tells the server what to fetch; it is never
//! guessed. The walker validates the copy it acts on, so a guest that
//! rewrites its table afterwards cannot get past a check.

use crate::virtio::memory::{GuestMemory, MemoryError};

/// Guest bytes held at their guest addresses; reads of anything else fail
/// with [`MemoryError::NotPresent`]. Writes are refused.
#[derive(Debug, Default)]
pub struct Shadow {
    /// (guest address, bytes), few and small: a linear scan is fastest.
    ranges: Vec<(u64, Vec<u8>)>,
    /// Reused buffers, so steady state allocates nothing.
    spare: Vec<Vec<u8>>,
}

impl Shadow {
    /// Forgets every range, keeping the buffers for reuse.
    pub fn clear(&mut self) {
        for (_, mut b) in self.ranges.drain(..) {
            b.clear();
            self.spare.push(b);
        }
    }

    /// Adds (or replaces) the bytes at `gpa`.
    pub fn insert(&mut self, gpa: u64, bytes: &[u8]) {
        let mut b = self.spare.pop().unwrap_or_default();
        b.extend_from_slice(bytes);
        self.ranges.push((gpa, b));
    }

    /// A buffer of `len` zero bytes at `gpa`, to be filled by a READ.
    pub fn slot(&mut self, gpa: u64, len: usize) -> &mut Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.resize(len, 0);
        self.ranges.push((gpa, b));
        let last = self.ranges.len() - 1;
        &mut self.ranges[last].1
    }

    /// The `len` bytes at `addr`, if one range holds them all.
    pub fn get(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.find(addr, len)
    }

    fn find(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        // Latest insert wins: scan from the back.
        self.ranges.iter().rev().find_map(|(g, b)| {
            let bend = g + b.len() as u64;
            (addr >= *g && end <= bend).then(|| &b[(addr - g) as usize..(end - g) as usize])
        })
    }
}

impl GuestMemory for Shadow {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.find(addr, buf.len()).ok_or(MemoryError::NotPresent {
            addr,
            len: buf.len() as u64,
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        // The server never writes guest rings through a shadow.
        Err(MemoryError::Access {
            addr,
            reason: format!("shadow is read-only ({} bytes)", buf.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_what_it_holds() {
        let mut s = Shadow::default();
        s.insert(0x1000, &[1, 2, 3, 4]);
        let mut b = [0u8; 2];
        s.read(0x1001, &mut b).unwrap();
        assert_eq!(b, [2, 3]);
        assert_eq!(
            s.read(0x1003, &mut b),
            Err(MemoryError::NotPresent {
                addr: 0x1003,
                len: 2
            })
        );
        s.insert(0x1000, &[9, 9]);
        s.read(0x1000, &mut b).unwrap();
        assert_eq!(b, [9, 9]);
        s.clear();
        assert!(s.read(0x1000, &mut b).is_err());
        assert!(s.read(u64::MAX, &mut b).is_err());
    }
}
