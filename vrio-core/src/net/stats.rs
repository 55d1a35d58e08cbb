//! Per-port counters. Directions are the switch's: `rx` is what the switch
//! received from the port (a guest's TX), `tx` what it delivered to the port
//! (into a guest's RX ring, or out of the uplink).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub use crate::virtio::net::DropReason;

/// One port's live counters (relaxed atomics); read them with
/// [`PortStats::snapshot`].
#[derive(Debug, Default)]
pub struct PortStats {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    checksummed: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl PortStats {
    pub(crate) fn received(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
    }
    pub(crate) fn delivered(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }
    /// A transmitted frame whose partial checksum the device completed.
    pub(crate) fn checksummed(&self) {
        self.checksummed.fetch_add(1, Relaxed);
    }
    pub(crate) fn dropped(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Relaxed);
    }
    /// Reads every counter.
    pub fn snapshot(&self) -> PortSnapshot {
        let mut drops = [0; DropReason::ALL.len()];
        for (d, a) in drops.iter_mut().zip(&self.drops) {
            *d = a.load(Relaxed);
        }
        PortSnapshot {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            checksummed: self.checksummed.load(Relaxed),
            drops,
        }
    }
}

/// A port's counters read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortSnapshot {
    /// Frames the switch accepted from the port.
    pub rx_packets: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames delivered to the port (into the guest's RX ring, or out of
    /// the uplink).
    pub tx_packets: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Frames from the port whose checksum the device completed (CSUM).
    pub checksummed: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl PortSnapshot {
    /// Frames dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
    /// Frames dropped for any reason.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
    /// `(reason, count)` for every non-zero counter.
    pub fn nonzero_drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|&r| (r, self.drops(r)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}
