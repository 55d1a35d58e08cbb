//! Counters of the remote data path: fabric operations and round trips per
//! request, the figures the vRIO design is judged by.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, shared by the queues of one I/O server (one set for blk,
/// one for net) and bumped with relaxed atomics; read them through
/// [`RemoteStats::snapshot`].
#[derive(Debug, Default)]
pub struct RemoteStats {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests that failed validation (bad chains), completed as errors.
    pub bad_requests: AtomicU64,
    /// Batches served.
    pub batches: AtomicU64,
    /// Work requests posted by the server (READ, WRITE, WRITE_WITH_IMM, SEND).
    pub fabric_ops: AtomicU64,
    /// Sum over requests of the round trips on that request's critical path.
    pub critical_rtts: AtomicU64,
    /// Round trips spent only discovering work (remote polls that found none).
    pub idle_rtts: AtomicU64,
    /// Doorbell messages received from agents.
    pub doorbells: AtomicU64,
    /// READs of a guest's avail ring (remote polling).
    pub remote_polls: AtomicU64,
    /// READs of descriptors or indirect tables the doorbell did not carry.
    pub fetches: AtomicU64,
    /// Switches between doorbells and remote polling (adaptive mode).
    pub mode_switches: AtomicU64,
    /// Queues handed back to their VM host (QUIESCE).
    pub handovers: AtomicU64,
    /// Guest bytes taken from doorbells' inline copies instead of READ.
    pub inline_bytes: AtomicU64,
    /// Interrupts the server asked VM hosts for (the guests' suppression
    /// allowed every other batch to complete without the VM host).
    pub interrupts: AtomicU64,
}

/// The counters of [`RemoteStats`] read at one moment; each field as the
/// counter of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RemoteSnapshot {
    /// See [`RemoteStats::requests`].
    pub requests: u64,
    /// See [`RemoteStats::bad_requests`].
    pub bad_requests: u64,
    /// See [`RemoteStats::batches`].
    pub batches: u64,
    /// See [`RemoteStats::fabric_ops`].
    pub fabric_ops: u64,
    /// See [`RemoteStats::critical_rtts`].
    pub critical_rtts: u64,
    /// See [`RemoteStats::idle_rtts`].
    pub idle_rtts: u64,
    /// See [`RemoteStats::doorbells`].
    pub doorbells: u64,
    /// See [`RemoteStats::remote_polls`].
    pub remote_polls: u64,
    /// See [`RemoteStats::fetches`].
    pub fetches: u64,
    /// See [`RemoteStats::mode_switches`].
    pub mode_switches: u64,
    /// See [`RemoteStats::handovers`].
    pub handovers: u64,
    /// See [`RemoteStats::inline_bytes`].
    pub inline_bytes: u64,
    /// See [`RemoteStats::interrupts`].
    pub interrupts: u64,
}

impl RemoteStats {
    /// Reads every counter (relaxed: the fields need not agree exactly).
    pub fn snapshot(&self) -> RemoteSnapshot {
        RemoteSnapshot {
            requests: self.requests.load(Relaxed),
            bad_requests: self.bad_requests.load(Relaxed),
            batches: self.batches.load(Relaxed),
            fabric_ops: self.fabric_ops.load(Relaxed),
            critical_rtts: self.critical_rtts.load(Relaxed),
            idle_rtts: self.idle_rtts.load(Relaxed),
            doorbells: self.doorbells.load(Relaxed),
            remote_polls: self.remote_polls.load(Relaxed),
            fetches: self.fetches.load(Relaxed),
            mode_switches: self.mode_switches.load(Relaxed),
            handovers: self.handovers.load(Relaxed),
            inline_bytes: self.inline_bytes.load(Relaxed),
            interrupts: self.interrupts.load(Relaxed),
        }
    }
}

impl RemoteSnapshot {
    /// Adds `o` field by field (summing servers or queues).
    pub fn add(&mut self, o: &RemoteSnapshot) {
        self.requests += o.requests;
        self.bad_requests += o.bad_requests;
        self.batches += o.batches;
        self.fabric_ops += o.fabric_ops;
        self.critical_rtts += o.critical_rtts;
        self.idle_rtts += o.idle_rtts;
        self.doorbells += o.doorbells;
        self.remote_polls += o.remote_polls;
        self.fetches += o.fetches;
        self.mode_switches += o.mode_switches;
        self.handovers += o.handovers;
        self.inline_bytes += o.inline_bytes;
        self.interrupts += o.interrupts;
    }
    /// Fabric operations per request (0 requests count as 1).
    pub fn ops_per_request(&self) -> f64 {
        self.fabric_ops as f64 / (self.requests.max(1)) as f64
    }
    /// Critical-path round trips per request (0 requests count as 1).
    pub fn rtts_per_request(&self) -> f64 {
        self.critical_rtts as f64 / (self.requests.max(1)) as f64
    }
}
