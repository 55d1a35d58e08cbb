//! Guest memory as the ring engine and device models see it.
//!
//! Everything vrio knows about a guest's memory goes through two things:
//! a [`MemoryMap`], the set of guest-physical ranges the guest registered
//! (used to validate every guest-supplied address before it is touched), and
//! the [`GuestMemory`] trait, the only way the engine reads or writes. Local
//! models implement it over `vm-memory`; the remote I/O server implements it
//! over a shadow of ring pages fetched with RDMA READ.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Errors from a guest memory access or a range check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// [`MemoryMap::check`]: `addr + len` wraps the 64-bit address space.
    #[error("guest range {addr:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The range is not inside one registered region (or, for views such
    /// as the server's staging, outside what the view holds).
    #[error("guest range {addr:#x}+{len:#x} is outside the guest's registered memory")]
    OutOfBounds {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A partial copy of guest memory (the I/O server's shadow of fetched
    /// ranges) does not hold the range: fetch it, then retry.
    #[error("guest range {addr:#x}+{len:#x} is not present locally (fetch it first)")]
    NotPresent {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// [`MemoryMap::new`] or a `memory_from_*` constructor: empty, wrapping
    /// or overlapping regions.
    #[error("invalid guest memory map: {0}")]
    InvalidMap(String),
    /// The access itself failed (`vm-memory` refused it, a mapping failed,
    /// or a chain was shorter than the bytes asked for).
    #[error("guest memory access at {addr:#x} failed: {reason}")]
    Access {
        /// Guest address of the access.
        addr: u64,
        /// What failed.
        reason: String,
    },
}

/// One guest-physical range of a guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl GuestRegion {
    /// Exclusive end, or `None` when the region wraps the address space.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.len)
    }
}

/// The guest-physical ranges one guest registered, sorted and disjoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryMap {
    regions: Vec<GuestRegion>,
}

impl MemoryMap {
    /// Builds a map; rejects empty, wrapping or overlapping regions.
    pub fn new(mut regions: Vec<GuestRegion>) -> Result<Self, MemoryError> {
        regions.sort_by_key(|r| r.gpa);
        for r in &regions {
            if r.len == 0 || r.end().is_none() {
                return Err(MemoryError::InvalidMap(format!(
                    "region {:#x}+{:#x} is empty or wraps",
                    r.gpa, r.len
                )));
            }
        }
        for w in regions.windows(2) {
            // `end()` was checked above.
            if w[0].gpa + w[0].len > w[1].gpa {
                return Err(MemoryError::InvalidMap(format!(
                    "regions at {:#x} and {:#x} overlap",
                    w[0].gpa, w[1].gpa
                )));
            }
        }
        Ok(Self { regions })
    }

    /// The map of a `vm-memory` guest memory object.
    pub fn of<B: GuestMemoryBackend>(mem: &B) -> Result<Self, MemoryError> {
        Self::new(
            mem.iter()
                .map(|r| GuestRegion {
                    gpa: r.start_addr().0,
                    len: r.len(),
                })
                .collect(),
        )
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Total registered bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Checks that `addr..addr+len` lies inside one registered region.
    ///
    /// A buffer that straddles two adjacent regions is refused: the fabric
    /// registers each region separately, so one transfer cannot span two.
    pub fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        let end = addr
            .checked_add(len)
            .ok_or(MemoryError::Overflow { addr, len })?;
        let i = self.regions.partition_point(|r| r.gpa <= addr);
        if i == 0 {
            return Err(MemoryError::OutOfBounds { addr, len });
        }
        let r = &self.regions[i - 1];
        if end <= r.gpa + r.len {
            Ok(())
        } else {
            Err(MemoryError::OutOfBounds { addr, len })
        }
    }

    /// The region holding `addr`, with its index.
    pub fn region_of(&self, addr: u64) -> Option<(usize, &GuestRegion)> {
        let i = self.regions.partition_point(|r| r.gpa <= addr);
        if i == 0 {
            return None;
        }
        let r = &self.regions[i - 1];
        (addr < r.gpa + r.len).then_some((i - 1, r))
    }
}

/// The engine's only way into guest memory.
///
/// Implementations must refuse (not clamp) any access outside what they hold.
pub trait GuestMemory {
    /// Fills `buf` from guest address `addr`, all or nothing.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Writes `buf` at guest address `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError>;

