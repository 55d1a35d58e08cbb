//! Why a remote queue on the I/O server stopped: one variant per rule that
//! broke. The sidecore gets it boxed in a [`QueueFailure`] (it serves every
//! queue kind), where `reason.downcast_ref::<RemoteQueueError>()` finds it.
//!
//! The messages are the ones the queues logged before the errors were
//! typed; operators grep them.

use std::sync::Arc;

use vrio_rdma::{FabricError, WcStatus};

use crate::proto::wire::{Message, WireError};
use crate::sidecore::QueueFailure;
use crate::virtio::memory::MemoryError;
use crate::virtio::ring::QueueError;

/// A remote queue's failure. Cloned when the queue latches it, so the
/// non-`Clone` sources are shared.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteQueueError {
    /// A fabric call (post, poll, register) failed.
    #[error(transparent)]
    Fabric(Arc<FabricError>),
    /// An OS resource (staging memory, eventfd, epoll) could not be had.
    #[error(transparent)]
    Io(Arc<std::io::Error>),
    /// A guest range outside the guest's memory, or a staging offset
    /// outside staging.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest broke a ring rule (the avail index jumped).
    #[error(transparent)]
    Ring(#[from] QueueError),
    /// A wave or a fetch got no completion within the operation timeout.
    #[error("fabric operation timed out")]
    Timeout,
    /// The send queue never had room within the operation timeout.
    #[error("fabric send queue stayed full")]
    SendQueueFull,
    /// The link to the VM host broke (flushed or out of retries).
    #[error("the VM host disconnected ({0:?})")]
    Disconnected(WcStatus),
    /// Any other failed completion.
    #[error("fabric completion {status:?} for wr {wr_id:#x}")]
    Completion {
        /// The completion's status.
        status: WcStatus,
        /// The work request it completes.
        wr_id: u64,
    },
    /// A receive completion named a buffer we never posted.
    #[error("receive completion out of range")]
    RecvOutOfRange,
    /// The agent sent bytes that do not decode.
    #[error("bad message from agent: {0}")]
    BadMessage(#[source] WireError),
    /// The agent sent a message that has no place on a served queue.
    #[error("unexpected message from agent: {0:?}")]
    UnexpectedMessage(Box<Message>),
    /// A message of ours did not encode.
    #[error(transparent)]
    Encode(WireError),
    /// An avail entry announced by the agent was in neither its doorbells
    /// nor the avail ring.
    #[error("avail entry vanished")]
    AvailEntryVanished,
    /// Not a fault: the agent asked for the queue back (QUIESCE) and got
    /// it at `next`; the queue leaves its sidecore as failed ones do.
    #[error("handed back to the VM host at {next}")]
    HandedBack {
        /// The ring position the agent resumes at.
        next: u16,
    },
}

impl From<FabricError> for RemoteQueueError {
    fn from(e: FabricError) -> Self {
        Self::Fabric(Arc::new(e))
    }
}

impl From<std::io::Error> for RemoteQueueError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(Arc::new(e))
    }
}

impl RemoteQueueError {
    /// This error as queue `name`'s failure, for the sidecore.
    pub fn at(self, name: &str) -> QueueFailure {
        QueueFailure {
            queue: name.to_string(),
            routine: matches!(self, Self::Disconnected(_) | Self::HandedBack { .. }),
            reason: Box::new(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_the_old_text_and_says_which_rule_broke() {
        let f = RemoteQueueError::Timeout.at("dev1.q0");
        assert_eq!(f.to_string(), "queue dev1.q0: fabric operation timed out");
        let jump = RemoteQueueError::from(QueueError::AvailIndexJump {
            last: 3,
            idx: 1000,
            size: 256,
        })
        .at("dev1.q1");
        assert!(jump
            .to_string()
            .contains("avail index jumped from 3 to 1000"));
        assert!(matches!(
            jump.reason.downcast_ref::<RemoteQueueError>(),
            Some(RemoteQueueError::Ring(QueueError::AvailIndexJump {
                idx: 1000,
                ..
            }))
        ));
    }
}
