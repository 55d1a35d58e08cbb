//! How a remote queue on the I/O server is bounded (request sizes, batches,
//! fetches, the adaptive notification switch, timeouts). Its own module
//! because every queue kind and the shared `FabricRing` read it.

use std::time::Duration;

/// Limits and timings of one remote queue on the I/O server.
#[derive(Debug, Clone, Copy)]
pub struct RemoteQueueConfig {
    /// Largest request (all segments) served; larger ones fail.
    pub max_request: usize,
    /// Requests per batch (also bounded by the sidecore's budget).
    pub max_batch: usize,
    /// Fetches allowed per chain before it is refused.
    pub max_fetches: u32,
    /// Adaptive: a batch at least this big counts as busy...
    pub busy_batch: usize,
    /// ...and this many busy batches in a row switch to remote polling.
    pub busy_polls: u32,
    /// Adaptive: this many empty remote polls switch back to doorbells.
    pub idle_polls: u32,
    /// Give up on the peer after this long without a completion.
    pub op_timeout: Duration,
    /// Work requests the endpoint's send queue holds: a wave larger than
    /// what is free is posted in parts, each waiting for room.
    pub send_depth: usize,
    /// Ask for a batch's interrupt in its reply wave, behind used.idx, when
    /// the guest's suppression word as last read predicts it wants one
    /// (the agent then decides on the word itself): an interrupt-driven
    /// guest gets its completion a round trip sooner; a guest that finds
    /// its completions before it sleeps gets the agent woken for nothing.
    pub early_interrupts: bool,
}

impl Default for RemoteQueueConfig {
    fn default() -> Self {
        Self {
            max_request: 128 << 10,
            max_batch: 32,
            max_fetches: 4,
            busy_batch: 4,
            busy_polls: 8,
            idle_polls: 256,
            op_timeout: Duration::from_secs(10),
            send_depth: vrio_rdma::EndpointConfig::default().send_depth as usize,
            early_interrupts: true,
        }
    }
}