    /// Reads a ring index with acquire ordering.
    fn load_u16(&self, addr: u64) -> Result<u16, MemoryError> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        std::sync::atomic::fence(Ordering::Acquire);
        Ok(u16::from_le_bytes(b))
    }

    /// Publishes a ring index with release ordering.
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemoryError> {
        std::sync::atomic::fence(Ordering::Release);
        self.write(addr, &val.to_le_bytes())
    }

    /// Replaces the ring index at `addr` with `new` if it still holds
    /// `current`: Ok(current), or Err(what it holds). Memory that another
    /// party writes concurrently (guest RAM that an I/O server WRITEs) must
    /// do it atomically; the default is a plain load and store, for
    /// memories nobody else writes.
    fn compare_exchange_u16(
        &self,
        addr: u64,
        current: u16,
        new: u16,
    ) -> Result<Result<u16, u16>, MemoryError> {
        let v = self.load_u16(addr)?;
        if v != current {
            return Ok(Err(v));
        }
        self.store_u16(addr, new)?;
        Ok(Ok(v))
    }

    /// Lends bytes `skip..skip + len` of the readable part (or the
    /// writable part) of the one chain this memory is a view of to `f`, in
    /// place, when it holds that part as one run of bytes: an I/O server's
    /// staging buffer does, so a block back-end reads and writes there
    /// with no copy. Returns false without calling `f` otherwise (the
    /// default: guest RAM is no chain's view; the caller copies).
    ///
    /// A borrower of the writable part leaves every lent byte defined,
    /// even when its I/O fails (it zeroes them then): the lender may send
    /// all of them to the guest.
    fn lend_chain_part(
        &self,
        _writable: bool,
        _skip: u64,
        _len: u64,
        _f: &mut dyn FnMut(&mut [u8]),
    ) -> bool {
        false
    }
}

impl<T: GuestMemory + ?Sized> GuestMemory for &T {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        (**self).write(addr, buf)
    }
    fn load_u16(&self, addr: u64) -> Result<u16, MemoryError> {
        (**self).load_u16(addr)
    }
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemoryError> {
        (**self).store_u16(addr, val)
    }
    fn compare_exchange_u16(
        &self,
        addr: u64,
        current: u16,
        new: u16,
    ) -> Result<Result<u16, u16>, MemoryError> {
        (**self).compare_exchange_u16(addr, current, new)
    }
    fn lend_chain_part(
        &self,
        writable: bool,
        skip: u64,
        len: u64,
        f: &mut dyn FnMut(&mut [u8]),
    ) -> bool {
        (**self).lend_chain_part(writable, skip, len, f)
    }
}

fn access_err(addr: u64, e: impl std::fmt::Display) -> MemoryError {
    MemoryError::Access {
        addr,
        reason: e.to_string(),
    }
}

/// Local guest memory: what the local models, the synthetic guests and the
/// VM-host agent use. `vm-memory` does the bounds checks and volatile copies.
pub type LocalMemory = vm_memory::GuestMemoryMmap<()>;

impl GuestMemory for LocalMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.read_slice(buf, GuestAddress(addr))
            .map_err(|e| access_err(addr, e))
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.write_slice(buf, GuestAddress(addr))
            .map_err(|e| access_err(addr, e))
    }
    fn load_u16(&self, addr: u64) -> Result<u16, MemoryError> {
        self.load::<u16>(GuestAddress(addr), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| access_err(addr, e))
    }
    fn store_u16(&self, addr: u64, val: u16) -> Result<(), MemoryError> {
        self.store(val.to_le(), GuestAddress(addr), Ordering::Release)
            .map_err(|e| access_err(addr, e))
    }
    fn compare_exchange_u16(
        &self,
        addr: u64,
        current: u16,
        new: u16,
    ) -> Result<Result<u16, u16>, MemoryError> {
        use vm_memory::VolatileMemory;
        let s = self
            .get_slice(GuestAddress(addr), 2)
            .map_err(|e| access_err(addr, e))?;
        // Checks the alignment, which an atomic needs.
        let a = s
            .get_atomic_ref::<std::sync::atomic::AtomicU16>(0)
            .map_err(|e| access_err(addr, e))?;
        Ok(a.compare_exchange(
            current.to_le(),
            new.to_le(),
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .map(u16::from_le)
        .map_err(u16::from_le))
    }
}

