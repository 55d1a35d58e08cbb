//! vhost-user inflight I/O tracking (protocol feature INFLIGHT_SHMFD) for
//! split rings: the shared region's layout, its creation (GET_INFLIGHT_FD),
//! its mapping from a peer's fd (SET_INFLIGHT_FD), the bookkeeping while a
//! vring runs and the resubmit computation after a reconnect.
//!
//! Per queue, 64-byte aligned (vhost-user spec, "Inflight I/O tracking"):
//! `features u64, version u16, desc_num u16, last_batch_head u16,
//! used_idx u16`, then `desc_num` x `DescStateSplit { inflight u8,
//! padding[5], next u16, counter u64 }`.
//!
//! This front does not pop the rings itself (the agent or the sidecore
//! does), so it records what it observes in guest memory ([`QueueTracker`]):
//! every avail entry past the used index is marked in flight, every used
//! entry clears its head. Both models complete in avail order, so the
//! requests in flight are exactly the avail entries from the used index
//! on, and recording them when the front looks (kicks, completions, the
//! rescan tick) keeps the region a prefix of that window. What the server
//! fetched after the front's last look is not in the region; a restart
//! resumes at the used index, so it is served again anyway, and the resume
//! reports it apart ([`Recovery::beyond`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::virtio::memory::GuestMemory;
use crate::virtio::ring::layout::MAX_QUEUE_SIZE;
use crate::virtio::ring::RingLayout;

/// The region version this back-end writes; 0 means a fresh (reset) one.
pub const INFLIGHT_VERSION: u16 = 1;
/// Largest region we accept from a peer (512 queues of 32768 entries fit).
pub const MAX_REGION: u64 = 256 << 20;
const ALIGN: u64 = 64;
const HEADER: u64 = 16;
const DESC_STATE: u64 = 16;
// Offsets in a queue's header and in one DescStateSplit.
const VERSION: u64 = 8;
const DESC_NUM: u64 = 10;
const LAST_BATCH_HEAD: u64 = 12;
const USED_IDX: u64 = 14;
const D_INFLIGHT: u64 = 0;
const D_NEXT: u64 = 6;
const D_COUNTER: u64 = 8;

/// Why a region was refused or could not be used.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// No queues, no entries, or more entries than a split ring has.
    #[error("inflight region geometry: {queues} queue(s) of {queue_size} entries")]
    Geometry {
        /// Queues asked for.
        queues: u16,
        /// Entries per queue asked for.
        queue_size: u16,
    },
    /// The peer's region is smaller than its geometry needs.
    #[error(
        "inflight region of {size} bytes: {queues} queue(s) of {queue_size} entries need {need}"
    )]
    TooSmall {
        /// The region's size.
        size: u64,
        /// Bytes the geometry needs.
        need: u64,
        /// Queues in the geometry.
        queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// The region (given or needed) exceeds [`MAX_REGION`].
    #[error("inflight region of {0} bytes is over the {MAX_REGION} byte limit")]
    TooLarge(u64),
    /// The peer's mmap offset is not page aligned.
    #[error("inflight region offset {0:#x} is not page aligned")]
    Misaligned(u64),
    /// The peer's offset and size reach past the end of its file.
    #[error("inflight region at {offset:#x}+{size:#x} lies past the end of its {file} byte file")]
    PastEof {
        /// The mmap offset.
        offset: u64,
        /// The mmap size.
        size: u64,
        /// The file's length.
        file: u64,
    },
    /// The peer's fd lacks F_SEAL_SHRINK.
    #[error("the inflight fd is not sealed against shrinking (a shrink would fault us)")]
    NotSealed,
    /// [`InflightRegion::queue`]: the queue index is past the region's.
    #[error("queue {q} is not in the inflight region ({queues} queue(s))")]
    NoQueue {
        /// The queue asked for.
        q: usize,
        /// Queues in the region.
        queues: u16,
    },
    /// [`InflightRegion::queue`]: the vring is empty or larger than the
    /// region's queues.
    #[error("queue {q}: the vring has {size} entries, the region holds {capacity}")]
    QueueTooBig {
        /// The queue.
        q: usize,
        /// The vring's size.
        size: u16,
        /// Entries per queue in the region.
        capacity: u16,
    },
    /// A load or store in the mapping failed, or named an entry past the
    /// vring.
    #[error("inflight region access at {offset:#x}: {reason}")]
    Access {
        /// Offset in the region (or the entry's head).
        offset: u64,
        /// What failed.
        reason: String,
    },
    /// Creating, sealing, inspecting or mapping the file failed.
    #[error("inflight region: {0}")]
    Io(#[from] io::Error),
    /// Reading the vring from guest memory failed.
    #[error("guest memory: {0}")]
    Guest(String),
}

/// Bytes one queue takes in the region (split ring).
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER + DESC_STATE * u64::from(queue_size)).next_multiple_of(ALIGN)
}

