//! Sidecore counters, shared with whoever reports them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters of one sidecore (or vhost-style worker), bumped with
/// relaxed atomics; read them with [`SidecoreStats::snapshot`].
#[derive(Debug, Default)]
pub struct SidecoreStats {
    /// Requests served ([`PollOutcome::requests`](super::PollOutcome::requests)).
    pub requests: AtomicU64,
    /// Bytes in their buffers.
    pub bytes: AtomicU64,
    /// Failed requests ([`PollOutcome::errors`](super::PollOutcome::errors)).
    pub errors: AtomicU64,
    /// Queue polls.
    pub polls: AtomicU64,
    /// Polls that found nothing.
    pub empty_polls: AtomicU64,
    /// Time spent in rounds that served at least one request.
    pub busy_ns: AtomicU64,
    /// Times the sidecore slept or blocked.
    pub sleeps: AtomicU64,
    /// Queue switches into poll mode.
    pub poll_mode_on: AtomicU64,
    /// Queue switches back to guest notifications.
    pub poll_mode_off: AtomicU64,
    /// Comparisons of doorbells and remote polls by the adaptive chooser.
    pub discovery_comparisons: AtomicU64,
    /// Changes of the advice to the adaptive queues (by a comparison, or
    /// back to doorbells for too little load).
    pub discovery_switches: AtomicU64,
    /// 1 while the adaptive queues are advised remote polls, else 0.
    pub remote_poll_advised: AtomicU64,
}

/// The counters of [`SidecoreStats`] read at one moment; each field as the
/// counter of the same name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// See [`SidecoreStats::requests`].
    pub requests: u64,
    /// See [`SidecoreStats::bytes`].
    pub bytes: u64,
    /// See [`SidecoreStats::errors`].
    pub errors: u64,
    /// See [`SidecoreStats::polls`].
    pub polls: u64,
    /// See [`SidecoreStats::empty_polls`].
    pub empty_polls: u64,
    /// See [`SidecoreStats::busy_ns`].
    pub busy_ns: u64,
    /// See [`SidecoreStats::sleeps`].
    pub sleeps: u64,
    /// See [`SidecoreStats::poll_mode_on`].
    pub poll_mode_on: u64,
    /// See [`SidecoreStats::poll_mode_off`].
    pub poll_mode_off: u64,
    /// See [`SidecoreStats::discovery_comparisons`].
    pub discovery_comparisons: u64,
    /// See [`SidecoreStats::discovery_switches`].
    pub discovery_switches: u64,
    /// See [`SidecoreStats::remote_poll_advised`].
    pub remote_poll_advised: u64,
}

impl SidecoreStats {
    /// Reads every counter (relaxed: the fields need not agree exactly).
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
            discovery_comparisons: self.discovery_comparisons.load(Relaxed),
            discovery_switches: self.discovery_switches.load(Relaxed),
            remote_poll_advised: self.remote_poll_advised.load(Relaxed),
        }
    }
}