/// Anonymous local guest memory of `size` bytes at guest address 0.
pub fn anonymous_memory(size: usize) -> Result<LocalMemory, MemoryError> {
    LocalMemory::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| access_err(0, e))
}

/// Local guest memory of `size` bytes at guest address 0, backed by a
/// sealed memfd as a VMM's guest RAM is: a fabric that can share files
/// (`shm`) hands it to the I/O server instead of copying through the kernel.
pub fn shared_memory(size: usize) -> Result<LocalMemory, MemoryError> {
    use std::os::fd::FromRawFd;
    let err = |what: &str| access_err(0, format!("{what}: {}", std::io::Error::last_os_error()));
    // SAFETY: memfd_create with a valid C string; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vrio-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(err("memfd_create"));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size as u64)
        .map_err(|e| access_err(0, format!("sizing guest RAM: {e}")))?;
    // Sealed against resizing, so a peer that maps it can never fault on a
    // truncated file.
    // SAFETY: fcntl on our own fd with plain integer arguments.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if rc != 0 {
        return Err(err("sealing guest RAM"));
    }
    memory_from_fds(vec![(0, file, 0, size)])
}

/// Guest RAM as a VMM holds it: shared files (memfds) mapped at guest
/// physical addresses. Each entry is `(gpa, file, offset in file, size)`.
pub fn memory_from_fds(
    regions: Vec<(u64, std::fs::File, u64, usize)>,
) -> Result<LocalMemory, MemoryError> {
    let mut v = Vec::with_capacity(regions.len());
    for (gpa, file, offset, size) in regions {
        let m = vm_memory::MmapRegion::from_file(vm_memory::FileOffset::new(file, offset), size)
            .map_err(|e| access_err(gpa, e))?;
        v.push(guest_region(m, gpa)?);
    }
    collect_regions(v)
}

