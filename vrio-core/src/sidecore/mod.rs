//! Sidecores: one polling thread serving many queues (Elvis's fine-grained
//! scheduling), with per-queue poll mode and an idle back-off.
//!
//! The scheduling logic ([`Sidecore`]) is a state machine driven one round at
//! a time, so tests drive it deterministically with fake queues and a fake
//! clock. [`SidecoreThread`] is the thin runtime around it: a thread, an
//! epoll set of kick fds for when every queue sleeps, and a command channel.

mod backoff;
mod chooser;
mod engine;
mod stats;
mod thread;

use std::os::fd::RawFd;
use std::time::Instant;

pub use backoff::Backoff;
pub use chooser::{ChooserConfig, Discovery, ModeChooser};
pub use engine::{RoundOutcome, Sidecore, SidecoreConfig};
pub use stats::{SidecoreStats, StatsSnapshot};
pub use thread::{SidecoreHandle, SidecoreThread};

/// What one poll of a queue did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollOutcome {
    /// Requests served (added to the used ring).
    pub requests: u32,
    /// Bytes in the served requests' buffers.
    pub bytes: u64,
    /// Requests that failed validation (bad chains); already completed.
    pub errors: u32,
    /// Work in flight that needs further polls (a fabric wave that has not
    /// landed yet): the queue is busy even if nothing completed.
    pub pending: u32,
}

/// A queue a sidecore can serve: local rings, or remote rings reached over
/// the fabric. Implementations do the per-request work; the sidecore only
/// schedules.
pub trait ServedQueue: Send {
    /// Serves at most `budget` requests without blocking. `now` is the
    /// sidecore round's clock, read once per round: most polls find
    /// nothing, and a clock read per queue would cost as much as one.
    fn poll(&mut self, budget: usize, now: Instant) -> Result<PollOutcome, QueueFailure>;
    /// Turns guest kicks on (`true`) or off (polling). Turning them on
    /// returns whether work arrived meanwhile, which must then be served.
    fn set_notifications(&mut self, enabled: bool) -> Result<bool, QueueFailure>;
    /// Readable when the guest kicked (for sleeping when all queues idle).
    fn kick_fd(&self) -> Option<RawFd>;
    /// Consumes a pending guest kick; true when there was one. Queues in
    /// notification mode are only polled after a kick, so that a remote
    /// queue costs no fabric traffic while its guest is idle.
    fn take_kick(&mut self) -> bool {
        true
    }
    /// The sidecore's advice on how to learn of requests, from what it
    /// measured ([`ModeChooser`]): by remote polls while busy (`true`), or
    /// by the VM host's doorbells. An adaptive remote queue takes it (it
    /// switches at its next batch) and returns whether its remote polls
    /// cost the VM host no CPU (see [`ModeChooser::lean_remote`]); the
    /// default ignores it and returns None.
    fn advise_remote_poll(&mut self, _remote_poll: bool) -> Option<bool> {
        None
    }
    /// The queue's name (`dev<key>.q<queue>` on an I/O server).
    fn name(&self) -> &str;
}

/// A queue that cannot go on (its device needs a reset); the sidecore drops
/// it and keeps serving the others.
#[derive(Debug, thiserror::Error)]
#[error("queue {queue}: {reason}")]
pub struct QueueFailure {
    /// The failed queue's name.
    pub queue: String,
    /// The rule that broke, as the queue kind's own typed error (a local
    /// ring's `ring::QueueError`, a remote queue's `RemoteQueueError`):
    /// boxed, as the sidecore serves every kind; `downcast_ref` tells which.
    pub reason: Box<dyn std::error::Error + Send + Sync>,
    /// The queue ended as it should (its VM host detached it or asked for
    /// it back), not from a fault: logged at info rather than as a warning.
    pub routine: bool,
}

#[cfg(test)]
mod tests;
