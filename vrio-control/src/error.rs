//! Controller errors and their gRPC status codes.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("no capacity: {0}")]
    ResourceExhausted(String),
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
