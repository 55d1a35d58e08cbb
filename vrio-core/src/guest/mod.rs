//! Synthetic guests: guest memory, split rings driven by [`DriverQueue`],
//! kick and call eventfds, and a verified virtio-blk workload. They stand in
//! for real VMs in tests, benchmarks and the demo, for every I/O model.

mod pattern;
mod workload;

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::{anonymous_memory, LocalMemory, MemoryError};
use crate::models::DeviceSide;
use crate::ring::{DriverQueue, IndirectArea, QueueError, RingFeatures, RingLayout};

pub use pattern::{fill_pattern, pattern_matches};
pub use workload::{run_queue, QueueReport, WorkloadConfig};

/// Bytes of one data block (and of one request's data).
pub const BLOCK: u64 = 4096;
/// Entries of each per-head indirect table.
const INDIRECT_ENTRIES: u16 = 4;

#[derive(Debug, Clone, Copy)]
pub struct GuestConfig {
    pub id: u32,
    pub queues: u16,
    pub queue_size: u16,
    /// Requests in flight per queue (slots reserved in guest memory).
    pub depth: u16,
    pub features: RingFeatures,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            id: 0,
            queues: 1,
            queue_size: 256,
            depth: 32,
            features: RingFeatures {
                indirect: true,
                event_idx: true,
            },
        }
    }
}

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

/// Where one queue's request slots live.
#[derive(Debug, Clone, Copy)]
pub struct SlotArea {
    pub base: u64,
    pub depth: u16,
}

impl SlotArea {
    /// Slot layout: a header page (header at +0, status byte at +512), then
    /// one data block, all page aligned.
    pub const STRIDE: u64 = 2 * BLOCK;
    pub fn header(&self, slot: u16) -> u64 {
        self.base + Self::STRIDE * u64::from(slot)
    }
    pub fn status(&self, slot: u16) -> u64 {
        self.header(slot) + 512
    }
    pub fn data(&self, slot: u16) -> u64 {
        self.header(slot) + BLOCK
    }
}

pub struct GuestQueue {
    pub driver: DriverQueue,
    pub slots: SlotArea,
    pub kick: EventFd,
    pub call: EventFd,
}

pub struct SyntheticGuest {
    pub cfg: GuestConfig,
    mem: Arc<LocalMemory>,
    queues: Vec<GuestQueue>,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl SyntheticGuest {
    pub fn new(cfg: GuestConfig) -> Result<Self, GuestError> {
        if cfg.queues == 0 || cfg.depth == 0 || cfg.depth > cfg.queue_size {
            return Err(GuestError::Config(format!(
                "need queues >= 1 and 1 <= depth <= queue size, got {cfg:?}"
            )));
        }
        let (_, ring_bytes) = RingLayout::packed(cfg.queue_size, 0)?;
        let ind_bytes = IndirectArea::bytes_for(cfg.queue_size, INDIRECT_ENTRIES);
        let slot_bytes = SlotArea::STRIDE * u64::from(cfg.depth);
        let per_queue = align_up(ring_bytes, BLOCK) + align_up(ind_bytes, BLOCK) + slot_bytes;
        // Leave page 0 unused so that address 0 is never a valid buffer.
        let size = BLOCK + per_queue * u64::from(cfg.queues);
        let mem = Arc::new(anonymous_memory(size as usize)?);
        let mut queues = Vec::new();
        for q in 0..u64::from(cfg.queues) {
            let base = BLOCK + q * per_queue;
            let (layout, _) = RingLayout::packed(cfg.queue_size, base)?;
            let ind = base + align_up(ring_bytes, BLOCK);
            let slots = SlotArea {
                base: ind + align_up(ind_bytes, BLOCK),
                depth: cfg.depth,
            };
            let driver = DriverQueue::new(
                layout,
                cfg.features,
                Some(IndirectArea {
                    base: ind,
                    max_entries: INDIRECT_ENTRIES,
                }),
            );
            driver
                .init(&*mem)
                .map_err(|e| GuestError::Config(e.to_string()))?;
            queues.push(GuestQueue {
                driver,
                slots,
                kick: EventFd::new(EFD_NONBLOCK)?,
                call: EventFd::new(EFD_NONBLOCK)?,
            });
        }
        Ok(Self { cfg, mem, queues })
    }

    pub fn memory(&self) -> &Arc<LocalMemory> {
        &self.mem
    }

    /// What a device back-end needs to serve queue `q`.
    pub fn device_side(&self, q: usize) -> Result<DeviceSide, GuestError> {
        let gq = self
            .queues
            .get(q)
            .ok_or_else(|| GuestError::Config(format!("no queue {q}")))?;
        Ok(DeviceSide {
            name: format!("guest{}.q{}", self.cfg.id, q),
            mem: self.mem.clone(),
            layout: *gq.driver.layout(),
            features: self.cfg.features,
            kick: gq.kick.try_clone()?,
            call: gq.call.try_clone()?,
        })
    }

    /// Splits the guest into its queues, for one driving thread per queue.
    pub fn into_queues(self) -> (Arc<LocalMemory>, Vec<GuestQueue>) {
        (self.mem, self.queues)
    }
}
