//! Registered memory of the simulated domains: one key table per domain and
//! the checked copies that READ, WRITE and SEND perform.
//!
//! Keys are deterministic and carry their domain: `((domain + 1) << 20) |
//! (index << 1) | remote`, so an lkey is never a valid rkey, a key of one
//! domain never names a region of another, and a region's keys are never
//! reused after it is dropped (a stale key always faults).
//!
//! As in `soft`, registered memory is external (guest RAM) and may change at
//! any time, so nothing here forms a Rust reference into it: copies go
//! through raw pointers with `ptr::copy`. Every copy happens under the
//! network's lock, and deregistration takes that same lock, so a checked
//! range stays registered (hence mapped, per `Domain::register`'s contract)
//! until the copy is over.

use std::collections::BTreeMap;

use crate::access::{permits, Need};
use crate::api::{Access, FabricError};

/// Bits of a key below the domain tag.
const TAG_SHIFT: u32 = 20;
/// Region indices fit in the bits between the remote bit and the tag.
const MAX_INDEX: u32 = (1 << (TAG_SHIFT - 1)) - 1;
/// The most domains one network holds (the tag is 12 bits, never 0).
pub(crate) const MAX_DOMAINS: usize = (1 << (32 - TAG_SHIFT)) - 1;

#[derive(Debug, Clone, Copy)]
struct Region {
    addr: u64,
    len: u64,
    access: Access,
}

/// The keys of a freshly registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegionKeys {
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
}

/// A range that passed [`Keys::check`]: valid to copy while the network
/// lock that covered the check is held.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Checked {
    addr: u64,
    len: u64,
}

/// The key table of one simulated domain.
#[derive(Debug)]
pub(crate) struct Keys {
    tag: u32,
    regions: BTreeMap<u32, Region>,
    next: u32,
}

impl Keys {
    /// The table of domain number `domain` (< [`MAX_DOMAINS`]).
    pub(crate) fn new(domain: usize) -> Self {
        Self {
            tag: domain as u32 + 1,
            regions: BTreeMap::new(),
            next: 1,
        }
    }

    fn key(&self, index: u32, remote: bool) -> u32 {
        (self.tag << TAG_SHIFT) | (index << 1) | u32::from(remote)
    }

    /// Records `addr..addr+len`; fails like `soft` on a null pointer or a
    /// range that wraps, and when the domain ran out of keys.
    pub(crate) fn register(
        &mut self,
        addr: u64,
        len: u64,
        access: Access,
    ) -> Result<RegionKeys, FabricError> {
        if addr == 0 && len != 0 {
            return Err(FabricError::Register("null pointer".into()));
        }
        if addr.checked_add(len).is_none() {
            return Err(FabricError::Register(
                "region wraps the address space".into(),
            ));
        }
        if self.next > MAX_INDEX {
            return Err(FabricError::Register(format!(
                "the simulated domain ran out of keys ({MAX_INDEX} regions)"
            )));
        }
        let index = self.next;
        self.next += 1;
        self.regions.insert(index, Region { addr, len, access });
        Ok(RegionKeys {
            lkey: self.key(index, false),
            rkey: self.key(index, true),
        })
    }

    /// Forgets the region whose lkey is `lkey` (no-op if unknown).
    pub(crate) fn deregister(&mut self, lkey: u32) {
        if let Some(index) = self.index(lkey, false) {
            self.regions.remove(&index);
        }
    }

    fn index(&self, key: u32, remote: bool) -> Option<u32> {
        let ok = key >> TAG_SHIFT == self.tag && (key & 1 == 1) == remote;
        ok.then_some((key & ((1 << TAG_SHIFT) - 1)) >> 1)
    }

    /// `addr..addr+len` in the region named by `key`, if the key is of the
    /// kind `need` names (lkey or rkey), the region exists, covers the range
    /// and grants `need`. A zero-length access is always allowed (verbs
    /// skips the key check) and must not be copied from or to.
    pub(crate) fn check(&self, key: u32, addr: u64, len: u64, need: Need) -> Option<Checked> {
        if len == 0 {
            return Some(Checked { addr: 0, len: 0 });
        }
        let r = self
            .regions
            .get(&self.index(key, matches!(need, Need::RemoteRead | Need::RemoteWrite))?)?;
        permits(r.addr, r.len, r.access, addr, len, need).then_some(Checked { addr, len })
    }
}

/// Copies `src` to `dst` (the same length, both checked under the lock the
/// caller still holds). The two may overlap (one memory registered twice).
pub(crate) fn copy(src: Checked, dst: Checked) {
    let len = src.len.min(dst.len);
    if len == 0 {
        return;
    }
    let s = std::ptr::with_exposed_provenance::<u8>(src.addr as usize);
    let d = std::ptr::with_exposed_provenance_mut::<u8>(dst.addr as usize);
    // SAFETY: both ranges passed `Keys::check` under the network lock that
    // the caller still holds, so each lies inside a live registration, and
    // deregistration (which takes that lock) cannot run before the copy
    // ends; a live registration is mapped and valid by the promise its
    // registrant made in `Domain::register` (whose pointer we exposed, so
    // the provenance is recovered). `ptr::copy` tolerates overlap. No
    // reference into the memory is formed, so concurrent writers (guest,
    // VMM) cause no aliasing UB beyond torn data, as on a real NIC.
    unsafe { std::ptr::copy(s, d, len as usize) };
}
