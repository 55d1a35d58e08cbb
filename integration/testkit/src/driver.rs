//! The guest driver's chores that every synthetic workload shares, blk or
//! net: laying out guest memory for rings and buffers, adding chains (with a
//! fallback when no indirect table is free), publishing and kicking, waiting
//! for an interrupt, and mapping in-flight heads back to buffer slots.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vrio_core::device::DeviceSide;
use vrio_core::memory::{shared_memory, LocalMemory, MemoryError};
use vrio_core::ring::{
    DriverError, DriverQueue, IndirectArea, QueueError, RingFeatures, RingLayout, Segment,
};

/// Why a synthetic guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("ring: {0}")]
    Queue(#[from] QueueError),
    #[error("eventfd: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad guest config: {0}")]
    Config(String),
}

/// Page size the layouts align to.
pub const PAGE: u64 = 4096;
/// Entries of each per-head indirect table.
const INDIRECT_ENTRIES: u16 = 4;

/// One queue as the guest sees it: its driver state, where its buffer area
/// starts, and its two eventfds.
pub struct QueueParts {
    /// The driver half of the split ring.
    pub driver: DriverQueue,
    /// First byte of this queue's buffer area (page aligned).
    pub area: u64,
    /// The guest kicks the device through this.
    pub kick: EventFd,
    /// The device interrupts the guest through this.
    pub call: EventFd,
}

/// A queue the guest drives: its ring and its two eventfds.
pub trait GuestRing {
    /// The driver half of the split ring.
    fn driver(&self) -> &DriverQueue;
    /// (kick, call) eventfds.
    fn eventfds(&self) -> (&EventFd, &EventFd);
}