/// The whole region for `queues` queues of `queue_size` entries.
pub fn region_size(queues: u16, queue_size: u16) -> Result<u64, InflightError> {
    if queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return Err(InflightError::Geometry { queues, queue_size });
    }
    let need = queue_region_size(queue_size) * u64::from(queues);
    if need > MAX_REGION {
        return Err(InflightError::TooLarge(need));
    }
    Ok(need)
}

/// One inflight region, mapped shared.
pub struct InflightRegion {
    map: MmapRegion<()>,
    file: File,
    offset: u64,
    size: u64,
    queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("size", &self.size)
            .field("queues", &self.queues)
            .field("queue_size", &self.queue_size)
            .finish_non_exhaustive()
    }
}

impl InflightRegion {
    /// A fresh region (GET_INFLIGHT_FD): a sealed memfd, zero-filled, each
    /// queue's header at version 1 with `desc_num = queue_size`.
    pub fn create(queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let size = region_size(queues, queue_size)?;
        // SAFETY: memfd_create reads the NUL-terminated name and returns a
        // new descriptor or -1; nothing else is touched.
        let fd = unsafe {
            libc::memfd_create(
                c"vrio-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size)?;
        for q in 0..u64::from(queues) {
            let base = q * queue_region_size(queue_size);
            file.write_all_at(&INFLIGHT_VERSION.to_le_bytes(), base + VERSION)?;
            file.write_all_at(&queue_size.to_le_bytes(), base + DESC_NUM)?;
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        Self::map(file, size, 0, queues, queue_size)
    }

    /// Maps what the peer sent with SET_INFLIGHT_FD. Every size, offset and
    /// count is checked before mapping; the fd must be sealed against
    /// shrinking, so a later truncate cannot fault our accesses.
    pub fn from_peer(
        fd: OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        Self::map(File::from(fd), mmap_size, mmap_offset, queues, queue_size)
    }

    fn map(
        file: File,
        size: u64,
        offset: u64,
        queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let need = region_size(queues, queue_size)?;
        if size > MAX_REGION {
            return Err(InflightError::TooLarge(size));
        }
        if size < need {
            return Err(InflightError::TooSmall {
                size,
                need,
                queues,
                queue_size,
            });
        }
        // SAFETY: sysconf only returns a value.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if offset % page != 0 {
            return Err(InflightError::Misaligned(offset));
        }
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let len = file.metadata()?.len();
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(InflightError::PastEof {
                offset,
                size,
                file: len,
            });
        }
        let map = MmapRegion::build(
            Some(FileOffset::new(file.try_clone()?, offset)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self {
            map,
            file,
            offset,
            size,
            queues,
            queue_size,
        })
    }

    /// What GET_INFLIGHT_FD replies: the fd, mmap_size and mmap_offset.
    pub fn fd(&self) -> &File {
        &self.file
    }
    /// The mapped bytes (mmap_size).
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Where the mapping starts in the file (mmap_offset).
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Queues the region holds.
    pub fn queues(&self) -> u16 {
        self.queues
    }
    /// Entries per queue (the region's queue size, at least each vring's).
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `q`'s view, checked against the region's geometry and the
    /// vring's size.
    pub fn queue(&self, q: usize, ring_size: u16) -> Result<QueueRegion<'_>, InflightError> {
        if q >= usize::from(self.queues) {
            return Err(InflightError::NoQueue {
                q,
                queues: self.queues,
            });
        }
        if ring_size == 0 || ring_size > self.queue_size {
            return Err(InflightError::QueueTooBig {
                q,
                size: ring_size,
                capacity: self.queue_size,
            });
        }
        Ok(QueueRegion {
            region: self,
            base: q as u64 * queue_region_size(self.queue_size),
            size: ring_size,
        })
    }

    /// Entries marked in flight over all queues (for the log).
    pub fn inflight_entries(&self) -> usize {
        (0..usize::from(self.queues))
            .filter_map(|q| self.queue(q, self.queue_size).ok())
            .map(|v| {
                let n = v.desc_num().unwrap_or(0).min(self.queue_size);
                (0..n).filter(|&h| v.inflight(h).unwrap_or(false)).count()
            })
            .sum()
    }

    fn load<T: vm_memory::AtomicAccess>(&self, offset: u64) -> Result<T, InflightError> {
        let access = |reason: String| InflightError::Access { offset, reason };
        let o = usize::try_from(offset).map_err(|e| access(e.to_string()))?;
        self.map
            .as_volatile_slice()
            .load(o, Ordering::Acquire)
            .map_err(|e| access(e.to_string()))
    }

    fn store<T: vm_memory::AtomicAccess>(&self, offset: u64, v: T) -> Result<(), InflightError> {
        let access = |reason: String| InflightError::Access { offset, reason };
        let o = usize::try_from(offset).map_err(|e| access(e.to_string()))?;
        self.map
            .as_volatile_slice()
            .store(v, o, Ordering::Release)
            .map_err(|e| access(e.to_string()))
    }
}

/// One queue's part of the region; `size` entries in use (the vring's).
#[derive(Clone, Copy)]
pub struct QueueRegion<'a> {
    region: &'a InflightRegion,
    base: u64,
    size: u16,
}

