//! Registered memory of a soft domain: the key table every access checks.
//!
//! Registered memory is *external* (guest RAM mapped from a memfd, say) and
//! other parties may modify it at any time. So this module never hands out
//! `&[u8]`/`&mut [u8]` into it: it hands out raw pointers, valid only while
//! the [`RegistryGuard`] that checked them is held, and copies with
//! `ptr::copy_nonoverlapping` (or lets the kernel copy via `sendmsg`).
//! Deregistration takes the write lock, so it waits for in-flight copies.

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use crate::access::{permits, Need};
use crate::api::{Access, FabricError};

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr: u64,
    len: u64,
    access: Access,
}

/// The regions of one domain, keyed by their key (lkey == rkey in `soft`).
#[derive(Debug)]
pub(crate) struct Registry {
    map: RwLock<FxHashMap<u32, Entry>>,
    next_key: AtomicU32,
}

/// Proof that no region can be deregistered while it is held.
pub(crate) struct RegistryGuard<'a> {
    map: RwLockReadGuard<'a, FxHashMap<u32, Entry>>,
}

impl Registry {
    pub(crate) fn new() -> Arc<Self> {
        // Start keys at a per-process varying value so a stale rkey from an
        // earlier run is unlikely to name a live region.
        let seed = std::process::id().wrapping_mul(0x9E37_79B9).wrapping_add(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
        Arc::new(Self {
            map: RwLock::new(FxHashMap::default()),
            next_key: AtomicU32::new(seed | 1),
        })
    }

    pub(crate) fn read(&self) -> RegistryGuard<'_> {
        RegistryGuard {
            // A panic while holding the lock cannot leave the map torn (all
            // updates are single insert/remove), so poisoning is ignored.
            map: self.map.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    pub(crate) fn register(
        self: &Arc<Self>,
        ptr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<SoftRegion, FabricError> {
        if ptr.is_null() && len != 0 {
            return Err(FabricError::Register("null pointer".into()));
        }
        let addr = ptr as u64;
        let len64 = len as u64;
        if addr.checked_add(len64).is_none() {
            return Err(FabricError::Register(
                "region wraps the address space".into(),
            ));
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let key = loop {
            let k = self.next_key.fetch_add(1, Ordering::Relaxed);
            if k != 0 && !map.contains_key(&k) {
                break k;
            }
        };
        map.insert(
            key,
            Entry {
                addr,
                len: len64,
                access,
            },
        );
        Ok(SoftRegion {
            registry: Arc::clone(self),
            key,
            addr,
            len: len64,
            access,
        })
    }

    fn deregister(&self, key: u32) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&key);
    }
}

impl RegistryGuard<'_> {
    /// The host pointer for `addr..addr+len` in region `key`, if the region
    /// exists, covers the range and grants `need`. A zero-length access is
    /// always allowed and yields a dangling pointer that must not be used.
    pub(crate) fn check(&self, key: u32, addr: u64, len: u64, need: Need) -> Option<*mut u8> {
        if len == 0 {
            return Some(std::ptr::NonNull::<u8>::dangling().as_ptr());
        }
        let e = self.map.get(&key)?;
        permits(e.addr, e.len, e.access, addr, len, need).then_some(addr as usize as *mut u8)
    }

    /// Copies `src` into registered memory.
    pub(crate) fn copy_in(&self, key: u32, addr: u64, src: &[u8], need: Need) -> bool {
        let Some(dst) = self.check(key, addr, src.len() as u64, need) else {
            return false;
        };
        if !src.is_empty() {
            // SAFETY: `check` proved dst..dst+len lies inside a live
            // registration, and `self` keeps it registered (so mapped, per
            // `Domain::register`'s contract) until the copy is done. `src` is
            // our own buffer, so the ranges cannot overlap. Other parties may
            // write the destination concurrently; we create no reference to it.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        }
        true
    }
}

/// A region registered with a soft domain; dropping it deregisters it.
#[derive(Debug)]
pub struct SoftRegion {
    registry: Arc<Registry>,
    key: u32,
    addr: u64,
    len: u64,
    access: Access,
}

/// Implements [`MemoryRegion`](crate::api::MemoryRegion) for a back-end's region type from its
/// fields: the two named key fields (`u32`), and `addr: u64`, `len: u64` and
/// `access: Access`. The soft and the verbs region share it.
macro_rules! impl_memory_region {
    ($region:ty, lkey: $lkey:ident, rkey: $rkey:ident) => {
        impl $crate::api::MemoryRegion for $region {
            fn lkey(&self) -> u32 {
                self.$lkey
            }
            fn rkey(&self) -> u32 {
                self.$rkey
            }
            fn addr(&self) -> u64 {
                self.addr
            }
            fn len(&self) -> u64 {
                self.len
            }
            fn access(&self) -> $crate::api::Access {
                self.access
            }
        }
    };
}
pub(crate) use impl_memory_region;

// A soft region has one key for local and remote access.
impl_memory_region!(SoftRegion, lkey: key, rkey: key);

impl Drop for SoftRegion {
    fn drop(&mut self) {
        self.registry.deregister(self.key);
    }
}