/// What a device back-end needs to serve `ring`, under `name`.
pub fn device_side(
    name: String,
    mem: &Arc<LocalMemory>,
    features: RingFeatures,
    ring: &impl GuestRing,
) -> Result<DeviceSide, GuestError> {
    let (kick, call) = ring.eventfds();
    Ok(DeviceSide {
        name,
        mem: mem.clone(),
        layout: *ring.driver().layout(),
        features,
        kick: kick.try_clone()?,
        call: call.try_clone()?,
    })
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Allocates guest memory for one ring of `queue_size` (with its indirect
/// tables) per entry of `areas`, each followed by a buffer area of that many
/// bytes, and initialises the rings. Page 0 stays unused so that address 0
/// is never a valid buffer.
pub fn build_queues(
    queue_size: u16,
    features: RingFeatures,
    areas: &[u64],
) -> Result<(Arc<LocalMemory>, Vec<QueueParts>), GuestError> {
    let (_, ring_bytes) = RingLayout::packed(queue_size, 0)?;
    let ind_bytes = IndirectArea::bytes_for(queue_size, INDIRECT_ENTRIES);
    let head = align_up(ring_bytes, PAGE) + align_up(ind_bytes, PAGE);
    let sizes: Vec<u64> = areas.iter().map(|a| head + align_up(*a, PAGE)).collect();
    let size = PAGE + sizes.iter().sum::<u64>();
    let mem = Arc::new(shared_memory(size as usize)?);
    let mut queues = Vec::with_capacity(areas.len());
    let mut base = PAGE;
    for size in sizes {
        let (layout, _) = RingLayout::packed(queue_size, base)?;
        let driver = DriverQueue::new(
            layout,
            features,
            Some(IndirectArea {
                base: base + align_up(ring_bytes, PAGE),
                max_entries: INDIRECT_ENTRIES,
            }),
        );
        driver
            .init(&*mem)
            .map_err(|e| GuestError::Config(e.to_string()))?;
        queues.push(QueueParts {
            driver,
            area: base + head,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
        });
        base += size;
    }
    Ok((mem, queues))
}

/// Adds a chain; if it asked for an indirect table and none is free, adds
/// it with direct descriptors instead.
pub fn add_chain(
    driver: &mut DriverQueue,
    mem: &LocalMemory,
    readable: &[Segment],
    writable: &[Segment],
    indirect: bool,
) -> Result<u16, DriverError> {
    match driver.add(mem, readable, writable, indirect) {
        Err(DriverError::IndirectUnavailable) => driver.add(mem, readable, writable, false),
        r => r,
    }
}

/// Publishes what was added and kicks the device if it asked for it.
pub fn publish_and_kick(
    driver: &mut DriverQueue,
    mem: &LocalMemory,
    kick: &EventFd,
) -> Result<(), DriverError> {
    driver.publish(mem)?;
    if driver.should_kick(mem)? {
        // A full eventfd counter still wakes the device: ignore EAGAIN.
        let _ = kick.write(1);
    }
    Ok(())
}

/// Publishes and kicks if `added` chains were added. A ring the device
/// broke is counted in `errors`; returns whether the ring still works.
pub fn kick_added(
    driver: &mut DriverQueue,
    mem: &LocalMemory,
    kick: &EventFd,
    added: usize,
    errors: &mut u64,
) -> bool {
    if added > 0 && publish_and_kick(driver, mem, kick).is_err() {
        *errors += 1;
        return false;
    }
    true
}

/// The next used entry, None when there is none. A bad one (the device broke
/// the ring) is logged as the `side` device's, counted in `errors` and
/// returned as the error.
pub fn next_used(
    driver: &mut DriverQueue,
    mem: &LocalMemory,
    side: &str,
    errors: &mut u64,
) -> Result<Option<(u16, u32)>, DriverError> {
    driver.pop_used(mem).inspect_err(|e| {
        tracing::error!(error = %e, "{side}device returned a bad used entry");
        *errors += 1;
    })
}

/// [`wait_for_call`], with a ring the device broke counted in `errors` and
/// returned as None.
pub fn wait_counted(
    driver: &mut DriverQueue,
    mem: &LocalMemory,
    call: &EventFd,
    ms: i32,
    errors: &mut u64,
) -> Option<bool> {
    let r = wait_for_call(driver, mem, call, ms).ok();
    if r.is_none() {
        *errors += 1;
    }
    r
}

/// Re-enables interrupts and, unless used entries arrived meanwhile, waits
/// up to `ms` for the device's call. Returns whether the caller should look
/// at the used ring again at once.
pub fn wait_for_call(
    driver: &mut DriverQueue,
    mem: &LocalMemory,
    call: &EventFd,
    ms: i32,
) -> Result<bool, DriverError> {
    if driver.enable_interrupts(mem)? {
        return Ok(true);
    }
    let mut p = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd and we pass a count of 1; poll only
    // writes `revents`.
    unsafe {
        libc::poll(&mut p, 1, ms);
    }
    let _ = call.read();
    Ok(false)
}

/// The guest's buffer slots: which are free, and which slot each in-flight
/// head uses (so a used entry can be traced back to its buffer, and a head
/// the guest never added is caught).
pub struct Slots {
    free: Vec<u16>,
    head_slot: Vec<u16>,
}

const NO_SLOT: u16 = u16::MAX;

impl Slots {
    /// `slots` free buffer slots on a ring of `ring_size` heads.
    pub fn new(slots: u16, ring_size: u16) -> Self {
        Self {
            free: (0..slots).rev().collect(),
            head_slot: vec![NO_SLOT; usize::from(ring_size)],
        }
    }

    /// The slot the next request would use, if any is free.
    pub fn next_free(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Marks the slot [`Self::next_free`] gave as in flight under `head`.
    pub fn take(&mut self, head: u16) {
        if let (Some(si), Some(h)) = (self.free.pop(), self.head_slot.get_mut(usize::from(head))) {
            *h = si;
        }
    }

    /// The device returned `head`: frees and returns its slot, or None if
    /// no request is in flight under that head.
    pub fn complete(&mut self, head: u16) -> Option<u16> {
        let si = std::mem::replace(self.head_slot.get_mut(usize::from(head))?, NO_SLOT);
        if si == NO_SLOT {
            return None;
        }
        self.free.push(si);
        Some(si)
    }

    /// How many slots are free.
    pub fn free(&self) -> usize {
        self.free.len()
    }
}