impl QueueRegion<'_> {
    fn desc(&self, head: u16, field: u64) -> Result<u64, InflightError> {
        if head >= self.size {
            return Err(InflightError::Access {
                offset: u64::from(head),
                reason: format!("descriptor {head} of a {}-entry ring", self.size),
            });
        }
        Ok(self.base + HEADER + DESC_STATE * u64::from(head) + field)
    }
    /// The header's `version` (0: fresh, [`INFLIGHT_VERSION`]: ours).
    pub fn version(&self) -> Result<u16, InflightError> {
        self.region
            .load::<u16>(self.base + VERSION)
            .map(u16::from_le)
    }
    /// The header's `desc_num`: entries the region was laid out for.
    pub fn desc_num(&self) -> Result<u16, InflightError> {
        self.region
            .load::<u16>(self.base + DESC_NUM)
            .map(u16::from_le)
    }
    /// The header's `used_idx`: the used index the region last recorded.
    pub fn used_idx(&self) -> Result<u16, InflightError> {
        self.region
            .load::<u16>(self.base + USED_IDX)
            .map(u16::from_le)
    }
    /// The header's `last_batch_head`: first head of the last batch of
    /// completions recorded.
    pub fn last_batch_head(&self) -> Result<u16, InflightError> {
        self.region
            .load::<u16>(self.base + LAST_BATCH_HEAD)
            .map(u16::from_le)
    }
    /// Whether `head` is marked in flight.
    pub fn inflight(&self, head: u16) -> Result<bool, InflightError> {
        Ok(self.region.load::<u8>(self.desc(head, D_INFLIGHT)?)? != 0)
    }
    /// `head`'s counter: the order in which entries were marked.
    pub fn counter(&self, head: u16) -> Result<u64, InflightError> {
        self.region
            .load::<u64>(self.desc(head, D_COUNTER)?)
            .map(u64::from_le)
    }
    /// `head`'s `next`: the following head in the last batch.
    pub fn next(&self, head: u16) -> Result<u16, InflightError> {
        self.region
            .load::<u16>(self.desc(head, D_NEXT)?)
            .map(u16::from_le)
    }
    fn set_used_idx(&self, v: u16) -> Result<(), InflightError> {
        self.region.store(self.base + USED_IDX, v.to_le())
    }
    /// Marks `head` in flight: counter first, then the flag.
    fn mark(&self, head: u16, counter: u64) -> Result<(), InflightError> {
        self.region
            .store(self.desc(head, D_COUNTER)?, counter.to_le())?;
        self.region.store(self.desc(head, D_INFLIGHT)?, 1u8)
    }
    fn clear(&self, head: u16) -> Result<(), InflightError> {
        self.region.store(self.desc(head, D_INFLIGHT)?, 0u8)
    }
    /// Zeroes every entry and writes a version 1 header for `size` entries
    /// at `used_idx`.
    fn reset(&self, used_idx: u16) -> Result<(), InflightError> {
        for h in 0..self.size {
            self.clear(h)?;
            self.region.store(self.desc(h, D_COUNTER)?, 0u64)?;
            self.region.store(self.desc(h, D_NEXT)?, 0u16)?;
        }
        self.region.store(self.base, 0u64)?;
        self.region.store(self.base + DESC_NUM, self.size.to_le())?;
        self.region.store(self.base + LAST_BATCH_HEAD, 0u16)?;
        self.set_used_idx(used_idx)?;
        self.region
            .store(self.base + VERSION, INFLIGHT_VERSION.to_le())
    }
    /// (counter, head) of every entry in flight, oldest first.
    fn inflight_by_counter(&self) -> Result<Vec<(u64, u16)>, InflightError> {
        let mut v = Vec::new();
        for h in 0..self.size {
            if self.inflight(h)? {
                v.push((self.counter(h)?, h));
            }
        }
        v.sort_unstable();
        Ok(v)
    }
}

