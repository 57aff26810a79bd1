//! End-to-end tests: real RabbitMQ (a fresh vhost per test), real databases (SQLite and
//! PostgreSQL), real gRPC over TCP. One binary, many modules.

mod support;

mod bad_input;
mod compose;
mod delivery;
mod faults;
mod placing_orders;
mod platform;
mod poison_messages;
