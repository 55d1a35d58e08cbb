//! Counters of the remote data path: fabric operations and round trips per
//! request, the figures the vRIO design is judged by.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Defines [`RemoteStats`] and [`RemoteSnapshot`] from one list of
/// counters, so that the two cannot drift apart.
macro_rules! remote_counters {
    ($($(#[doc = $doc:expr])* $name:ident,)*) => {
        /// Live counters, shared by the queues of one I/O server (one set for
        /// blk, one for net) and bumped with relaxed atomics; read them
        /// through [`RemoteStats::snapshot`].
        #[derive(Debug, Default)]
        pub struct RemoteStats {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        /// The counters of [`RemoteStats`] read at one moment; each field as
        /// the counter of the same name.
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub struct RemoteSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl RemoteStats {
            /// Reads every counter (relaxed: the fields need not agree
            /// exactly).
            pub fn snapshot(&self) -> RemoteSnapshot {
                RemoteSnapshot {
                    $($name: self.$name.load(Relaxed),)*
                }
            }
        }

        impl RemoteSnapshot {
            /// Adds `o` field by field (summing servers or queues).
            pub fn add(&mut self, o: &RemoteSnapshot) {
                $(self.$name += o.$name;)*
            }
        }
    };
}

remote_counters! {
    /// Requests completed.
    requests,
    /// Requests that failed validation (bad chains), completed as errors.
    bad_requests,
    /// Batches served.
    batches,
    /// Work requests of the server's waves (READ, WRITE, WRITE_WITH_IMM;
    /// control messages are `sends`).
    fabric_ops,
    /// Sum over requests of the round trips on that request's critical path.
    critical_rtts,
    /// Round trips spent only discovering work (remote polls that found none).
    idle_rtts,
    /// Doorbell messages received from agents.
    doorbells,
    /// READs of a guest's avail ring (remote polling).
    remote_polls,
    /// READs of descriptors or indirect tables the doorbell did not carry.
    fetches,
    /// Switches between doorbells and remote polling (adaptive mode).
    mode_switches,
    /// Queues handed back to their VM host (QUIESCE).
    handovers,
    /// Guest bytes taken from doorbells' inline copies instead of READ.
    inline_bytes,
    /// Interrupts the server asked VM hosts for (the guests' suppression
    /// allowed every other batch to complete without the VM host).
    interrupts,
    /// READ work requests posted.
    reads,
    /// WRITE work requests posted.
    writes,
    /// WRITE_WITH_IMM work requests posted.
    write_imms,
    /// SEND work requests posted (control messages to agents).
    sends,
    /// Bytes READ from guest memory.
    read_bytes,
    /// Bytes written into guest memory (WRITE and WRITE_WITH_IMM).
    write_bytes,
    /// Work requests that completed with an error (the queue ends; the
    /// agent reconnects or fails over).
    completion_errors,
}

impl RemoteSnapshot {
    /// Fabric operations per request (0 requests count as 1).
    pub fn ops_per_request(&self) -> f64 {
        self.fabric_ops as f64 / (self.requests.max(1)) as f64
    }
    /// Critical-path round trips per request (0 requests count as 1).
    pub fn rtts_per_request(&self) -> f64 {
        self.critical_rtts as f64 / (self.requests.max(1)) as f64
    }
}