fn guest<T>(r: Result<T, crate::virtio::memory::MemoryError>) -> Result<T, InflightError> {
    r.map_err(|e| InflightError::Guest(e.to_string()))
}

/// `used.ring[idx].id` as a head (None when out of range).
fn used_head(
    mem: &impl GuestMemory,
    layout: &RingLayout,
    idx: u16,
) -> Result<Option<u16>, InflightError> {
    let mut b = [0u8; 4];
    guest(mem.read(layout.used_ring(idx), &mut b))?;
    let id = u32::from_le_bytes(b);
    Ok(u16::try_from(id).ok().filter(|&h| h < layout.size))
}

fn avail_head(
    mem: &impl GuestMemory,
    layout: &RingLayout,
    idx: u16,
) -> Result<Option<u16>, InflightError> {
    let mut b = [0u8; 2];
    guest(mem.read(layout.avail_ring(idx), &mut b))?;
    Ok(Some(u16::from_le_bytes(b)).filter(|&h| h < layout.size))
}

/// What a vring resumed from the region: which requests are resubmitted
/// and where the ring starts again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Heads the region held in flight, in counter order; they are the
    /// avail entries from `start` on, which the resumed ring serves first.
    pub resubmit: Vec<u16>,
    /// Avail index the ring resumes at: the used ring's index (everything
    /// before it completed, as both models complete in avail order).
    pub start: u16,
    /// Completions the region had not recorded yet (read back from the
    /// used ring).
    pub completed_since: u16,
    /// Avail entries after the resubmitted ones (made available or
    /// fetched after the region's last update); served too.
    pub beyond: u16,
    /// Region entries that are not on the avail ring from `start` on
    /// (already completed); cleared.
    pub stale: usize,
    /// The region was fresh (version 0) or did not fit this vring.
    pub fresh: bool,
}

/// The front's bookkeeping of one vring in the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueTracker {
    q: usize,
    layout: RingLayout,
    /// Avail entries before this were recorded.
    seen_avail: u16,
    /// Used entries before this were recorded.
    seen_used: u16,
    counter: u64,
    /// Completed heads of one sync, kept to spare an allocation per call.
    heads: Vec<u16>,
}