/// Guest RAM already mapped in this process, as `(gpa, host pointer, size)`.
///
/// # Safety
/// Each pointer must start a page-aligned, shared, read-write mapping of at
/// least `size` bytes that stays mapped as long as the returned memory (and
/// any fabric registration of it) lives.
pub unsafe fn memory_from_pointers(
    regions: &[(u64, *mut u8, usize)],
) -> Result<LocalMemory, MemoryError> {
    let mut v = Vec::with_capacity(regions.len());
    for &(gpa, ptr, size) in regions {
        // SAFETY: the caller guarantees the mapping (see above).
        let m = unsafe {
            vm_memory::MmapRegion::build_raw(
                ptr,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| access_err(gpa, e))?;
        v.push(guest_region(m, gpa)?);
    }
    collect_regions(v)
}

/// One mapped region of guest RAM at `gpa`.
fn guest_region(
    m: vm_memory::MmapRegion,
    gpa: u64,
) -> Result<vm_memory::GuestRegionMmap, MemoryError> {
    vm_memory::GuestRegionMmap::new(m, GuestAddress(gpa))
        .ok_or_else(|| MemoryError::InvalidMap(format!("region at {gpa:#x} wraps")))
}

/// Guest memory from its regions, in address order.
fn collect_regions(mut v: Vec<vm_memory::GuestRegionMmap>) -> Result<LocalMemory, MemoryError> {
    v.sort_by_key(|r| r.start_addr());
    LocalMemory::from_regions(v).map_err(|e| MemoryError::InvalidMap(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> MemoryMap {
        MemoryMap::new(vec![
            GuestRegion {
                gpa: 0x1000,
                len: 0x1000,
            },
            GuestRegion {
                gpa: 0x10000,
                len: 0x10000,
            },
        ])
        .unwrap()
    }

    #[test]
    fn check_accepts_inside_and_refuses_outside() {
        let m = map();
        assert_eq!(m.check(0x1000, 0x1000), Ok(()));
        assert_eq!(m.check(0x1fff, 1), Ok(()));
        assert_eq!(m.check(0x1fff, 0), Ok(()));
        for (addr, len) in [(0x1fff, 2), (0x0, 1), (0x2000, 1), (0x1fff0, 0x20)] {
            assert!(
                matches!(m.check(addr, len), Err(MemoryError::OutOfBounds { .. })),
                "{addr:#x}+{len:#x}"
            );
        }
        assert!(matches!(
            m.check(u64::MAX - 1, 4),
            Err(MemoryError::Overflow { .. })
        ));
    }

    #[test]
    fn map_rejects_overlap_and_wrap() {
        assert!(MemoryMap::new(vec![
            GuestRegion {
                gpa: 0,
                len: 0x2000
            },
            GuestRegion {
                gpa: 0x1000,
                len: 0x1000
            }
        ])
        .is_err());
        assert!(MemoryMap::new(vec![GuestRegion {
            gpa: u64::MAX,
            len: 2
        }])
        .is_err());
        assert!(MemoryMap::new(vec![GuestRegion { gpa: 0, len: 0 }]).is_err());
    }

    #[test]
    fn local_memory_round_trips_and_refuses_out_of_range() {
        let mem = anonymous_memory(0x4000).unwrap();
        GuestMemory::write(&mem, 0x100, b"hello").unwrap();
        let mut b = [0u8; 5];
        GuestMemory::read(&mem, 0x100, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        mem.store_u16(0x200, 0xbeef).unwrap();
        assert_eq!(mem.load_u16(0x200).unwrap(), 0xbeef);
        assert!(GuestMemory::read(&mem, 0x3ffe, &mut [0u8; 4]).is_err());
        assert_eq!(MemoryMap::of(&mem).unwrap().size(), 0x4000);
    }

    fn memfd(size: u64) -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a valid C string; the fd is checked and
        // then owned by the File.
        let fd = unsafe { libc::memfd_create(c"vrio-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn shared_memory_is_a_sealed_file() {
        let mem = shared_memory(0x4000).unwrap();
        let r = mem.iter().next().unwrap();
        let f = r.file_offset().expect("backed by a file");
        assert_eq!(f.start(), 0);
        // SAFETY: F_GET_SEALS on a live fd.
        let seals =
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(f.file()), libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        GuestMemory::write(&mem, 0x3ff0, b"0123456789abcdef").unwrap();
        let mut b = [0u8; 16];
        GuestMemory::read(&mem, 0x3ff0, &mut b).unwrap();
        assert_eq!(&b, b"0123456789abcdef");
        assert!(GuestMemory::write(&mem, 0x3ff8, b"0123456789abcdef").is_err());
    }

    #[test]
    fn memory_from_fds_shares_the_file() {
        let f = memfd(0x4000);
        let g = f.try_clone().unwrap();
        // Two regions of one memfd, at guest 0 and 1 MiB.
        let mem = memory_from_fds(vec![(0x10_0000, g, 0x2000, 0x2000), (0, f, 0, 0x2000)]).unwrap();
        let map = MemoryMap::of(&mem).unwrap();
        assert_eq!(map.size(), 0x4000);
        assert!(map.check(0x10_1fff, 1).is_ok());
        assert!(map.check(0x2000, 1).is_err());
        GuestMemory::write(&mem, 0x10_0010, b"vrio").unwrap();
        let mut b = [0u8; 4];
        GuestMemory::read(&mem, 0x10_0010, &mut b).unwrap();
        assert_eq!(&b, b"vrio");
    }

    #[test]
    fn memory_from_pointers_wraps_an_existing_mapping() {
        let size = 0x4000usize;
        // SAFETY: a fresh anonymous shared mapping, checked, unmapped below
        // after the wrapper is gone.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        {
            // SAFETY: `p` is the mapping made above and outlives `mem`.
            let mem = unsafe { memory_from_pointers(&[(0x8000, p.cast(), size)]) }.unwrap();
            GuestMemory::write(&mem, 0x8004, &[7, 8]).unwrap();
            // SAFETY: reading two bytes inside the mapping.
            let host = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(4), 2) };
            assert_eq!(host, &[7, 8]);
            assert!(GuestMemory::read(&mem, 0x8000 + size as u64, &mut [0u8; 1]).is_err());
        }
        // SAFETY: unmapping the mapping made above; nothing refers to it.
        unsafe { libc::munmap(p, size) };
    }
}
