//! Controller errors and their gRPC status codes.

use crate::store::StoreError;

/// Why a controller request failed. Each variant maps to the gRPC status
/// code of the same name (`Store` to `INTERNAL`).
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
            e @ ControlError::Store(_) => tonic::Status::internal(e.to_string()),
        }
    }
}
