//! The bus error type: variants are named for what the caller must decide.

use std::time::Duration;

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No usable connection to the broker right now (down, reconnecting, shutting down).
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker blocked publishing (`connection.blocked`, e.g. a memory or disk alarm).
    #[error("publishing is blocked by the broker: {0}")]
    Blocked(String),
    /// The broker did not confirm a publish in time; its fate is unknown.
    #[error("the broker did not confirm the publish within {0:?}")]
    ConfirmTimeout(Duration),
    /// The broker refused the message (basic.nack).
    #[error("the broker refused the message")]
    Nacked,
    /// A mandatory message matched no queue.
    #[error("no queue is bound for {exchange}:{routing_key}")]
    Unroutable {
        /// Exchange the message was published to.
        exchange: String,
        /// Its routing key.
        routing_key: String,
    },
    /// A request got no reply before its deadline.
    #[error("no reply from {queue} within {timeout:?}")]
    NoReply {
        /// The request queue.
        queue: &'static str,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The responder answered with an error.
    #[error("{queue} failed: {message}")]
    Remote {
        /// The request queue.
        queue: &'static str,
        /// The responder's error text.
        message: String,
    },
    /// A reply body was not the expected Protobuf message.
    #[error("undecodable reply: {0}")]
    Decode(#[from] prost::DecodeError),
    /// A protocol-level failure.
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    /// The service database failed.
    #[error("database: {0}")]
    Store(#[from] sqlx::Error),
    /// Schema migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A name (queue, header) exceeded AMQP's limits or was otherwise unusable.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// The TLS settings of an `amqps://` URL are unusable (an unreadable or invalid CA file).
    #[error("TLS: {0}")]
    Tls(String),
}

impl Error {
    /// Whether the failure is about reaching the broker (callers answer UNAVAILABLE).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Blocked(_) | Self::Amqp(_) | Self::ConfirmTimeout(_))
    }
}
