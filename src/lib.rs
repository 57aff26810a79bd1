//! Sluice: typed, reliable, traced events on RabbitMQ.
//!
//! The crate map:
//!
//! - [`pb`]: every type generated from `proto/sluice/v1` (events, the gRPC API, internal
//!   request/reply messages), plus the descriptor set served by gRPC reflection.
//! - [`events`]: the [`events::Event`] trait that binds a Protobuf message to its routing key.
//! - [`bus`]: everything that talks to RabbitMQ: connections, topology, publishing with
//!   confirms, typed consumers with retries and dead-lettering, request/reply.
//! - [`store`]: the service database (SQLite or PostgreSQL through sqlx), with the inbox and
//!   outbox tables that make handler effects exactly-once.
//! - [`config`], [`shutdown`], [`telemetry`], [`ops`]: process plumbing shared by every binary.
#![warn(missing_docs)]

pub mod bus;
pub mod config;
pub mod events;
pub mod metrics;
pub mod ops;
pub mod shutdown;
pub mod store;
pub mod telemetry;

/// Types generated from `proto/sluice/v1/*.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("sluice.v1");
    include!(concat!(env!("OUT_DIR"), "/sluice_bindings.rs"));

    /// Encoded `FileDescriptorSet` of every Sluice proto (and its imports), for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sluice_descriptor");
}
