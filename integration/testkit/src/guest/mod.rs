//! Synthetic guests: guest memory, split rings driven by [`DriverQueue`],
//! kick and call eventfds, and a verified virtio-blk workload. They stand in
//! for real VMs in tests, benchmarks and the demo, for every I/O model.

mod pattern;
mod workload;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use vrio_core::memory::LocalMemory;

pub use crate::driver::GuestError;
use crate::driver::{build_queues, device_side, GuestRing};
use vrio_core::device::DeviceSide;
use vrio_core::ring::{DriverQueue, RingFeatures};

pub use pattern::{fill_pattern, pattern_matches};
pub use workload::{run_queue, QueueReport, WorkloadConfig};

/// Bytes of one data block (and of one request's data).
pub const BLOCK: u64 = 4096;

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

impl GuestRing for GuestQueue {
    fn driver(&self) -> &DriverQueue {
        &self.driver
    }
    fn eventfds(&self) -> (&EventFd, &EventFd) {
        (&self.kick, &self.call)
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

impl SyntheticGuest {
    pub fn new(cfg: GuestConfig) -> Result<Self, GuestError> {
        if cfg.queues == 0 || cfg.depth == 0 || cfg.depth > cfg.queue_size {
            return Err(GuestError::Config(format!(
                "need queues >= 1 and 1 <= depth <= queue size, got {cfg:?}"
            )));
        }
        let area = SlotArea::STRIDE * u64::from(cfg.depth);
        let areas = vec![area; usize::from(cfg.queues)];
        let (mem, parts) = build_queues(cfg.queue_size, cfg.features, &areas)?;
        let queues = parts
            .into_iter()
            .map(|p| GuestQueue {
                slots: SlotArea {
                    base: p.area,
                    depth: cfg.depth,
                },
                driver: p.driver,
                kick: p.kick,
                call: p.call,
            })
            .collect();
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
        let name = format!("guest{}.q{}", self.cfg.id, q);
        device_side(name, &self.mem, self.cfg.features, gq)
    }

    /// Splits the guest into its queues, for one driving thread per queue.
    pub fn into_queues(self) -> (Arc<LocalMemory>, Vec<GuestQueue>) {
        (self.mem, self.queues)
    }
}
