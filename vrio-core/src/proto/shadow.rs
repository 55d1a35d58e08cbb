//! Local copies of guest ring memory on the I/O server.
//!
//! The chain walker runs over a [`Shadow`]: ranges fetched by RDMA READ or
//! pushed in a doorbell, kept at their guest addresses. Anything not held
//! reads as `NotPresent`, which tells the server what to fetch; it is never
//! guessed. The walker validates the copy it acts on, so a guest that
//! rewrites its table afterwards cannot get past a check.

use rustc_hash::FxHashMap;

use crate::virtio::memory::{GuestMemory, MemoryError};

/// Ranges up to this long are found by their start address alone (the
/// walker reads whole descriptors, at their start); longer ones (tables,
/// inline payloads) are scanned.
const SMALL: usize = 16;

/// Bytes per descriptor.
const DESC: u64 = 16;

/// Guest bytes held at their guest addresses; reads of anything else fail
/// with [`MemoryError::NotPresent`]. Writes are refused.
///
/// A batch can hold a hundred ranges (a doorbell's descriptors, one each),
/// so a lookup is not a scan. Descriptors of the ring's own table
/// ([`Shadow::set_table`]) sit in a dense array by index; other ranges are
/// indexed by start address, and only the few long ones are scanned. Where
/// copies overlap, the newest descriptor or range that starts at the
/// address read, or the newest long one, wins; a short range that covers
/// the address without starting there is found only when no other does.
/// Each is a copy of guest memory that the walker validates as it reads
/// it, so which copy wins is never a safety question.
#[derive(Debug, Default)]
pub struct Shadow {
    /// (guest address, bytes, insert number), in insert order.
    ranges: Vec<(u64, Vec<u8>, u64)>,
    /// Start address -> index of the newest range starting there.
    starts: FxHashMap<u64, usize>,
    /// Indices of the ranges longer than [`SMALL`], in insert order.
    long: Vec<usize>,
    /// The ring's descriptor table: guest address and entries.
    table: Option<(u64, u16)>,
    /// Its descriptors, by index, and the insert number of each (held
    /// only if above `cleared_at`).
    dense: Vec<[u8; DESC as usize]>,
    dense_seq: Vec<u64>,
    /// Inserts so far, and their count at the last clear.
    seq: u64,
    cleared_at: u64,
    /// Reused buffers, so steady state allocates nothing.
    spare: Vec<Vec<u8>>,
}

impl Shadow {
    /// Where the ring's descriptor table is: its descriptors are then kept
    /// by index, not by address.
    pub fn set_table(&mut self, gpa: u64, entries: u16) {
        self.table = Some((gpa, entries));
        self.dense = vec![[0; DESC as usize]; usize::from(entries)];
        self.dense_seq = vec![0; usize::from(entries)];
    }

    /// The table index of the descriptor at `gpa`, if it is one.
    fn slot_of(&self, gpa: u64) -> Option<usize> {
        let (base, n) = self.table?;
        let off = gpa.checked_sub(base)?;
        let i = off / DESC;
        (off % DESC == 0 && i < u64::from(n)).then_some(i as usize)
    }

    /// Forgets every range, keeping the buffers for reuse.
    pub fn clear(&mut self) {
        for (_, mut b, _) in self.ranges.drain(..) {
            b.clear();
            self.spare.push(b);
        }
        self.starts.clear();
        self.long.clear();
        self.cleared_at = self.seq;
    }

    /// Adds (or replaces) the bytes at `gpa`.
    pub fn insert(&mut self, gpa: u64, bytes: &[u8]) {
        if bytes.len() == DESC as usize {
            if let Some(i) = self.slot_of(gpa) {
                self.seq += 1;
                self.dense[i].copy_from_slice(bytes);
                self.dense_seq[i] = self.seq;
                return;
            }
        }
        self.slot(gpa, bytes.len()).copy_from_slice(bytes);
    }