impl QueueTracker {
    /// Reads queue `q`'s region as a reconnecting back-end (spec: fix the
    /// last batch, then resubmit in counter order), reconciles it with the
    /// used ring and `base` (the VMM's SET_VRING_BASE) and leaves the
    /// region describing the resumed ring.
    pub fn recover(
        region: &InflightRegion,
        q: usize,
        layout: RingLayout,
        mem: &impl GuestMemory,
        base: u16,
    ) -> Result<(Self, Recovery), InflightError> {
        let view = region.queue(q, layout.size)?;
        let used = guest(mem.load_u16(layout.used_idx()))?;
        let avail = guest(mem.load_u16(layout.avail_idx()))?;
        let mut rec = Recovery {
            resubmit: Vec::new(),
            start: used,
            completed_since: 0,
            beyond: 0,
            stale: 0,
            fresh: false,
        };
        // A window larger than the ring is not a ring the driver wrote:
        // resume at the VMM's base and trust nothing.
        let window = avail.wrapping_sub(used);
        if window > layout.size {
            tracing::warn!(
                queue = q,
                avail,
                used,
                base,
                "the vring's indices are inconsistent; resuming at the VMM's base"
            );
            rec.start = base;
            rec.fresh = true;
            view.reset(base)?;
            return Ok((Self::at(q, layout, base, base, 0), rec));
        }
        if view.version()? != INFLIGHT_VERSION || view.desc_num()? != layout.size {
            rec.fresh = true;
            view.reset(used)?;
            return Ok((Self::at(q, layout, used, used, 0), rec));
        }
        // Spec step 1: completions the region missed. The spec walks the
        // last batch from `last_batch_head`; the used ring holds the same
        // heads, bounded by the ring size.
        let recorded = view.used_idx()?;
        let gap = used.wrapping_sub(recorded);
        if gap <= layout.size {
            for j in 0..gap {
                if let Some(h) = used_head(mem, &layout, recorded.wrapping_add(j))? {
                    view.clear(h)?;
                }
            }
            rec.completed_since = gap;
        }
        view.set_used_idx(used)?;
        // Spec step 2: the rest, in counter order, must be the window's
        // first entries.
        let mut position = vec![None; usize::from(layout.size)];
        for k in 0..window {
            if let Some(h) = avail_head(mem, &layout, used.wrapping_add(k))? {
                position[usize::from(h)].get_or_insert(k);
            }
        }
        let mut last = 0u16;
        for (_, h) in view.inflight_by_counter()? {
            match position[usize::from(h)] {
                Some(k) => {
                    rec.resubmit.push(h);
                    last = last.max(k + 1);
                }
                None => rec.stale += 1,
            }
        }
        rec.beyond = window - last;
        // The region from now on: the window up to the last resubmitted
        // entry in flight, counters in avail order.
        view.reset(used)?;
        for k in 0..last {
            if let Some(h) = avail_head(mem, &layout, used.wrapping_add(k))? {
                view.mark(h, u64::from(k))?;
            }
        }
        if base != used {
            tracing::warn!(
                queue = q,
                base,
                used,
                "the VMM's vring base is not the used index; resuming at the used index"
            );
        }
        Ok((
            Self::at(q, layout, used.wrapping_add(last), used, u64::from(last)),
            rec,
        ))
    }

    fn at(q: usize, layout: RingLayout, seen_avail: u16, seen_used: u16, counter: u64) -> Self {
        Self {
            q,
            layout,
            seen_avail,
            seen_used,
            counter,
            heads: Vec::new(),
        }
    }

    /// Records what changed on the ring since the last call: completions
    /// first (a head the driver reused is marked again after), then the
    /// avail entries past the used index.
    pub fn sync(
        &mut self,
        region: &InflightRegion,
        mem: &impl GuestMemory,
    ) -> Result<(), InflightError> {
        let layout = self.layout;
        let view = region.queue(self.q, layout.size)?;
        // Avail first: every entry read is older than the used index read
        // after it, so no completion can hide behind a stale avail index.
        let avail = guest(mem.load_u16(layout.avail_idx()))?;
        let used = guest(mem.load_u16(layout.used_idx()))?;
        let done = used.wrapping_sub(self.seen_used);
        let ahead = |i: u16| i.wrapping_sub(self.seen_avail);
        if done > layout.size || (ahead(avail) > layout.size && ahead(used) > layout.size) {
            return self.resync(&view, mem, avail, used);
        }
        if done > 0 {
            let mut heads = std::mem::take(&mut self.heads);
            heads.clear();
            for j in 0..done {
                if let Some(h) = used_head(mem, &layout, self.seen_used.wrapping_add(j))? {
                    heads.push(h);
                }
            }
            // The batch as the spec links it, then the clears, then the
            // region's used index.
            if let Some(&first) = heads.first() {
                region.store(view.base + LAST_BATCH_HEAD, first.to_le())?;
                for w in heads.windows(2) {
                    region.store(view.desc(w[0], D_NEXT)?, w[1].to_le())?;
                }
            }
            let cleared = heads.iter().try_for_each(|&h| view.clear(h));
            self.heads = heads;
            cleared?;
            view.set_used_idx(used)?;
            self.seen_used = used;
        }
        // Avail entries in [max(seen_avail, used), avail) are in flight.
        let from = if ahead(used) <= ahead(avail) {
            used
        } else {
            self.seen_avail
        };
        let n = avail.wrapping_sub(from);
        if n <= layout.size {
            for k in 0..n {
                if let Some(h) = avail_head(mem, &layout, from.wrapping_add(k))? {
                    view.mark(h, self.counter)?;
                    self.counter += 1;
                }
            }
        }
        // Entries past `avail` the server already completed count as seen.
        self.seen_avail = if ahead(used) > ahead(avail) && ahead(used) <= layout.size {
            used
        } else {
            avail
        };
        Ok(())
    }

