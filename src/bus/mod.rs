//! Everything that talks to RabbitMQ. Service crates never see a channel, a delivery tag or
//! a decode step: they implement [`Handler`] and [`Responder`] and the bus does the rest.
//!
//! ```text
//! gateway ── Publisher ──confirm──▶ sluice.events (topic)
//!                                     │  <routing key>
//!                                     ▼
//!                          <service>.<handler> (quorum) ──▶ Consumer ──▶ Handler<E>
//!                                                            │ inbox + effects + outbox: one transaction
//!                                                            ▼
//!                                                       outbox relay ── Publisher ──▶ sluice.events
//! ```
//!
//! Publishing and consuming use separate connections, each supervised by a [`connection`]
//! link that reconnects with backoff and re-declares its topology and consumers. The
//! acknowledgement policy is documented on [`consumer`]; it lives there and nowhere else.

pub mod admin;
pub mod connection;
pub mod consumer;
pub mod dlq;
mod error;
pub mod handler;
pub mod headers;
pub mod publisher;
mod relay;
mod retention;
mod spans;
pub mod rpc;
pub mod tap;
pub mod tls;
pub mod topology;

pub use consumer::{Consumer, ConsumerBuilder};
pub use error::Error;
pub use handler::{BoxError, Context, Handler, HandlerError, Metadata, Responder};
pub use headers::{Envelope, TraceContext};
pub use publisher::Publisher;
pub use rpc::{Rpc, RpcClient};
pub use tap::{Tap, Tapped};

/// Namespace of Sluice's name-based (v5) event ids.
pub const EVENT_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_9a7e_52d4_4c1b_9f0e_7d2a_b3c4_d5e6);
