//! The descriptor chain walker (§2.7.5, §2.7.5.3).
//!
//! A plain function over [`GuestMemory`]: no I/O of its own, no allocation
//! beyond the caller's reusable [`DescriptorChain`] and [`Walker`] scratch.
//! Every address is validated against the guest's [`MemoryMap`] before it is
//! handed on, because descriptors come from a hostile guest. The walker reads
//! each descriptor exactly once and validates the copy it read, so a guest
//! that rewrites the table concurrently cannot slip past a check.

use super::descriptor::{Descriptor, DescriptorChain, Segment};
use super::error::ChainError;
use super::layout::{RingFeatures, RingLayout, DESC_SIZE};
use crate::virtio::memory::{GuestMemory, MemoryError, MemoryMap};

/// Reusable scratch for loop detection (one bit per table entry).
#[derive(Debug, Default)]
pub struct Walker {
    seen: Vec<u64>,
}

impl Walker {
    /// Empty scratch; it grows to the largest table walked.
    pub fn new() -> Self {
        Self::default()
    }

    fn reset(&mut self, entries: u32) {
        let words = entries.div_ceil(64) as usize;
        self.seen.clear();
        self.seen.resize(words, 0);
    }

    /// Marks `i`; returns false when it was already marked.
    fn mark(&mut self, i: u16) -> bool {
        let (w, b) = (usize::from(i / 64), i % 64);
        let fresh = self.seen[w] & (1 << b) == 0;
        self.seen[w] |= 1 << b;
        fresh
    }

    /// Walks the chain that starts at `head` into `out`.
    pub fn walk<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        map: &MemoryMap,
        layout: &RingLayout,
        features: RingFeatures,
        head: u16,
        out: &mut DescriptorChain,
    ) -> Result<(), ChainError> {
        out.clear();
        out.head = head;
        let size = layout.size;
        if head >= size {
            return Err(ChainError::HeadOutOfRange { head, size });
        }
        self.reset(u32::from(size));
        let mut index = head;
        let mut count: u32 = 0;
        loop {
            if !self.mark(index) {
                return Err(ChainError::Loop { index });
            }
            let desc = read_desc(mem, layout.desc_addr(index)).map_err(ChainError::Memory)?;
            count += 1;
            if count > u32::from(size) {
                return Err(ChainError::TooLong { limit: size });
            }
            if desc.is_indirect() {
                if !features.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if desc.has_next() {
                    return Err(ChainError::IndirectWithNext);
                }
                out.indirect = true;
                return self.walk_indirect(mem, map, size, count - 1, &desc, out);
            }
            push_segment(map, &desc, out)?;
            out.descriptors = count as u16;
            if !desc.has_next() {
                return Ok(());
            }
            if desc.next >= size {
                return Err(ChainError::NextOutOfRange {
                    index,
                    next: desc.next,
                    table_len: u32::from(size),
                });
            }
            index = desc.next;
        }
    }

    fn walk_indirect<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        map: &MemoryMap,
        size: u16,
        before: u32,
        table: &Descriptor,
        out: &mut DescriptorChain,
    ) -> Result<(), ChainError> {
        let len = table.len;
        if len == 0 || u64::from(len) % DESC_SIZE != 0 {
            return Err(ChainError::IndirectBadLength { len });
        }
        let entries = len / DESC_SIZE as u32;
        if entries > u32::from(size) {
            return Err(ChainError::IndirectTooLarge {
                entries,
                limit: size,
            });
        }
        // The table fits, but with the direct descriptors before it the
        // chain would exceed the queue size (§2.7.5.3.1).
        if entries + before > u32::from(size) {
            return Err(ChainError::TooLong { limit: size });
        }
        map.check(table.addr, u64::from(len))
            .map_err(|source| ChainError::BadIndirectTable {
                addr: table.addr,
                len,
                source,
            })?;
        self.reset(entries);
        let mut index: u16 = 0;
        let mut count = before;
        loop {
            if !self.mark(index) {
                return Err(ChainError::Loop { index });
            }
            let desc =
                read_desc(mem, table.addr + DESC_SIZE * u64::from(index)).map_err(|source| {
                    ChainError::BadIndirectTable {
                        addr: table.addr,
                        len,
                        source,
                    }
                })?;
            count += 1;
            if desc.is_indirect() {
                return Err(ChainError::NestedIndirect);
            }
            push_segment(map, &desc, out)?;
            out.descriptors = count as u16;
            if !desc.has_next() {
                return Ok(());
            }
            if u32::from(desc.next) >= entries {
                return Err(ChainError::NextOutOfRange {
                    index,
                    next: desc.next,
                    table_len: entries,
                });
            }
            index = desc.next;
        }
    }
}

fn read_desc<M: GuestMemory + ?Sized>(mem: &M, addr: u64) -> Result<Descriptor, MemoryError> {
    let mut b = [0u8; 16];
    mem.read(addr, &mut b)?;
    Ok(Descriptor::from_bytes(&b))
}

fn push_segment(
    map: &MemoryMap,
    desc: &Descriptor,
    out: &mut DescriptorChain,
) -> Result<(), ChainError> {
    map.check(desc.addr, u64::from(desc.len))
        .map_err(|source| ChainError::BadBuffer {
            addr: desc.addr,
            len: desc.len,
            source,
        })?;
    let seg = Segment {
        addr: desc.addr,
        len: desc.len,
    };
    if desc.is_write_only() {
        out.writable.push(seg);
    } else {
        if !out.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }
        out.readable.push(seg);
    }
    Ok(())
}