    /// Starts over from the ring: the window [used, avail) in flight.
    fn resync(
        &mut self,
        view: &QueueRegion<'_>,
        mem: &impl GuestMemory,
        avail: u16,
        used: u16,
    ) -> Result<(), InflightError> {
        tracing::debug!(
            queue = self.q,
            avail,
            used,
            "inflight bookkeeping lost track; resyncing"
        );
        view.reset(used)?;
        let n = avail.wrapping_sub(used);
        if n <= self.layout.size {
            for k in 0..n {
                if let Some(h) = avail_head(mem, &self.layout, used.wrapping_add(k))? {
                    view.mark(h, self.counter)?;
                    self.counter += 1;
                }
            }
        }
        self.seen_used = used;
        self.seen_avail = avail;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::memory::{anonymous_memory, LocalMemory};

    const SIZE: u16 = 8;

    fn ring() -> (LocalMemory, RingLayout) {
        let mem = anonymous_memory(0x10000).unwrap();
        let layout = RingLayout::new(SIZE, 0x1000, 0x2000, 0x3000).unwrap();
        (mem, layout)
    }

    /// The driver posts `heads` (avail entries from avail.idx on).
    fn post(mem: &LocalMemory, l: &RingLayout, heads: &[u16]) {
        let mut a = mem.load_u16(l.avail_idx()).unwrap();
        for &h in heads {
            GuestMemory::write(mem, l.avail_ring(a), &h.to_le_bytes()).unwrap();
            a = a.wrapping_add(1);
        }
        mem.store_u16(l.avail_idx(), a).unwrap();
    }

    /// The device completes `heads` (used entries from used.idx on).
    fn complete(mem: &LocalMemory, l: &RingLayout, heads: &[u16]) {
        let mut u = mem.load_u16(l.used_idx()).unwrap();
        for &h in heads {
            GuestMemory::write(mem, l.used_ring(u), &u32::from(h).to_le_bytes()).unwrap();
            u = u.wrapping_add(1);
        }
        mem.store_u16(l.used_idx(), u).unwrap();
    }

    fn inflight(r: &InflightRegion, q: usize) -> Vec<u16> {
        let v = r.queue(q, SIZE).unwrap();
        v.inflight_by_counter()
            .unwrap()
            .into_iter()
            .map(|(_, h)| h)
            .collect()
    }

    #[test]
    fn layout_and_fresh_region() {
        assert_eq!(queue_region_size(128), 16 * 128 + 64);
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(3), 64);
        assert_eq!(queue_region_size(4), 128);
        let r = InflightRegion::create(2, 128).unwrap();
        assert_eq!(r.size(), 2 * (16 * 128 + 64));
        assert_eq!(r.fd().metadata().unwrap().len(), r.size());
        for q in 0..2 {
            let v = r.queue(q, 128).unwrap();
            assert_eq!(v.version().unwrap(), 1);
            assert_eq!(v.desc_num().unwrap(), 128);
            assert_eq!(v.used_idx().unwrap(), 0);
        }
        assert_eq!(r.inflight_entries(), 0);
        // Bounds of the views.
        assert!(matches!(
            r.queue(2, 128),
            Err(InflightError::NoQueue { .. })
        ));
        assert!(matches!(
            r.queue(0, 256),
            Err(InflightError::QueueTooBig { .. })
        ));
        assert!(r.queue(0, 64).unwrap().inflight(64).is_err());
    }

