//! The shared channel of one shm connection, and the mappings of a file.
//!
//! Each side creates one sealed memfd, its *channel*, and hands it to the
//! peer at connect time. Both sides map both channels:
//!
//! ```text
//! 0      control block: one cache line per field, written by the owner
//!        (the peer only clears `armed`), read by the peer
//! 4096   inbox: SLOTS slots of SLOT bytes, written only by the peer
//! ```
//!
//! Everything in a channel can be written by the peer at any time, so every
//! value read from one is hostile input: it is copied out once and then
//! checked, never trusted in place.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

use crate::api::FabricError;

/// Slots in an inbox.
pub(crate) const SLOTS: u64 = 1024;
/// Bytes per slot: a 16-byte header, then data.
pub(crate) const SLOT: usize = 256;
/// Bytes of a slot's header.
pub(crate) const SLOT_HDR: usize = 16;
/// Data bytes a slot carries.
pub(crate) const SLOT_DATA: usize = SLOT - SLOT_HDR;
/// Bytes of the control block (one page).
pub(crate) const CTRL_LEN: usize = 4096;
/// Bytes of a whole channel.
pub(crate) const CHANNEL_LEN: usize = CTRL_LEN + SLOTS as usize * SLOT;
/// Largest SEND (it must fit in a quarter of the inbox).
pub(crate) const MAX_SEND: u32 = (SLOTS as u32 / 4) * SLOT_DATA as u32;

/// Slot kinds.
pub(crate) const KIND_SEND: u8 = 1;
pub(crate) const KIND_IMM: u8 = 2;
/// Slot flags.
pub(crate) const FIRST: u8 = 1;
pub(crate) const LAST: u8 = 2;

/// Control-block fields (byte offsets, each on its own cache line).
#[derive(Debug, Clone, Copy)]
#[repr(usize)]
pub(crate) enum Ctrl {
    /// u32: the owner sleeps; whoever gives it work clears this (CAS 1 -> 0)
    /// and signals the owner's eventfd.
    Armed = 0,
    /// u64: wake the owner when your inbox head reaches this slot sequence
    /// (an acknowledgement it waits for).
    WantAck = 64,
    /// u64: slots of the owner's inbox it has consumed.
    Head = 128,
    /// u64: receives the owner has posted in total (the peer's RNR test).
    Posted = 192,
    /// u32: non-zero once the owner is in the error state (see `ERR_*`).
    Error = 256,
    /// u64: bumped whenever the owner revokes memory (deregistration,
    /// close); the peer rereads its socket before its next copy.
    Epoch = 320,
    /// u32: the owner is copying into the peer's memory right now.
    Busy = 384,
}

/// `Ctrl::Error`: a message broke the receiver's rules (too long for the
/// receive, malformed): the sender's request fails RemoteOperationError.
pub(crate) const ERR_REMOTE_OP: u32 = 1;
/// `Ctrl::Error`: the endpoint failed for another reason or closed.
pub(crate) const ERR_CLOSED: u32 = 2;

/// A shared, read-write mapping; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a mapping is plain shared memory; all access goes through raw
// copies and atomics, never references to its bytes.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset` (page-aligned), shared.
    pub(crate) fn map(
        fd: &impl AsFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> std::io::Result<Self> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a file we hold; the kernel
        // chooses the address and the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                prot,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len: len.max(1),
        })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Size of the file behind `fd`.
pub(crate) fn file_size(fd: &impl AsFd) -> std::io::Result<u64> {
    // SAFETY: fstat writes only into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on a descriptor we hold; result checked.
    if unsafe { libc::fstat(fd.as_fd().as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.st_size as u64)
}

/// The seals of a memfd (0 for files that cannot be sealed).
pub(crate) fn seals(fd: &impl AsFd) -> u32 {
    // SAFETY: plain fcntl on a descriptor we hold; a failure means "no
    // seals".
    let s = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_GET_SEALS) };
    s.max(0) as u32
}

/// A sealed memfd of `len` bytes: it can neither shrink nor grow, so a peer
/// that maps it never faults on a truncated file.
pub(crate) fn sealed_memfd(name: &std::ffi::CStr, len: usize) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall with a valid C string; result checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscalls on our own fd; results checked.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// One side's channel, mapped.
#[derive(Debug)]
pub(crate) struct Channel {
    map: Mapping,
}

impl Channel {
    /// Creates this side's channel; returns it and the fd to hand the peer.
    pub(crate) fn create() -> Result<(Self, OwnedFd), FabricError> {
        let fd = sealed_memfd(c"vrio-shm-channel", CHANNEL_LEN)?;
        let map = Mapping::map(&fd, 0, CHANNEL_LEN, true)?;
        Ok((Self { map }, fd))
    }

