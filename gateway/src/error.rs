//! The one place where gateway failures become gRPC statuses. Internal detail is logged here,
//! never sent to the client.

use sluice::bus::Error as BusError;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// Why a gateway call failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request breaks one or more rules; nothing was published.
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// The thing asked for does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The caller's deadline passed while waiting on another service.
    #[error("deadline exceeded waiting for {0}")]
    DeadlineExceeded(&'static str),
    /// The broker (or the service behind it) cannot be reached now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected answer.
    #[error("internal: {0}")]
    Internal(String),
}

impl From<BusError> for GatewayError {
    fn from(error: BusError) -> Self {
        match error {
            BusError::NoReply { queue, .. } => Self::Unavailable(format!("{queue} did not answer in time")),
            BusError::Unroutable { routing_key, .. } => Self::Unavailable(format!("nothing subscribes to {routing_key} yet")),
            BusError::Remote { queue, message } => Self::Internal(format!("{queue}: {message}")),
            other if other.is_unavailable() => Self::Unavailable(other.to_string()),
            BusError::Nacked => Self::Unavailable("the broker refused the message".into()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<GatewayError> for Status {
    fn from(error: GatewayError) -> Self {
        match error {
            GatewayError::InvalidArgument(violations) => {
                let summary = violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ");
                Status::with_error_details(Code::InvalidArgument, summary, ErrorDetails::with_bad_request(violations))
            }
            GatewayError::NotFound(what) => Status::not_found(format!("{what} not found")),
            GatewayError::DeadlineExceeded(what) => Status::deadline_exceeded(format!("deadline exceeded waiting for {what}")),
            GatewayError::Unavailable(why) => {
                tracing::warn!(error.message = %why, "answering UNAVAILABLE");
                Status::unavailable(why)
            }
            GatewayError::Internal(why) => {
                tracing::error!(error.message = %why, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