    /// A buffer of `len` zero bytes at `gpa`, to be filled by a READ.
    pub fn slot(&mut self, gpa: u64, len: usize) -> &mut Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.resize(len, 0);
        self.seq += 1;
        let i = self.ranges.len();
        self.ranges.push((gpa, b, self.seq));
        self.starts.insert(gpa, i);
        if len > SMALL {
            self.long.push(i);
        }
        &mut self.ranges[i].1
    }

    /// The `len` bytes at `addr`, if one range holds them all.
    pub fn get(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.find(addr, len)
    }

    fn find(&self, addr: u64, len: usize) -> Option<&[u8]> {
        let end = addr.checked_add(len as u64)?;
        let covers = |i: usize| -> Option<&[u8]> {
            let (g, b, _) = &self.ranges[i];
            let bend = g.checked_add(b.len() as u64)?;
            (addr >= *g && end <= bend).then(|| &b[(addr - g) as usize..(end - g) as usize])
        };
        // The best copy that starts at `addr`: a table descriptor or a
        // range, the newer of the two.
        let desc = self
            .slot_of(addr)
            .filter(|&i| len as u64 <= DESC && self.dense_seq[i] > self.cleared_at)
            .map(|i| (self.dense_seq[i], &self.dense[i][..len]));
        let range = self
            .starts
            .get(&addr)
            .and_then(|&i| Some((self.ranges[i].2, covers(i)?)));
        let at = match (desc, range) {
            (Some(d), Some(r)) => Some(if d.0 > r.0 { d } else { r }),
            (d, r) => d.or(r),
        };
        // A long range newer than that wins.
        let newer = self
            .long
            .iter()
            .rev()
            .take_while(|&&j| at.is_none_or(|(seq, _)| self.ranges[j].2 > seq))
            .find_map(|&j| covers(j));
        if let Some(b) = newer {
            return Some(b);
        }
        if let Some((_, b)) = at {
            return Some(b);
        }
        // Rare: a short range covering `addr` without starting there.
        (0..self.ranges.len()).rev().find_map(covers)
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

    #[test]
    fn table_descriptors_live_by_index_and_newer_copies_win() {
        let mut s = Shadow::default();
        s.set_table(0x4000, 8);
        let mut d = [0u8; 16];
        s.insert(0x4010, &[1; 16]);
        s.read(0x4010, &mut d).unwrap();
        assert_eq!(d, [1; 16]);
        // Not a descriptor slot: misaligned, or past the table.
        assert!(s.read(0x4018, &mut d).is_err());
        s.insert(0x4080, &[2; 16]);
        s.read(0x4080, &mut d).unwrap();
        assert_eq!(d, [2; 16]);
        // The whole table read later wins; a descriptor pushed after it wins.
        s.insert(0x4000, &[7; 128]);
        s.read(0x4010, &mut d).unwrap();
        assert_eq!(d, [7; 16]);
        s.insert(0x4020, &[3; 16]);
        s.read(0x4020, &mut d).unwrap();
        assert_eq!(d, [3; 16]);
        // Cleared: nothing held, the dense copies included.
        s.clear();
        assert!(s.read(0x4020, &mut d).is_err());
        assert!(s.read(0x4010, &mut d).is_err());
        s.insert(0x4020, &[4; 16]);
        s.read(0x4020, &mut d).unwrap();
        assert_eq!(d, [4; 16]);
        // A read of part of a descriptor, at its start.
        let mut two = [0u8; 2];
        s.read(0x4020, &mut two).unwrap();
        assert_eq!(two, [4, 4]);
    }

    #[test]
    fn newer_long_ranges_win_over_older_descriptors() {
        let mut s = Shadow::default();
        let mut d = [0u8; 16];
        s.insert(0x2000, &[1; 16]);
        s.insert(0x2010, &[2; 16]);
        // A READ of the whole table, newer than both.
        s.insert(0x2000, &[7; 64]);
        s.read(0x2010, &mut d).unwrap();
        assert_eq!(d, [7; 16]);
        // A descriptor pushed after the table wins over it.
        s.insert(0x2020, &[3; 16]);
        s.read(0x2020, &mut d).unwrap();
        assert_eq!(d, [3; 16]);
        s.read(0x2030, &mut d).unwrap();
        assert_eq!(d, [7; 16]);
        // Inside a short range without starting there.
        let mut two = [0u8; 2];
        s.insert(0x9000, &[5; 16]);
        s.read(0x9004, &mut two).unwrap();
        assert_eq!(two, [5, 5]);
        assert!(s.read(0x9010, &mut two).is_err());
    }
}