    #[test]
    fn hostile_sizes_and_offsets_are_refused() {
        let good = InflightRegion::create(2, 64).unwrap();
        let size = good.size();
        let fd = || OwnedFd::from(good.fd().try_clone().unwrap());
        let refuse = |r: Result<InflightRegion, InflightError>| r.unwrap_err().to_string();
        // Too small for the geometry it claims.
        let e = refuse(InflightRegion::from_peer(fd(), size - 1, 0, 2, 64));
        assert!(e.contains("need"), "{e}");
        let e = refuse(InflightRegion::from_peer(fd(), size, 0, 3, 64));
        assert!(e.contains("need"), "{e}");
        // Past the end of the file, or an offset that overflows.
        let e = refuse(InflightRegion::from_peer(fd(), size + 4096, 0, 2, 64));
        assert!(e.contains("past the end"), "{e}");
        let e = refuse(InflightRegion::from_peer(fd(), size, 4096, 2, 64));
        assert!(e.contains("past the end"), "{e}");
        let e = refuse(InflightRegion::from_peer(fd(), size, !4095, 2, 64));
        assert!(e.contains("past the end"), "{e}");
        let e = refuse(InflightRegion::from_peer(fd(), size, 12, 2, 64));
        assert!(e.contains("page aligned"), "{e}");
        // Absurd sizes and geometry.
        let e = refuse(InflightRegion::from_peer(fd(), u64::MAX, 0, 2, 64));
        assert!(e.contains("limit"), "{e}");
        let e = refuse(InflightRegion::from_peer(fd(), size, 0, 0, 64));
        assert!(e.contains("geometry"), "{e}");
        let e = refuse(InflightRegion::from_peer(fd(), size, 0, 1, 0));
        assert!(e.contains("geometry"), "{e}");
        let e = refuse(InflightRegion::from_peer(fd(), size, 0, 1, 65535));
        assert!(e.contains("geometry"), "{e}");
        // An fd that could shrink under us.
        let plain = tempfile_of(size);
        let e = refuse(InflightRegion::from_peer(plain, size, 0, 2, 64));
        assert!(e.contains("sealed"), "{e}");
        // And the good one maps, sharing the bytes.
        let peer = InflightRegion::from_peer(fd(), size, 0, 2, 64).unwrap();
        let (mem, l) = ring();
        let l = RingLayout::new(64, l.desc, l.avail, l.used).unwrap();
        let (mut t, _) = QueueTracker::recover(&peer, 1, l, &mem, 0).unwrap();
        post(&mem, &l, &[5]);
        t.sync(&peer, &mem).unwrap();
        assert_eq!(good.inflight_entries(), 1, "the same shared bytes");
    }

    fn tempfile_of(size: u64) -> OwnedFd {
        // SAFETY: memfd_create reads the NUL-terminated name only.
        let fd = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(size).unwrap();
        f.into()
    }

    #[test]
    fn bookkeeping_follows_the_ring_and_reused_heads() {
        let (mem, l) = ring();
        let r = InflightRegion::create(1, SIZE).unwrap();
        let (mut t, rec) = QueueTracker::recover(&r, 0, l, &mem, 0).unwrap();
        assert!(rec.resubmit.is_empty());
        post(&mem, &l, &[3, 1, 4]);
        t.sync(&r, &mem).unwrap();
        assert_eq!(inflight(&r, 0), [3, 1, 4], "counter order = avail order");
        complete(&mem, &l, &[3]);
        t.sync(&r, &mem).unwrap();
        assert_eq!(inflight(&r, 0), [1, 4]);
        let v = r.queue(0, SIZE).unwrap();
        assert_eq!(v.used_idx().unwrap(), 1);
        assert_eq!(v.last_batch_head().unwrap(), 3);
        // Between two looks: 1 and 4 complete, 3 is reused and posted
        // again, 1 too, then 1 completes again; 3 stays in flight.
        complete(&mem, &l, &[1, 4]);
        post(&mem, &l, &[3, 1]);
        complete(&mem, &l, &[3]);
        // Without the last completion: posted 3 then 1, 3 completed.
        t.sync(&r, &mem).unwrap();
        assert_eq!(inflight(&r, 0), [1]);
        assert_eq!(v.used_idx().unwrap(), 4);
        assert_eq!(v.last_batch_head().unwrap(), 1);
        assert_eq!(v.next(1).unwrap(), 4, "the batch is linked");
        // Completed before the front ever saw it: not marked.
        post(&mem, &l, &[6]);
        complete(&mem, &l, &[1, 6]);
        t.sync(&r, &mem).unwrap();
        assert!(inflight(&r, 0).is_empty());
        // Wrap the 16-bit indices.
        for _ in 0..40000 {
            post(&mem, &l, &[2, 5]);
            t.sync(&r, &mem).unwrap();
            complete(&mem, &l, &[2, 5]);
        }
        t.sync(&r, &mem).unwrap();
        assert!(inflight(&r, 0).is_empty());
        assert_eq!(v.used_idx().unwrap(), mem.load_u16(l.used_idx()).unwrap());
    }

