//! End-to-end tests: real RabbitMQ (a fresh vhost per test), real databases (SQLite and
//! PostgreSQL), real gRPC over TCP. One binary, many modules.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the point

mod support;

mod admin;
mod auth;
mod bad_input;
mod compose;
mod child;
mod crash;
mod delivery;
mod event_gateway;
mod dlq_tool;
mod faults;
mod metrics;
mod placing_orders;
mod platform;
mod poison_messages;
mod readme;
mod tls;
mod tracing;
