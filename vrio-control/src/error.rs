//! Errors: the controller's (and their gRPC status codes), and those of the
//! glue that I/O servers and VM hosts use to follow it.

use std::time::Duration;

use crate::client::ConnectError;
use crate::store::StoreError;

/// Why a controller request failed. Each variant maps to the gRPC status
/// code of the same name (`Store` and `Credential` to `INTERNAL`).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// An unknown server, device or queue.
    #[error("not found: {0}")]
    NotFound(String),
    /// The id is taken (a known device, or a server whose lease is live).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A malformed request (empty id, out-of-range count, bad load value).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Valid, but not in the current state (expired lease, full or draining
    /// server, pinned device, no room to drain).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// No live server has room for the queues.
    #[error("no capacity: {0}")]
    ResourceExhausted(String),
    /// Saving or loading the state failed; the change was not applied.
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// A credential could not be signed (the request's checks let through
    /// a field the signer refuses); nothing was applied.
    #[error("credential: {0}")]
    Credential(#[from] vrio_core::tenancy::CredentialError),
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        // The status code already says what kind of error it is.
        match e {
            ControlError::NotFound(m) => tonic::Status::not_found(m),
            ControlError::AlreadyExists(m) => tonic::Status::already_exists(m),
            ControlError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            ControlError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            ControlError::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            e @ (ControlError::Store(_) | ControlError::Credential(_)) => {
                tonic::Status::internal(e.to_string())
            }
        }
    }
}

/// Why a call of the follower glue (`io_server`, `vm_host`, `embedded`,
/// `admin`) failed. Each rule that can break has its own variant, so a
/// caller can tell a controller without room from one it cannot reach.
#[derive(Debug, thiserror::Error)]
pub enum GlueError {
    /// The controller could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The controller refused a request.
    #[error("controller: {0}")]
    Rpc(#[from] tonic::Status),
    /// A runtime or thread could not be started, or a socket bound.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The controller returned no assignment for a queue it was asked to
    /// place.
    #[error("no assignment for queue {queue} of {device}")]
    NoAssignment {
        /// The device's id at the controller.
        device: String,
        /// The queue's index in the device.
        queue: u32,
    },
    /// A queue is assigned to no live server (none has room, or none is
    /// registered yet): it has nowhere to attach.
    #[error("queue {queue} of {device} waits for a live server with room")]
    NoLiveServer {
        /// The device's id at the controller.
        device: String,
        /// The queue's index in the device.
        queue: u32,
    },
    /// The controller named a sidecore index that a queue target cannot
    /// hold.
    #[error("queue {queue} of {device}: sidecore {sidecore} is out of range")]
    SidecoreOutOfRange {
        /// The device's id at the controller.
        device: String,
        /// The queue's index in the device.
        queue: u32,
        /// The sidecore the controller named.
        sidecore: u32,
    },
    /// Fewer I/O servers than wanted held a live lease by the deadline.
    #[error("{wanted} I/O server(s) did not register within {within:?}")]
    ServersMissing {
        /// How many live servers were wanted.
        wanted: usize,
        /// How long they were waited for.
        within: Duration,
    },
    /// An embedded controller's state store could not be opened.
    #[error("controller state: {0}")]
    StateStore(#[from] StoreError),
    /// An embedded controller could not load its saved state.
    #[error("controller state: {0}")]
    ControllerState(#[from] ControlError),
}
