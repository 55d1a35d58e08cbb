//! Synthetic virtio-net guests: guest memory, an RX and a TX split ring
//! driven by [`DriverQueue`], kick and call eventfds, and buffer areas.
//! `traffic.rs` drives them.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::driver::{build_queues, device_side, GuestRing};
use crate::guest::GuestError;
use vrio_core::device::DeviceSide;
use vrio_core::memory::LocalMemory;
use vrio_core::net::header::HDR_LEN;
use vrio_core::net::mac::MacAddr;
use vrio_core::ring::{DriverQueue, RingFeatures};

/// Each TX slot holds a header and the largest frame (MTU 1500 + VLAN).
pub const TX_SLOT: u64 = 2048;

pub use vrio_core::net::{RX_QUEUE, TX_QUEUE};

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

impl GuestRing for NetGuestQueue {
    fn driver(&self) -> &DriverQueue {
        &self.driver
    }
    fn eventfds(&self) -> (&EventFd, &EventFd) {
        (&self.kick, &self.call)
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

impl NetGuest {
    pub fn new(cfg: NetGuestConfig) -> Result<Self, GuestError> {
        if cfg.rx_buf_len < HDR_LEN as u32 {
            return Err(GuestError::Config(format!(
                "RX buffers of {} bytes cannot hold a header",
                cfg.rx_buf_len
            )));
        }
        let slot_lens = [u64::from(cfg.rx_buf_len), TX_SLOT];
        let areas = slot_lens.map(|l| l * u64::from(cfg.queue_size));
        let (mem, parts) = build_queues(cfg.queue_size, cfg.features, &areas)?;
        let mut queues = parts
            .into_iter()
            .zip(slot_lens)
            .map(|(p, slot_len)| NetGuestQueue {
                driver: p.driver,
                base: p.area,
                slot_len,
                slots: cfg.queue_size,
                kick: p.kick,
                call: p.call,
            });
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(GuestError::Config("a net guest has two queues".into()));
        };
        Ok(Self { cfg, mem, rx, tx })
    }

    pub fn memory(&self) -> &Arc<LocalMemory> {
        &self.mem
    }

    /// What the device needs to serve queue `q` ([`RX_QUEUE`] or [`TX_QUEUE`]).
    pub fn device_side(&self, q: usize) -> Result<DeviceSide, GuestError> {
        let (gq, kind) = match q {
            RX_QUEUE => (&self.rx, "rx"),
            TX_QUEUE => (&self.tx, "tx"),
            _ => return Err(GuestError::Config(format!("no queue {q}"))),
        };
        let name = format!("net{}.{kind}", self.cfg.id);
        device_side(name, &self.mem, self.cfg.features, gq)
    }

    /// Splits the guest into memory, RX queue and TX queue, for one driving
    /// thread per queue.
    pub fn into_parts(self) -> (Arc<LocalMemory>, NetGuestQueue, NetGuestQueue) {
        (self.mem, self.rx, self.tx)
    }
}
