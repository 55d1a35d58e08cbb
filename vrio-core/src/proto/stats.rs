//! Counters of the remote data path: fabric operations and round trips per
//! request, the figures the vRIO design is judged by.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct RemoteStats {
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
    pub batches: AtomicU64,
    /// Work requests posted by the server (READ, WRITE, WRITE_WITH_IMM, SEND).
    pub fabric_ops: AtomicU64,
    /// Sum over requests of the round trips on that request's critical path.
    pub critical_rtts: AtomicU64,
    /// Round trips spent only discovering work (remote polls that found none).
    pub idle_rtts: AtomicU64,
    pub doorbells: AtomicU64,
    pub remote_polls: AtomicU64,
    pub fetches: AtomicU64,
    pub mode_switches: AtomicU64,
    /// Queues handed back to their VM host (QUIESCE).
    pub handovers: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RemoteSnapshot {
    pub requests: u64,
    pub bad_requests: u64,
    pub batches: u64,
    pub fabric_ops: u64,
    pub critical_rtts: u64,
    pub idle_rtts: u64,
    pub doorbells: u64,
    pub remote_polls: u64,
    pub fetches: u64,
    pub mode_switches: u64,
    pub handovers: u64,
}

impl RemoteStats {
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
        }
    }
}

impl RemoteSnapshot {
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
    }
    pub fn ops_per_request(&self) -> f64 {
        self.fabric_ops as f64 / (self.requests.max(1)) as f64
    }
    pub fn rtts_per_request(&self) -> f64 {
        self.critical_rtts as f64 / (self.requests.max(1)) as f64
    }
}
