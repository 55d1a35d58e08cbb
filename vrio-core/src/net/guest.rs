//! Synthetic virtio-net guests: guest memory, an RX and a TX split ring
//! driven by [`DriverQueue`], kick and call eventfds, and buffer areas.
//! [`super::traffic`] drives them.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::header::HDR_LEN;
use super::mac::MacAddr;
use crate::guest::GuestError;
use crate::memory::{anonymous_memory, LocalMemory};
use crate::models::DeviceSide;
use crate::ring::{DriverQueue, IndirectArea, RingFeatures, RingLayout};

const PAGE: u64 = 4096;
const INDIRECT_ENTRIES: u16 = 4;
/// Each TX slot holds a header and the largest frame (MTU 1500 + VLAN).
pub const TX_SLOT: u64 = 2048;

/// virtio-net queue numbers (§5.1.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

#[derive(Debug, Clone, Copy)]
pub struct NetGuestConfig {
    pub id: u32,
    pub mac: MacAddr,
    pub queue_size: u16,
    /// Bytes of each RX buffer the guest posts (one descriptor each). Below
    /// header + frame, frames only arrive through mergeable buffers.
    pub rx_buf_len: u32,
    pub features: RingFeatures,
}

impl NetGuestConfig {
    pub fn new(id: u32) -> Self {
        Self {
            id,
            mac: MacAddr::local(id),
            queue_size: 256,
            rx_buf_len: 2048,
            features: RingFeatures {
                indirect: true,
                event_idx: true,
            },
        }
    }
}

/// One queue as the guest sees it.
pub struct NetGuestQueue {
    pub driver: DriverQueue,
    /// `slots` buffers of `slot_len` bytes from `base`.
    pub base: u64,
    pub slot_len: u64,
    pub slots: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl NetGuestQueue {
    pub fn slot(&self, i: u16) -> u64 {
        self.base + self.slot_len * u64::from(i)
    }
}

pub struct NetGuest {
    pub cfg: NetGuestConfig,
    mem: Arc<LocalMemory>,
    rx: NetGuestQueue,
    tx: NetGuestQueue,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl NetGuest {
    pub fn new(cfg: NetGuestConfig) -> Result<Self, GuestError> {
        if cfg.rx_buf_len < HDR_LEN as u32 {
            return Err(GuestError::Config(format!(
                "RX buffers of {} bytes cannot hold a header",
                cfg.rx_buf_len
            )));
        }
        let (_, ring_bytes) = RingLayout::packed(cfg.queue_size, 0)?;
        let ind_bytes = IndirectArea::bytes_for(cfg.queue_size, INDIRECT_ENTRIES);
        let head = align_up(ring_bytes, PAGE) + align_up(ind_bytes, PAGE);
        let slot_lens = [u64::from(cfg.rx_buf_len), TX_SLOT];
        let sizes: Vec<u64> = slot_lens
            .iter()
            .map(|l| head + align_up(l * u64::from(cfg.queue_size), PAGE))
            .collect();
        // Page 0 stays unused so that address 0 is never a valid buffer.
        let size = PAGE + sizes.iter().sum::<u64>();
        let mem = Arc::new(anonymous_memory(size as usize)?);
        let mut queues = Vec::new();
        let mut base = PAGE;
        for (q, &slot_len) in slot_lens.iter().enumerate() {
            let (layout, _) = RingLayout::packed(cfg.queue_size, base)?;
            let ind = base + align_up(ring_bytes, PAGE);
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
            queues.push(NetGuestQueue {
                driver,
                base: base + head,
                slot_len,
                slots: cfg.queue_size,
                kick: EventFd::new(EFD_NONBLOCK)?,
                call: EventFd::new(EFD_NONBLOCK)?,
            });
            base += sizes[q];
        }
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
            return Err(GuestError::Config("a net guest has two queues".into()));
        };
        Ok(Self { cfg, mem, rx, tx })
    }

    pub fn memory(&self) -> &Arc<LocalMemory> {
        &self.mem
    }

    /// What the device needs to serve queue `q` ([`RX_QUEUE`] or [`TX_QUEUE`]).
    pub fn device_side(&self, q: usize) -> Result<DeviceSide, GuestError> {
        let gq = match q {
            RX_QUEUE => &self.rx,
            TX_QUEUE => &self.tx,
            _ => return Err(GuestError::Config(format!("no queue {q}"))),
        };
        let kind = if q == RX_QUEUE { "rx" } else { "tx" };
        Ok(DeviceSide {
            name: format!("net{}.{kind}", self.cfg.id),
            mem: self.mem.clone(),
            layout: *gq.driver.layout(),
            features: self.cfg.features,
            kick: gq.kick.try_clone()?,
            call: gq.call.try_clone()?,
        })
    }

    /// Splits the guest into memory, RX queue and TX queue, for one driving
    /// thread per queue.
    pub fn into_parts(self) -> (Arc<LocalMemory>, NetGuestQueue, NetGuestQueue) {
        (self.mem, self.rx, self.tx)
    }
}