    /// Maps the peer's channel, after checking it is one: exactly the size
    /// and sealed against shrinking (else a truncation would fault us).
    pub(crate) fn open_peer(fd: &OwnedFd) -> Result<Self, FabricError> {
        let size = file_size(fd)?;
        if size != CHANNEL_LEN as u64 {
            return Err(FabricError::Protocol(format!(
                "peer channel is {size} bytes, expected {CHANNEL_LEN}"
            )));
        }
        if seals(fd) & libc::F_SEAL_SHRINK as u32 == 0 {
            return Err(FabricError::Protocol(
                "peer channel is not sealed against shrinking".into(),
            ));
        }
        Ok(Self {
            map: Mapping::map(fd, 0, CHANNEL_LEN, true)?,
        })
    }

    pub(crate) fn u32_at(&self, f: Ctrl) -> &AtomicU32 {
        // SAFETY: every `Ctrl` offset is 4-aligned and inside the mapping,
        // which lives as long as `self`. Atomics are the one sound way to
        // share a word with another process that writes it.
        unsafe { &*(self.map.ptr().add(f as usize) as *const AtomicU32) }
    }

    pub(crate) fn u64_at(&self, f: Ctrl) -> &AtomicU64 {
        // SAFETY: as `u32_at`; the u64 fields are 8-aligned.
        unsafe { &*(self.map.ptr().add(f as usize) as *const AtomicU64) }
    }

    /// The slot that sequence number `seq` uses.
    pub(crate) fn slot(&self, seq: u64) -> *mut u8 {
        let i = (seq % SLOTS) as usize;
        // SAFETY: i < SLOTS, so the slot lies inside the mapping.
        unsafe { self.map.ptr().add(CTRL_LEN + i * SLOT) }
    }

    /// The stamp of the slot `seq` uses: `seq + 1` (truncated) once the
    /// producer has filled it for this lap. A full lap counter rather than
    /// one owner bit, so a stale or replayed slot cannot pass for a new one.
    pub(crate) fn stamp(&self, seq: u64) -> &AtomicU32 {
        // SAFETY: the stamp is the slot's first (4-aligned) word.
        unsafe { &*(self.slot(seq) as *const AtomicU32) }
    }

    /// Every byte this side may write in the channel, for hostile-peer
    /// tests.
    pub(crate) fn raw(&self) -> (*mut u8, usize) {
        (self.map.ptr(), self.map.len())
    }
}

/// The stamp value that marks slot `seq` as filled.
pub(crate) fn stamp_of(seq: u64) -> u32 {
    (seq as u32).wrapping_add(1)
}

/// Slots a message of `total` bytes needs.
pub(crate) fn slots_for(kind: u8, total: u32) -> u64 {
    if kind == KIND_IMM {
        1
    } else {
        (total as u64).div_ceil(SLOT_DATA as u64).max(1)
    }
}

/// A slot header, as copied out of shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotHeader {
    pub kind: u8,
    pub flags: u8,
    pub len: u16,
    pub imm: u32,
    pub total: u32,
}

impl SlotHeader {
    /// Writes the header (not the stamp) into `slot`.
    ///
    /// # Safety
    /// `slot` must be a slot of a live channel mapping.
    pub(crate) unsafe fn store(&self, slot: *mut u8) {
        let mut b = [0u8; SLOT_HDR - 4];
        b[0] = self.kind;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.len.to_le_bytes());
        b[4..8].copy_from_slice(&self.imm.to_le_bytes());
        b[8..12].copy_from_slice(&self.total.to_le_bytes());
        // SAFETY: the caller guarantees the slot; bytes 4..16 are the header.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), slot.add(4), b.len()) };
    }

    /// Copies the header out of `slot` (the peer may be rewriting it).
    ///
    /// # Safety
    /// `slot` must be a slot of a live channel mapping.
    pub(crate) unsafe fn load(slot: *const u8) -> Self {
        let mut b = [0u8; SLOT_HDR - 4];
        // SAFETY: the caller guarantees the slot. The bytes may change under
        // us; they are copied once, then only the copy is checked and used.
        unsafe { std::ptr::copy_nonoverlapping(slot.add(4), b.as_mut_ptr(), b.len()) };
        Self {
            kind: b[0],
            flags: b[1],
            len: u16::from_le_bytes([b[2], b[3]]),
            imm: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            total: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        }
    }
}