    #[test]
    fn a_restart_resubmits_in_counter_order_from_the_used_index() {
        let (mem, l) = ring();
        let r = InflightRegion::create(2, SIZE).unwrap();
        let (mut t, _) = QueueTracker::recover(&r, 1, l, &mem, 0).unwrap();
        post(&mem, &l, &[0, 1, 2]);
        t.sync(&r, &mem).unwrap();
        complete(&mem, &l, &[0]);
        t.sync(&r, &mem).unwrap();
        post(&mem, &l, &[7, 6]);
        t.sync(&r, &mem).unwrap();
        // The back-end died after completing 1 without recording it, and
        // the guest posted 5 that nobody saw.
        complete(&mem, &l, &[1]);
        post(&mem, &l, &[5]);
        assert_eq!(r.inflight_entries(), 4);
        // The next process: QEMU's base after a crash is used.idx (2).
        let peer = InflightRegion::from_peer(
            OwnedFd::from(r.fd().try_clone().unwrap()),
            r.size(),
            0,
            2,
            SIZE,
        )
        .unwrap();
        let (mut t2, rec) = QueueTracker::recover(&peer, 1, l, &mem, 2).unwrap();
        assert_eq!(
            rec,
            Recovery {
                resubmit: vec![2, 7, 6],
                start: 2,
                completed_since: 1,
                beyond: 1,
                stale: 0,
                fresh: false,
            }
        );
        // The region now holds the resumed window; the tracker goes on.
        assert_eq!(inflight(&peer, 1), [2, 7, 6]);
        t2.sync(&peer, &mem).unwrap();
        assert_eq!(inflight(&peer, 1), [2, 7, 6, 5]);
        complete(&mem, &l, &[2, 7, 6, 5]);
        t2.sync(&peer, &mem).unwrap();
        assert!(inflight(&peer, 1).is_empty());
        // Queue 0 was never used: nothing to resubmit.
        let (_, rec0) = QueueTracker::recover(&peer, 0, l, &mem, 0).unwrap();
        assert!(rec0.resubmit.is_empty() && !rec0.fresh);
    }

    #[test]
    fn stale_and_fresh_regions() {
        let (mem, l) = ring();
        let r = InflightRegion::create(1, SIZE).unwrap();
        let v = r.queue(0, SIZE).unwrap();
        // Garbage: an entry in flight that the ring shows nowhere.
        post(&mem, &l, &[1, 2]);
        complete(&mem, &l, &[1, 2]);
        v.mark(4, 9).unwrap();
        v.set_used_idx(2).unwrap();
        let (_, rec) = QueueTracker::recover(&r, 0, l, &mem, 2).unwrap();
        assert_eq!(rec.stale, 1);
        assert!(rec.resubmit.is_empty());
        assert_eq!(r.inflight_entries(), 0, "stale entries are cleared");
        // Version 0 (a reset VM): fresh, resumed at the used index.
        r.store(v.base + VERSION, 0u16).unwrap();
        v.mark(1, 0).unwrap();
        let (_, rec) = QueueTracker::recover(&r, 0, l, &mem, 2).unwrap();
        assert!(rec.fresh && rec.resubmit.is_empty());
        assert_eq!(v.version().unwrap(), 1);
        // Indices no driver could write: the VMM's base wins.
        mem.store_u16(l.avail_idx(), 100).unwrap();
        let (_, rec) = QueueTracker::recover(&r, 0, l, &mem, 2).unwrap();
        assert_eq!((rec.start, rec.fresh), (2, true));
    }
}
