//! Sidecore counters, shared with whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct SidecoreStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub polls: AtomicU64,
    pub empty_polls: AtomicU64,
    /// Time spent in rounds that served at least one request.
    pub busy_ns: AtomicU64,
    /// Times the sidecore slept or blocked.
    pub sleeps: AtomicU64,
    /// Queue switches into (and out of) poll mode.
    pub poll_mode_on: AtomicU64,
    pub poll_mode_off: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub polls: u64,
    pub empty_polls: u64,
    pub busy_ns: u64,
    pub sleeps: u64,
    pub poll_mode_on: u64,
    pub poll_mode_off: u64,
}

impl SidecoreStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            polls: self.polls.load(Relaxed),
            empty_polls: self.empty_polls.load(Relaxed),
            busy_ns: self.busy_ns.load(Relaxed),
            sleeps: self.sleeps.load(Relaxed),
            poll_mode_on: self.poll_mode_on.load(Relaxed),
            poll_mode_off: self.poll_mode_off.load(Relaxed),
        }
    }
}
