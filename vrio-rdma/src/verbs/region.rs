//! Registered memory regions and the table of their bounds by lkey.
//!
//! The table lets an endpoint copy a small WRITE inline only when its sge
//! lies inside a live region: inline data bypasses the NIC's lkey check, so a
//! bad sge must still go the sge path and fail as `LocalProtectionError`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use sideway::ibverbs::memory_region::MemoryRegion as SidewayMr;

use crate::api::Access;

/// The bounds (`addr`, `len`) of the domain's live regions by lkey.
#[derive(Debug, Default)]
pub struct RegionTable {
    by_lkey: RwLock<HashMap<u32, (u64, u64)>>,
}

impl RegionTable {
    /// Records a newly registered region.
    pub fn insert(&self, lkey: u32, addr: u64, len: u64) {
        self.write().insert(lkey, (addr, len));
    }

    /// Forgets a region that is being deregistered.
    pub fn remove(&self, lkey: u32) {
        self.write().remove(&lkey);
    }

    /// A read guard; while it is held no region in the table is deregistered.
    pub fn read(&self) -> RwLockReadGuard<'_, HashMap<u32, (u64, u64)>> {
        // A poisoned lock only means a panic elsewhere; the map stays valid.
        self.by_lkey.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<u32, (u64, u64)>> {
        self.by_lkey.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// Is `addr..addr+len` inside the region `lkey`?
pub fn contains(map: &HashMap<u32, (u64, u64)>, lkey: u32, addr: u64, len: u64) -> bool {
    match map.get(&lkey) {
        Some(&(start, rlen)) => {
            addr >= start
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= start.saturating_add(rlen))
        }
        None => false,
    }
}

/// A region registered with a verbs domain; dropping it deregisters it.
#[derive(Debug)]
pub struct VerbsRegion {
    // Declared before `mr`: the table entry goes before the memory is
    // deregistered (fields drop in order, after `Drop::drop`).
    table: Arc<RegionTable>,
    mr: Arc<SidewayMr>,
    access: Access,
    lkey: u32,
    rkey: u32,
    addr: u64,
    len: u64,
}

impl VerbsRegion {
    /// Wraps a registered `mr` and records its bounds in `table`.
    pub fn new(table: Arc<RegionTable>, mr: Arc<SidewayMr>, access: Access) -> Self {
        let (lkey, rkey) = (mr.lkey(), mr.rkey());
        let (addr, len) = (mr.get_ptr() as u64, mr.region_len() as u64);
        table.insert(lkey, addr, len);
        Self {
            table,
            mr,
            access,
            lkey,
            rkey,
            addr,
            len,
        }
    }
}

impl Drop for VerbsRegion {
    fn drop(&mut self) {
        self.table.remove(self.lkey);
        tracing::trace!(
            lkey = self.lkey,
            refs = Arc::strong_count(&self.mr),
            "deregister"
        );
    }
}

crate::soft::impl_memory_region!(VerbsRegion, lkey: lkey, rkey: rkey);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let t = RegionTable::default();
        t.insert(7, 0x1000, 0x100);
        let m = t.read();
        assert!(contains(&m, 7, 0x1000, 0x100));
        assert!(contains(&m, 7, 0x10ff, 1));
        assert!(!contains(&m, 7, 0x10ff, 2));
        assert!(!contains(&m, 7, 0xfff, 1));
        assert!(!contains(&m, 8, 0x1000, 1));
        assert!(!contains(&m, 7, u64::MAX, 2));
        drop(m);
        t.remove(7);
        assert!(!contains(&t.read(), 7, 0x1000, 1));
    }
}
